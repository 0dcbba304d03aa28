"""Component-wise weighted averaging of the factors, by the one rule of fedlora/aggregation.py: every present
device weighs in every component it is able to train, and what it did not deliver counts as zero."""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.aggregation import Absent, ClientUpdate, aggregate
from fedlora.aggregators.base import Aggregator
from fedlora.lora import AdapterState, GlobalAdapter


class FedAvgAggregator(Aggregator):
    name = "fedavg"

    def aggregate(
        self, adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent]
    ) -> AdapterState:
        return aggregate(adapter, updates, absent, self.rule)
