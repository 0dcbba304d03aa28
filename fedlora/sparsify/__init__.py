"""Update sparsifiers: what part of a device's LoRA delta goes on the air (one method per module).

    sp = make_sparsifier("soft", dtype="fp16", lam=0.1, device_id=3, seed=0)   # once per edge and run
    sp.prepare_model(model); train_local(..., regularizer=sp.regularizer())     # every round
    up = sp.sparsify(delta, trained, spec, keep_fraction, round_idx=r)
    encode_update(up.delta, kept=up.kept, dtype=up.dtype, ...)
    sp.settle(delivered=[...], lost=[...])                                      # the BS's verdict on earlier rounds

Rules (score, selection, error feedback across module switches and lost updates, regulariser) are in docs/soft.md.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedlora.sparsify.b_only import BOnlySparsifier, freeze_a
from fedlora.sparsify.base import SparseUpdate, Sparsifier, check_keep_fraction, n_keep
from fedlora.sparsify.dense import DenseFp16, DenseFp32, DenseSparsifier
from fedlora.sparsify.feedback import MAX_PENDING_UPDATES, ErrorFeedback
from fedlora.sparsify.randomk import RandomKSparsifier
from fedlora.sparsify.soft import SoftSparsifier, component_scores, orthogonality_penalty, update_scores
from fedlora.sparsify.topk import TopKSparsifier, magnitude_scores

SPARSIFIERS: dict[str, type[Sparsifier]] = {
    "dense": DenseSparsifier,  # dtype from the caller (codec.uplink_dtype): today's behaviour
    "dense_fp32": DenseFp32,
    "dense_fp16": DenseFp16,
    "soft": SoftSparsifier,
    "topk": TopKSparsifier,
    "randomk": RandomKSparsifier,
    "b_only": BOnlySparsifier,
}

# What the edge knows about itself; passed to every method, silently dropped by those that do not use it
# (dense_fp32 / dense_fp16 fix their own dtype).  Every other keyword must be a parameter of the method.
CONTEXT_KWARGS = frozenset({"dtype", "seed", "device_id"})


def make_sparsifier(name: str, **kwargs: Any) -> Sparsifier:
    """Build the sparsifier called ``name``; a ValueError lists the known names or the accepted options."""
    cls = SPARSIFIERS.get(name)
    if cls is None:
        raise ValueError(f"unknown sparsifier {name!r}; known: {sorted(SPARSIFIERS)}")
    params = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
    unknown = sorted(set(kwargs) - params - CONTEXT_KWARGS)
    if unknown:
        raise ValueError(f"sparsifier {name!r}: unknown option(s) {unknown}; accepted: {sorted(params)}")
    return cls(**{k: v for k, v in kwargs.items() if k in params})


def sparsifier_from_config(codec: Any, *, seed: int, device_id: int) -> Sparsifier:
    """The edge's sparsifier from the experiment's ``codec`` section (config.CodecConfig)."""
    options = {
        "error_feedback": codec.error_feedback,
        "lam": codec.soft_lambda,
        "score": codec.soft_score,
        "normalize": codec.soft_normalize,
    }
    cls = SPARSIFIERS.get(codec.sparsifier)  # an unknown name is make_sparsifier's error to give
    accepted = set(inspect.signature(cls.__init__).parameters) if cls else set()
    kwargs = {k: v for k, v in options.items() if k in accepted}
    return make_sparsifier(codec.sparsifier, seed=seed, device_id=device_id, dtype=codec.uplink_dtype, **kwargs)


__all__ = [
    "BOnlySparsifier",
    "CONTEXT_KWARGS",
    "DenseFp16",
    "DenseFp32",
    "DenseSparsifier",
    "ErrorFeedback",
    "MAX_PENDING_UPDATES",
    "RandomKSparsifier",
    "SPARSIFIERS",
    "SoftSparsifier",
    "SparseUpdate",
    "Sparsifier",
    "TopKSparsifier",
    "check_keep_fraction",
    "component_scores",
    "freeze_a",
    "magnitude_scores",
    "make_sparsifier",
    "n_keep",
    "orthogonality_penalty",
    "sparsifier_from_config",
    "update_scores",
]
