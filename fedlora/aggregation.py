"""The aggregation rule for heterogeneous, partial and sparse LoRA updates, and the checks every update passes.

One rule (docs/aggregation.md has the formula and why it is unbiased).  Every device *present* for the round
has a weight p_k (its training examples) and a *capability*: the module it is able to train (the largest rank
and depth its policy may give it; by default the whole adapter).  For every LoRA module and rank component i
(row i of A, column i of B), the aggregated delta is

    delta_i = sum_k p_k * s_ki * d_ki  /  sum_k p_k * e_ki

where e_ki = 1 if component i of that module lies within device k's capability (it is *eligible*), and
s_ki = 1 if k's update for this round is in the aggregate and carries component i (its plan covered it and its
sparsifier sent it).  Whatever an eligible device did not deliver (it sat out, its update was lost, its plan
was shallower or of lower rank this round, its sparsifier kept the component back) counts as a zero update
of weight p_k; error feedback (fedlora/sparsify/feedback.py) delivers the part it trained later.  A component
outside a device's capability is not its to vote on.  A stale update (MIFA reuse) stands in for its device's
missing fresh one, with the same weight.  Head parameters, which every device trains, average over every
present device the same way.  With equal capabilities and dense updates from everybody this is FedAvg.

The rule of earlier versions (``rule="sent"``) is kept to measure against: a component averages over the
updates that sent it, plus the weight of absent devices; a shallower, lower-rank or sparser update does not
vote on what it did not send, so each component leans towards whichever devices happened to send it.

Checks.  ``check_update`` is every rule aggregation and the step after it rely on, for one update: the BS runs
it when it takes an update off the air, so a bad one is that device's failure (``UpdateError``), never the
round's; the aggregators run it again on everything they are given (stale updates included).  One rule goes
beyond shapes: the global adapter plus the update must stay within a magnitude (finite in float32, or the
range of the dtype the BS sends views in).  The aggregate is a convex combination of the updates and zero, so
the stepped adapter then stays within it too, and the next round's adapter view can still be encoded.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import HEAD_PREFIX, AdapterState, GlobalAdapter, ModuleSpec, layer_index

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


Rule = Literal["eligible", "sent"]


@dataclass
class ClientUpdate:
    spec: ModuleSpec
    delta: AdapterState  # trained - view, shapes as view(spec)
    weight: float  # e.g. number of local training examples
    kept: dict[str, torch.Tensor] | None = None  # module path -> bool (rank,) of components sent; no mask = all
    capability: ModuleSpec | None = None  # the module the device is able to train (None: the whole adapter)


@dataclass(frozen=True)
class Absent:
    """A device present for the round whose update is not in the aggregate: its weight and capability."""

    weight: float
    capability: ModuleSpec | None = None  # None: the whole adapter


class UpdateError(ValueError):
    """An update aggregation cannot use; the one-line message names the key or field."""


def check_update(global_adapter: GlobalAdapter, u: ClientUpdate, *, max_abs: float = FLOAT32_MAX) -> None:
    """Raise UpdateError naming what makes ``u`` unusable: its weight, spec, keys, shapes, values or masks.

    max_abs: the largest magnitude the global adapter plus the update may reach (the BS passes the range of the
    dtype it sends views in; by default: finite in float32)."""
    w = u.weight
    if not isinstance(w, numbers.Real) or isinstance(w, bool) or not 0 < w < float("inf"):
        raise UpdateError(f"weight must be a finite number > 0, got {w!r}")
    try:
        global_adapter.validate_spec(u.spec)
    except ValueError as e:
        raise UpdateError(str(e)) from None
    expected = global_adapter.keys_for(u.spec)
    in_module = set(expected)
    r = u.spec.rank
    for k, d in u.delta.items():
        if k not in in_module:
            raise UpdateError(f"key {k!r} is not part of its module {u.spec}")
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise UpdateError(f"key {k!r} is not a floating-point tensor")
        g = _view_of(global_adapter.state[k], k, r)
        if tuple(d.shape) != tuple(g.shape):
            raise UpdateError(f"key {k!r} has shape {tuple(d.shape)}, expected {tuple(g.shape)}")
        if not bool(((g + d.to(g.dtype)).abs() <= max_abs).all()):  # False for NaN and Inf as well
            if not torch.isfinite(d).all():
                raise UpdateError(f"key {k!r} has non-finite values")
            raise UpdateError(f"key {k!r}: the global adapter plus this update exceeds {max_abs:g} in magnitude")
    missing = [k for k in expected if k not in u.delta]
    if missing:
        raise UpdateError(f"missing key {missing[0]!r}")
    if u.kept is not None:
        paths = {k[: -len(_A)] for k in expected if k.endswith(_A)}
        for p, m in u.kept.items():
            if p not in paths:
                raise UpdateError(f"kept mask for {p!r}, which is not part of its module {u.spec}")
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (r,):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise UpdateError(f"kept mask for {p!r} must be bool of shape ({r},), got {got}")


def _view_of(full: torch.Tensor, key: str, rank: int) -> torch.Tensor:
    """The part of a global tensor a rank-``rank`` view holds: A[:r], B[:, :r], a head tensor whole."""
    return full[:rank] if key.endswith(_A) else full[:, :rank] if key.endswith(_B) else full


def check_all(global_adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent]) -> None:
    """check_update on every update (the error names its index) and a finite weight >= 0 for every absent device."""
    for i, u in enumerate(updates):
        try:
            check_update(global_adapter, u)
        except UpdateError as e:
            raise UpdateError(f"device {i}: {e}") from None
    for a in absent:
        if not 0 <= a.weight < float("inf"):
            raise ValueError(f"an absent device's weight must be a finite number >= 0, got {a.weight!r}")


def head_average(global_adapter: GlobalAdapter, updates: Sequence[ClientUpdate]) -> AdapterState:
    """The head's delta averaged over the updates by weight, as the baselines' aggregators count (participants
    only); empty without updates."""
    total_w = sum(float(u.weight) for u in updates)
    out: AdapterState = {}
    for k, v in global_adapter.state.items():
        if k.startswith(HEAD_PREFIX) and total_w > 0:
            total = torch.zeros(v.shape, dtype=torch.float64)
            for u in updates:
                total += float(u.weight) * u.delta[k].to(torch.float64)
            out[k] = (total / total_w).to(v.dtype)
    return out


def eligible_counts(global_adapter: GlobalAdapter, capability: ModuleSpec | None) -> tuple[int, int]:
    """(rank, first layer) of a capability: components [0, rank) of layers >= first layer are its to vote on."""
    spec = capability or ModuleSpec(global_adapter.max_rank, global_adapter.num_layers)
    return spec.rank, global_adapter.num_layers - spec.depth


def aggregate(
    global_adapter: GlobalAdapter,
    updates: Sequence[ClientUpdate],
    absent: Sequence[Absent] = (),
    rule: Rule = "eligible",
) -> AdapterState:
    """Full-shape delta for ``global_adapter.apply`` by the rule in the module docstring.

    absent: every device present for the round without an update in ``updates``. An update's components that
    lie beyond its capability (it was planned more than its policy said it could do) count where it sent them."""
    check_all(global_adapter, updates, absent)
    # float64 accumulators: the result must match FedAvg to float32 precision
    num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_adapter.state.items()}
    den, head_w = denominators(global_adapter, updates, absent, rule)
    for u in updates:
        w = float(u.weight)
        r = u.spec.rank
        for k, d in u.delta.items():
            d = d.to(torch.float64)
            if k.startswith(HEAD_PREFIX):
                num[k] += w * d
                continue
            path = k[: -len(_A)]  # _A and _B have the same length
            sent = u.kept.get(path) if u.kept is not None else None
            mask = torch.ones(r, dtype=torch.float64) if sent is None else sent.to(torch.float64)
            if k.endswith(_A):
                num[k][:r] += w * mask[:, None] * d
            else:
                num[k][:, :r] += w * d * mask[None, :]
            if rule == "sent":
                den[k][:r] += w * mask
    out: AdapterState = {}
    for k, total in num.items():
        dtype = global_adapter.state[k].dtype
        if k.startswith(HEAD_PREFIX):
            out[k] = (total / head_w if head_w > 0 else total).to(dtype)
            continue
        safe = torch.where(den[k] > 0, den[k], torch.ones_like(den[k]))
        scale = torch.where(den[k] > 0, 1.0 / safe, torch.zeros_like(safe))
        if k.endswith(_A):
            out[k] = (total * scale[:, None]).to(dtype)
        else:
            out[k] = (total * scale[None, :]).to(dtype)
    return out


def denominators(
    global_adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent], rule: Rule = "eligible"
) -> tuple[dict[str, torch.Tensor], float]:
    """The rule's weights: per LoRA key, the weight (R,) each component is averaged over, and the head's (every
    present device). Under "sent" an update's own components are not in it (``aggregate`` adds them by mask)."""
    R = global_adapter.max_rank
    den = {k: torch.zeros(R, dtype=torch.float64) for k in global_adapter.state if layer_index(k) is not None}
    head_w = 0.0
    for a in absent:
        head_w += a.weight
        _add_eligible(global_adapter, den, a.weight, a.capability, rule, everything=True)
    for u in updates:
        head_w += float(u.weight)
        if rule == "eligible":
            _add_eligible(global_adapter, den, float(u.weight), u.capability, rule, everything=False, at_least=u.spec)
    return den, head_w


def _add_eligible(
    global_adapter: GlobalAdapter,
    den: dict[str, torch.Tensor],
    weight: float,
    capability: ModuleSpec | None,
    rule: Rule,
    *,
    everything: bool,
    at_least: ModuleSpec | None = None,
) -> None:
    """Add a device's weight to the denominators of what it is eligible for (the "sent" rule: an absent device's
    weight joins every denominator; an update's own components are added where they are aggregated)."""
    if rule == "sent":
        if everything:
            for v in den.values():
                v += weight
        return
    regions = [eligible_counts(global_adapter, capability)]
    if at_least is not None:  # an update beyond its stated capability still votes on what it carries
        regions.append(eligible_counts(global_adapter, at_least))
    R = global_adapter.max_rank
    for k, v in den.items():
        layer = layer_index(k)
        covered = torch.zeros(R, dtype=torch.bool)
        for rank, first in regions:
            if layer is not None and layer >= first:
                covered[:rank] = True
        v += weight * covered.to(v.dtype)
