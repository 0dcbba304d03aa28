"""The aggregator interface: a round's updates (and who was present without one) in, the adapter's step out.

Shaped like the aggregation half of a Flower strategy (`aggregate_fit`): pure functions of the adapter and
the updates, no sockets, so every aggregator runs the same on every PHY and in tests with the tiny model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from fedlora.aggregation import Absent, ClientUpdate, Rule
from fedlora.lora import AdapterState, GlobalAdapter


class Aggregator(ABC):
    name: str = "abstract"
    # whether the edge's error-feedback residuals (in the coordinates of the view it trained) still mean the same
    # after this aggregator's step: false when it re-factors the adapter (the basis moves every round)
    keeps_coordinates: bool = True

    def __init__(self, rule: str = "eligible"):
        if rule not in ("eligible", "sent"):
            raise ValueError(f"round.aggregation_rule: expected 'eligible' or 'sent', got {rule!r}")
        self.rule: Rule = rule  # type: ignore[assignment]  # checked just above
        self.last_stats: dict[str, Any] = {}  # what the last step measured (for the round record)

    @property
    def rule_name(self) -> str:
        """Who counts, for the record: fedavg's rule, or "participants" for the baselines that follow their papers."""
        return self.rule

    @abstractmethod
    def aggregate(
        self, adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent]
    ) -> AdapterState:
        """The full-shape delta `adapter.apply` takes. `absent`: the present devices without an update."""
