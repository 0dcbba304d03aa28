"""Each update's norm is bounded before it is aggregated, so that no device, honest or not, steps the adapter
further than the round's typical update (docs/aggregation.md, "Bounding each update"; the guarantee it gives is in
docs/security.md, "An insider's influence").

The bound is per device and whole-update: ``b_k = min(c * m * sqrt(n_k), clip_norm)``, where ``n_k`` is the
number of values device k delivered (its plan's module, its kept components, the head), ``m`` the *reference*:
the median over the round's fresh updates of their per-value RMS ``||Δ_j|| / sqrt(n_j)``, ``c`` =
``round.clip_multiple`` and ``clip_norm`` = ``round.clip_norm`` (either may be off). An update longer than its
bound is scaled down to it, direction kept. Per value, so that a rank-2 depth-1 update is measured on the same
scale as a full one. A median needs a majority: with fewer than ``MIN_UPDATES_FOR_MEDIAN`` fresh updates the
round reuses the last reference a round had (none before the first such round: then only ``clip_norm`` bounds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedlora.aggregation import ClientUpdate
from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B

# with at least 3 fresh updates one insider cannot be the median (f insiders need 2f + 1)
MIN_UPDATES_FOR_MEDIAN = 3


@dataclass(frozen=True)
class ClipResult:
    """A round's updates after clipping, and what the record says about it."""

    updates: dict[int, ClientUpdate]
    norms: dict[int, float]  # device -> L2 norm of what it delivered, before clipping
    bounds: dict[int, float | None]  # device -> its bound b_k (None: unbounded)
    clipped: frozenset[int]
    reference_rms: float | None  # m of this round (None: no relative bound)
    reference_from_round: bool  # m is this round's median (False: carried over, or none)

    def record(self) -> dict[str, Any]:
        """What goes into the round record's ``aggregation``."""
        return {
            "clip_reference_rms": self.reference_rms,
            "clip_reference_from_round": self.reference_from_round,
            "clip_bounds": dict(self.bounds),
            "clipped": sorted(self.clipped),
        }


def delivered(u: ClientUpdate) -> tuple[float, int]:
    """(L2 norm, number of values) of what an update delivers: the kept components of its LoRA factors, its head."""
    total, count = 0.0, 0
    for k, d in u.delta.items():
        d64 = d.to(torch.float64)
        mask = u.kept.get(k[: -len(_A)]) if u.kept is not None and k.endswith((_A, _B)) else None
        if mask is not None:
            d64 = d64[mask] if k.endswith(_A) else d64[:, mask]
        total += float(d64.pow(2).sum())
        count += d64.numel()
    return math.sqrt(total), count


def reference_rms(updates: Mapping[int, ClientUpdate], fresh: Collection[int]) -> float | None:
    """The median per-value RMS of the fresh updates, if there are enough of them for a median."""
    rms = []
    for d in fresh:
        norm, n = delivered(updates[d])
        rms.append(norm / math.sqrt(n) if n else 0.0)
    return statistics.median(rms) if len(rms) >= MIN_UPDATES_FOR_MEDIAN else None


def clip_updates(
    updates: Mapping[int, ClientUpdate],
    fresh: Collection[int],
    *,
    multiple: float | None,
    clip_norm: float | None,
    carried_rms: float | None = None,
) -> ClipResult:
    """Clip every update (fresh and stale) to its bound; the reference comes from the fresh ones (or
    ``carried_rms``, the last round's, when there are too few of them)."""
    own = reference_rms(updates, fresh) if multiple is not None else None
    m = (own if own is not None else carried_rms) if multiple is not None else None
    out: dict[int, ClientUpdate] = {}
    norms: dict[int, float] = {}
    bounds: dict[int, float | None] = {}
    clipped: set[int] = set()
    for d, u in updates.items():
        norm, n = delivered(u)
        relative = None if m is None or multiple is None else multiple * m * math.sqrt(n)
        bound = min((b for b in (clip_norm, relative) if b is not None), default=None)
        norms[d], bounds[d] = norm, bound
        if bound is not None and norm > bound:
            out[d] = scaled(u, bound / norm)
            clipped.add(d)
        else:
            out[d] = u
    return ClipResult(out, norms, bounds, frozenset(clipped), m, own is not None)


def scaled(u: ClientUpdate, factor: float) -> ClientUpdate:
    """The update with every delta tensor multiplied by ``factor`` (in float64, back to its dtype)."""
    return replace(u, delta={k: (d.to(torch.float64) * factor).to(d.dtype) for k, d in u.delta.items()})
