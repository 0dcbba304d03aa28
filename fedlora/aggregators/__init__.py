"""Aggregators, one per file, chosen by name in the experiment config (`round.aggregator`)."""

from __future__ import annotations

from fedlora.aggregators.base import Aggregator
from fedlora.aggregators.fedavg import FedAvgAggregator
from fedlora.aggregators.flexlora import FlexLoraAggregator
from fedlora.aggregators.hetlora import HetLoraAggregator
from fedlora.aggregators.trimmed_mean import DEFAULT_TRIM_FRACTION, TrimmedMeanAggregator

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedAvgAggregator, HetLoraAggregator, FlexLoraAggregator, TrimmedMeanAggregator)
}


def make_aggregator(name: str, rule: str = "eligible", trim_fraction: float = DEFAULT_TRIM_FRACTION) -> Aggregator:
    """The aggregator `round.aggregator` names; `trim_fraction` is the trimmed mean's (`round.trim_fraction`)."""
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"round.aggregator: unknown aggregator {name!r}; known: {sorted(AGGREGATORS)}") from None
    if cls is TrimmedMeanAggregator:
        return TrimmedMeanAggregator(rule=rule, trim_fraction=trim_fraction)
    return cls(rule=rule)


__all__ = ["AGGREGATORS", "Aggregator", "make_aggregator"]
