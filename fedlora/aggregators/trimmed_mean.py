"""Coordinate-wise trimmed mean (Yin et al., ICML 2018), weighted by data and fitted to the eligible rule: per
coordinate, the values of the devices that *delivered* it, each with its weight p_k, sorted; the lowest and the
highest ``trim_fraction`` of their weight dropped; the rest averaged by weight; that mean scaled by the delivered
share of the eligible weight, as fedavg's rule scales it (docs/aggregation.md, "Trimmed mean").

So with ``trim_fraction = 0`` it is exactly fedavg's eligible rule, and a device that sat out, lost its update or
kept a component back is not a zero among the votes (it only shrinks the step, as there): absence never pushes
real updates out as extremes. If the insiders hold at most ``trim_fraction`` of a coordinate's delivered weight,
that coordinate's mean lies within the honest deliverers' values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.aggregation import Absent, ClientUpdate, check_all, denominators
from fedlora.aggregators.base import Aggregator
from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import HEAD_PREFIX, AdapterState, GlobalAdapter

DEFAULT_TRIM_FRACTION = 0.2


class TrimmedMeanAggregator(Aggregator):
    name = "trimmed_mean"

    def __init__(self, rule: str = "eligible", trim_fraction: float = DEFAULT_TRIM_FRACTION):
        super().__init__(rule)
        if rule != "eligible":
            raise ValueError(f"round.aggregation_rule: trimmed_mean follows the eligible rule, got {rule!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"round.trim_fraction: expected 0 <= x < 0.5, got {trim_fraction!r}")
        self.trim_fraction = trim_fraction

    def aggregate(
        self, adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent]
    ) -> AdapterState:
        check_all(adapter, updates, absent)
        den, head_w = denominators(adapter, updates, absent, "eligible")
        out: AdapterState = {}
        for k, g in adapter.state.items():
            values, weights = _stack(k, g, updates)
            kept_sum = trimmed_sum(values, weights, self.trim_fraction)
            eligible = torch.tensor(head_w, dtype=torch.float64) if k.startswith(HEAD_PREFIX) else _along(k, den[k])
            scale = torch.where(eligible > 0, 1.0 / ((1 - 2 * self.trim_fraction) * eligible.clamp_min(1e-300)), 0.0)
            out[k] = (kept_sum * scale).to(g.dtype)
        return out


def _along(key: str, per_component: torch.Tensor) -> torch.Tensor:
    """A per-component (R,) weight shaped to broadcast over the key's tensor: rows of A, columns of B."""
    return per_component[:, None] if key.endswith(_A) else per_component[None, :]


def _stack(key: str, g: torch.Tensor, updates: Sequence[ClientUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, *shape) values of every update in the key's full shape, and (n, *shape) weights: p_k where the update
    delivered the value (its plan covered it, its sparsifier sent it), else 0."""
    values = torch.zeros((len(updates), *g.shape), dtype=torch.float64)
    weights = torch.zeros_like(values)
    for j, u in enumerate(updates):
        d = u.delta.get(key)
        if d is None:  # a layer outside the update's depth
            continue
        region = _region(key, u.spec.rank)
        values[j][region] = d.to(torch.float64)
        sent = torch.ones(d.shape, dtype=torch.float64)
        mask = u.kept.get(key[: -len(_A)]) if u.kept is not None and key.endswith((_A, _B)) else None
        if mask is not None:
            sent = sent * _along(key, mask.to(torch.float64))
        weights[j][region] = float(u.weight) * sent
    return values, weights


def _region(key: str, rank: int) -> tuple[slice, ...]:
    """Where a rank-``rank`` view's tensor sits in the full one: A[:r], B[:, :r], a head tensor whole."""
    if key.startswith(HEAD_PREFIX):
        return (slice(None),)
    return (slice(0, rank),) if key.endswith(_A) else (slice(None), slice(0, rank))


def trimmed_sum(values: torch.Tensor, weights: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Per coordinate (dim 0 runs over devices): sum of weight x value over what is left after the lowest and the
    highest ``trim_fraction`` of the coordinate's total weight are cut off (a value straddling a cut keeps the part
    inside). Divided by ``(1 - 2 trim_fraction) x total weight`` it is the weighted trimmed mean."""
    order = torch.argsort(values, dim=0, stable=True)
    v = torch.gather(values, 0, order)
    w = torch.gather(weights, 0, order)
    upper = torch.cumsum(w, dim=0)
    lower = upper - w
    total = upper[-1:]  # (1, *shape); empty without updates, and so is the sum's every term
    lo, hi = trim_fraction * total, (1 - trim_fraction) * total
    kept = (torch.minimum(upper, hi) - torch.maximum(lower, lo)).clamp_min(0.0)
    return (kept * v).sum(dim=0)
