"""Aggregators, one per file, chosen by name in the experiment config (`round.aggregator`)."""

from __future__ import annotations

from fedlora.aggregators.base import Aggregator
from fedlora.aggregators.fedavg import FedAvgAggregator
from fedlora.aggregators.flexlora import FlexLoraAggregator
from fedlora.aggregators.hetlora import HetLoraAggregator

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedAvgAggregator, HetLoraAggregator, FlexLoraAggregator)
}


def make_aggregator(name: str, rule: str = "eligible") -> Aggregator:
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"round.aggregator: unknown aggregator {name!r}; known: {sorted(AGGREGATORS)}") from None
    return cls(rule=rule)


__all__ = ["AGGREGATORS", "Aggregator", "make_aggregator"]
