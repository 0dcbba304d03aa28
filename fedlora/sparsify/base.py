"""The sparsifier interface, error feedback through it, and the component-selection skeleton.

A sparsifier lives on one edge device for the whole run (it carries that device's error feedback --
residual and pending updates, ``fedlora.sparsify.feedback`` -- from round to round).  Per round the
edge calls, in order:

    settle(delivered, lost)  the BS's verdict on earlier rounds, from the plan
    prepare_model(model)   before training  (b_only: freeze A)
    regularizer()          passed to ``train_local(..., regularizer=...)``  (SOFT: orthogonality)
    sparsify(delta, trained, spec, keep_fraction, round_idx=...)  -> SparseUpdate
    encode_update(update.delta, kept=update.kept, dtype=update.dtype, ...)

Component granularity.  Everything here selects whole LoRA rank components -- row i of A together
with column i of B -- because that is what the codec (``encode_update(kept=...)``) and the BS's
per-component aggregation understand.  Head parameters are small, trained densely by every device
and always sent dense (the ``kept`` masks cover LoRA modules only).

Error feedback and module switches (the rule).  Component indices are *global*: a rank-r view holds
components 0..r-1 of the global rank-R adapter, so component j of a key means the same thing in every
round whatever the device's spec.  The residual is therefore stored per AdapterState key, in global
component coordinates, grown with zeros to the largest rank seen:

    v      = delta[key] + residual[key][components 0..r-1]      (missing components count as 0)
    sent   = v restricted to the selected components
    residual[key][components 0..r-1] = v - sent
    residual[key][components >= r]   unchanged; residual of keys outside this round's spec unchanged

So a switch to a smaller rank or depth parks the residual of the components (or layers) the new
module does not have; they are re-sliced in, unchanged, the next time the device's module contains
them again.  Nothing is ever dropped: sum(sent) + residual == sum(delta) over any sequence of rounds.
Stale residuals are applied to the newer global adapter, as in every error-feedback scheme.

Lost updates.  What is sent is held as pending (``ErrorFeedback.hold``, in ``sparsify``) until the BS's
next plan says whether it was aggregated; one the BS closed its round without is folded back into the
residual (``settle``), head included, so the next update carries it.  Every method takes part when
``error_feedback`` is on, the dense ones too (their residual is only ever what was lost); see
``fedlora.sparsify.feedback`` and docs/soft.md.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import HEAD_PREFIX, AdapterState, ModuleSpec
from fedlora.sparsify.feedback import ErrorFeedback

DTYPES = ("fp16", "fp32")
Regularizer = Callable[[torch.nn.Module], torch.Tensor]


@dataclass
class SparseUpdate:
    """What goes to the codec: full-shape delta (unsent components are zero), kept masks, value dtype."""

    delta: AdapterState
    kept: dict[str, torch.Tensor] | None  # module path -> bool (rank,); None = dense (everything sent)
    dtype: str  # "fp16" / "fp32", for encode_update
    info: dict[str, float] = field(default_factory=dict)  # for logs: kept/total components, residual norm


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def check_keep_fraction(keep_fraction: float) -> float:
    """A real number in [0, 1]; anything else (bool, NaN, out of range) is a ValueError."""
    if (
        isinstance(keep_fraction, bool)
        or not isinstance(keep_fraction, numbers.Real)
        or not 0.0 <= float(keep_fraction) <= 1.0
    ):
        raise ValueError(f"keep_fraction must be a number in [0, 1], got {keep_fraction!r}")
    return float(keep_fraction)


def n_keep(keep_fraction: float, rank: int) -> int:
    """ceil(keep_fraction * rank), at least 1 when keep_fraction > 0, 0 when it is 0.

    The 1e-9 slack keeps float noise (0.3 * 10 = 3.0000000000000004) from adding a component."""
    if keep_fraction <= 0.0:
        return 0
    return min(rank, max(1, math.ceil(keep_fraction * rank - 1e-9)))


def lora_pairs(delta: AdapterState, spec: ModuleSpec) -> dict[str, tuple[str, str]]:
    """Module path -> (A key, B key), in delta order; checks pairing and the spec's rank."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in delta:
        if key.startswith(HEAD_PREFIX):
            continue
        if key.endswith(_A):
            path = key[: -len(_A)]
        elif key.endswith(_B):
            path = key[: -len(_B)]
        else:
            raise ValueError(f"key {key!r} is neither a LoRA factor nor a head parameter")
        if path in pairs:
            continue
        ka, kb = path + _A, path + _B
        if ka not in delta or kb not in delta:
            raise ValueError(f"module {path!r}: delta has only one of its LoRA factors")
        a, b = delta[ka], delta[kb]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != spec.rank or b.shape[1] != spec.rank:
            raise ValueError(
                f"module {path!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank {spec.rank} of {spec}"
            )
        pairs[path] = (ka, kb)
    return pairs


def check_same_layout(delta: AdapterState, trained: AdapterState) -> None:
    if set(delta) != set(trained):
        extra = sorted(set(delta) ^ set(trained))
        raise ValueError(f"delta and trained have different keys, e.g. {extra[0]!r}")
    for k, d in delta.items():
        if tuple(d.shape) != tuple(trained[k].shape):
            raise ValueError(f"{k!r}: delta {tuple(d.shape)} vs trained {tuple(trained[k].shape)}")


class Sparsifier(ABC):
    """One update-compression method; one instance per edge device, kept across rounds (it holds the device's
    error feedback: the residual, and what was sent until the BS says it was aggregated)."""

    name: str = "abstract"
    honours_keep_fraction: bool = False  # whether the plan's keep fraction changes what is sent

    def __init__(self, dtype: str = "fp16", error_feedback: bool = True):
        self.dtype = check_dtype(dtype)
        self.error_feedback = bool(error_feedback)
        self.feedback = ErrorFeedback()
        self._calls = 0

    def regularizer(self) -> Regularizer | None:
        """Added to the local training loss (SOFT: orthogonality); None for no term."""
        return None

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Called on the live peft model before training (b_only freezes A); default: nothing."""

    def sparsify(
        self,
        delta: AdapterState,
        trained: AdapterState,
        spec: ModuleSpec,
        keep_fraction: float,
        *,
        round_idx: int | None = None,
    ) -> SparseUpdate:
        """Turn this round's ``delta = trained - view`` into what is sent; with error feedback, what is sent is
        held as pending under ``round_idx`` (default: the number of earlier calls) until ``settle``."""
        kf = check_keep_fraction(keep_fraction)
        pairs = lora_pairs(delta, spec)
        rnd = self._calls if round_idx is None else int(round_idx)
        self._calls += 1
        before = self.feedback.snapshot() if self.error_feedback else None
        update = self._select(delta, trained, spec, kf, pairs, rnd)
        if self.error_feedback:
            self.feedback.hold(rnd, update.delta, before)
        update.info["residual_norm"] = self.feedback.norm() if self.error_feedback else 0.0
        return update

    @abstractmethod
    def _select(
        self,
        delta: AdapterState,
        trained: AdapterState,
        spec: ModuleSpec,
        keep_fraction: float,
        pairs: dict[str, tuple[str, str]],
        round_idx: int,
    ) -> SparseUpdate:
        """The method itself: what goes out of ``delta`` (+ residual), the residual updated."""

    def state_dict(self) -> dict[str, Any]:
        """The device's error feedback (residual, pending sent updates and the residual before each) and call
        count, for its checkpoint."""
        fb = self.feedback
        return {
            "residual": {k: v.clone() for k, v in fb.residual.items()},
            "pending": {r: {k: v.clone() for k, v in sent.items()} for r, sent in fb.pending.items()},
            "before": {r: {k: v.clone() for k, v in res.items()} for r, res in fb.before.items()},
            "calls": self._calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feedback.residual = {k: v.float().clone() for k, v in state["residual"].items()}
        self.feedback.pending = {
            int(r): {k: v.float().clone() for k, v in sent.items()} for r, sent in state["pending"].items()
        }
        self.feedback.before = {
            int(r): {k: v.float().clone() for k, v in res.items()} for r, res in state.get("before", {}).items()
        }
        self._calls = int(state["calls"])

    def rollback(self, round_idx: int) -> list[int]:
        """A resumed BS plans ``round_idx`` again: undo what this device did from that round on (the residual as
        it was before it, the updates sent since dropped), so the round is trained afresh and counted once."""
        return self.feedback.rollback(round_idx) if self.error_feedback else []

    def settle(self, delivered: Iterable[int], lost: Iterable[int]) -> list[int]:
        """The BS's verdict on earlier rounds: ``delivered`` were aggregated, ``lost`` closed without this
        device's update (folded back into the residual). Returns the rounds folded back."""
        if not self.error_feedback:
            return []
        return self.feedback.settle(delivered, lost)

    def with_residual(self, key: str, d: torch.Tensor) -> torch.Tensor:
        """``d`` (float32) plus the residual of its components: what the device could send for ``key``."""
        v = d.detach().float()
        return v + self.feedback.take(key, v) if self.error_feedback else v.clone()

    def sent_all(self, key: str, v: torch.Tensor) -> torch.Tensor:
        """``v`` goes out whole: the residual of its components is 0."""
        if self.error_feedback:
            self.feedback.clear(key, v)
        return v

    def reset(self) -> None:
        """Forget any state carried across rounds (a new run)."""
        self.feedback.reset()
        self._calls = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype!r}, error_feedback={self.error_feedback})"


@dataclass
class Candidate:
    """One LoRA module as the selection rule sees it: ``a``/``b`` = delta + residual (what could be sent),
    ``view_a``/``view_b`` = the factors the device started the round from (trained - delta)."""

    path: str
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    view_a: torch.Tensor
    view_b: torch.Tensor


class ComponentSparsifier(Sparsifier):
    """Keep ``n_keep(keep_fraction, r)`` components per module, chosen by ``choose``; error feedback on the rest."""

    honours_keep_fraction = True

    @abstractmethod
    def choose(self, cand: Candidate, k: int, round_idx: int) -> torch.Tensor:
        """Indices (int64, any order, distinct) of the ``k`` components of ``cand`` to send."""

    def _select(
        self,
        delta: AdapterState,
        trained: AdapterState,
        spec: ModuleSpec,
        keep_fraction: float,
        pairs: dict[str, tuple[str, str]],
        round_idx: int,
    ) -> SparseUpdate:
        check_same_layout(delta, trained)
        out: AdapterState = {}
        kept: dict[str, torch.Tensor] = {}
        n_sent = n_total = 0
        for path, (ka, kb) in pairs.items():
            da, db = self.with_residual(ka, delta[ka]), self.with_residual(kb, delta[kb])
            r = da.shape[0]
            k = n_keep(keep_fraction, r)
            cand = Candidate(
                path,
                da,
                db,
                trained[ka].detach().float() - delta[ka].detach().float(),
                trained[kb].detach().float() - delta[kb].detach().float(),
            )
            mask = torch.zeros(r, dtype=torch.bool)
            if k == r:
                mask[:] = True
            elif k > 0:
                idx = torch.as_tensor(self.choose(cand, k, round_idx), dtype=torch.long)
                if idx.numel() != k or idx.unique().numel() != k or (idx < 0).any() or (idx >= r).any():
                    raise RuntimeError(f"{self.name}: choose() returned bad indices {idx.tolist()} for k={k}, r={r}")
                mask[idx] = True
            sa, sb = da * mask[:, None], db * mask[None, :]
            if self.error_feedback:
                self.feedback.put(ka, da - sa)
                self.feedback.put(kb, db - sb)
            out[ka], out[kb] = sa, sb
            kept[path] = mask
            n_sent += int(mask.sum())
            n_total += r
        # head (and anything else dense) goes whole, with what of it was lost earlier, in the delta's key order
        ordered = {k: (out[k] if k in out else self.sent_all(k, self.with_residual(k, delta[k]))) for k in delta}
        return SparseUpdate(ordered, kept, self.dtype, {"kept_components": n_sent, "total_components": n_total})
