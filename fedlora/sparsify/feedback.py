"""The error-feedback store of one device: the residual (never sent) and the pending updates (sent, fate unknown).

Residual.  Stored per AdapterState key in global component coordinates, grown with zeros to the largest rank
seen (LoRA A: components are rows, B: columns; a head parameter is one whole tensor). ``take`` reads components
0..r-1, ``put`` writes them and leaves components >= r alone (the rule across module switches is in
``fedlora.sparsify.base``).

Pending.  What went on the air in round t leaves the residual when it is encoded, but the BS may never aggregate
it (deadline, ARQ gave up, rejected as bad). So each sent update is held, per round, until the BS's next plan
says what became of it (``proto.control.Plan.aggregated_rounds``): aggregated -> dropped; the round closed without
it -> folded back into the residual, so the next update carries it. Invariant, in global coordinates:

    sum(delta) == sum(sent, aggregated or forgotten) + sum(sent, pending) + residual

At most ``max_pending`` updates are held; one more makes the oldest *forgotten* (counted as delivered: today's
behaviour before this rule). The protocol settles every earlier round with each plan, so more than one pending
update means the plans stopped carrying a verdict.

Rollback.  With each pending update the residual as it was before that round is kept (``before``). A BS resumed
from a checkpoint taken before round t closed plans round t again; the device then rolls back to the residual
before t and drops what it sent in t (``rollback``), and trains t afresh: the round's update is counted once, not
folded back *and* retrained (which sent it twice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import AdapterState

log = logging.getLogger("fedlora.sparsify")

MAX_PENDING_UPDATES = 4  # sent updates held for a verdict; each plan settles every earlier round, so 1 in practice


def component_axis(key: str) -> int | None:
    """The rank-component axis of a key: 0 for LoRA A, 1 for LoRA B, None for a whole tensor (head)."""
    if key.endswith(_A):
        return 0
    if key.endswith(_B):
        return 1
    return None


def _components(t: torch.Tensor, axis: int | None, n: int) -> torch.Tensor:
    """A view of components 0..n-1 of ``t`` (the whole tensor when it has no component axis)."""
    if axis is None:
        return t
    return t[:n] if axis == 0 else t[:, :n]


class ErrorFeedback:
    """Per-key residual in global component coordinates, and the sent updates awaiting the BS's verdict."""

    def __init__(self, max_pending: int = MAX_PENDING_UPDATES) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self.residual: AdapterState = {}
        self.pending: dict[int, AdapterState] = {}  # round -> what was sent then (float32, the view's shapes)
        self.before: dict[int, AdapterState] = {}  # round -> the residual before that round (for a rollback)

    # ------------------------------------------------------------------------------------------ residual
    def take(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Residual of components 0..r-1 of ``key`` shaped like ``like`` (zeros where none is stored)."""
        out = torch.zeros_like(like, dtype=torch.float32)
        stored = self.residual.get(key)
        if stored is None:
            return out
        axis = component_axis(key)
        self._check_fits(key, stored, like, axis)
        n = min(stored.shape[axis], like.shape[axis]) if axis is not None else 0
        _components(out, axis, n).copy_(_components(stored, axis, n))
        return out

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store ``value`` as the residual of components 0..r-1; components >= r keep theirs."""
        axis = component_axis(key)
        _components(self._grown(key, value, axis), axis, _rank(value, axis)).copy_(value)

    def clear(self, key: str, like: torch.Tensor) -> None:
        """Everything of components 0..r-1 went out: their residual is 0 (nothing is stored if none was)."""
        stored = self.residual.get(key)
        if stored is None:
            return
        axis = component_axis(key)
        self._check_fits(key, stored, like, axis)
        n = min(stored.shape[axis], like.shape[axis]) if axis is not None else 0
        _components(stored, axis, n).zero_()

    def add(self, key: str, value: torch.Tensor) -> None:
        """Fold ``value`` back into the residual of components 0..r-1 (an all-zero value stores nothing)."""
        if not bool(value.any()):
            return
        axis = component_axis(key)
        _components(self._grown(key, value, axis), axis, _rank(value, axis)).add_(value.float())

    def _grown(self, key: str, value: torch.Tensor, axis: int | None) -> torch.Tensor:
        """The stored residual of ``key``, created or grown with zeros so that it holds ``value``'s components."""
        stored = self.residual.get(key)
        if stored is not None:
            self._check_fits(key, stored, value, axis)
        if axis is None:
            if stored is None:
                stored = self.residual[key] = torch.zeros(value.shape, dtype=torch.float32)
            return stored
        r = value.shape[axis]
        if stored is None or stored.shape[axis] < r:
            shape = list(value.shape)
            grown = torch.zeros(shape, dtype=torch.float32)
            if stored is not None:
                _components(grown, axis, stored.shape[axis]).copy_(stored)
            stored = self.residual[key] = grown
        return stored

    @staticmethod
    def _check_fits(key: str, stored: torch.Tensor, like: torch.Tensor, axis: int | None) -> None:
        other = [d for i, d in enumerate(stored.shape) if i != axis]
        want = [d for i, d in enumerate(like.shape) if i != axis]
        if stored.ndim != like.ndim or other != want:
            raise ValueError(
                f"{key!r}: stored residual {tuple(stored.shape)} does not fit {tuple(like.shape)} "
                f"(was the model changed?)"
            )

    def norm(self) -> float:
        """Frobenius norm of everything not yet sent (all keys, all components)."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.residual.values()))

    # ------------------------------------------------------------------------------------------ pending
    def snapshot(self) -> AdapterState:
        """A copy of the residual as it is now (what ``hold`` keeps as the state before a round)."""
        return {k: v.clone() for k, v in self.residual.items()}

    def hold(self, round_idx: int, sent: AdapterState, before: AdapterState | None = None) -> list[int]:
        """Keep what round ``round_idx`` sent (and the residual ``before`` it) until the BS says what became of it;
        returns the rounds forgotten to stay within ``max_pending`` (oldest first; they count as delivered)."""
        if round_idx in self.pending:  # the same round sent twice: the BS can hold at most one of them
            log.warning("error feedback: round %d sent again; its earlier update counts as delivered", round_idx)
        self.pending[round_idx] = {k: v.detach().float().clone() for k, v in sent.items()}
        if before is not None:
            self.before[round_idx] = before
        forgotten = []
        while len(self.pending) > self.max_pending:
            oldest = min(self.pending)
            del self.pending[oldest]
            self.before.pop(oldest, None)
            forgotten.append(oldest)
        if forgotten:  # info, not warning: a caller that never settles (a benchmark) gets exactly this every round
            log.info("error feedback: no verdict on the update(s) of round(s) %s; counted as delivered", forgotten)
        return forgotten

    def settle(self, delivered: Iterable[int], lost: Iterable[int]) -> list[int]:
        """The BS aggregated the updates of ``delivered`` (dropped) and closed ``lost`` without them (folded back
        into the residual, to go out with the next update; one with a non-finite value is dropped instead); rounds
        not pending are ignored. Returns the rounds folded back."""
        for r in delivered:
            self.pending.pop(r, None)
            self.before.pop(r, None)
        folded = []
        for r in sorted(set(lost)):
            sent = self.pending.pop(r, None)
            self.before.pop(r, None)
            if sent is None:
                continue
            if not all(bool(torch.isfinite(v).all()) for v in sent.values()):  # would poison every later update
                log.warning("error feedback: the lost update of round %d has non-finite values; not folded back", r)
                continue
            for key, value in sent.items():
                self.add(key, value)
            folded.append(r)
        return folded

    def rollback(self, round_idx: int) -> list[int]:
        """Undo every round >= ``round_idx`` (a resumed BS plans it again, and never aggregated what was sent in
        it): the residual goes back to what it was before the earliest of them, and their updates are dropped.
        Returns the rounds undone. Without a saved residual (none held) the updates are dropped alone."""
        undone = sorted(r for r in self.pending if r >= round_idx)
        if not undone:
            return []
        before = self.before.get(undone[0])
        if before is not None:
            self.residual = {k: v.clone() for k, v in before.items()}
        else:
            log.warning("error feedback: no residual saved before round %d; its update is dropped", undone[0])
        for r in undone:
            del self.pending[r]
            self.before.pop(r, None)
        return undone

    def pending_norm(self) -> float:
        """Frobenius norm of everything sent but not yet known to be aggregated."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for sent in self.pending.values() for t in sent.values()))

    def reset(self) -> None:
        self.residual.clear()
        self.pending.clear()
        self.before.clear()


def _rank(value: torch.Tensor, axis: int | None) -> int:
    return value.shape[axis] if axis is not None else 0
