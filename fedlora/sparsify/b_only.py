"""FFA-LoRA style baseline: A stays frozen at its (seeded, shared) initialisation; train and send B + head.

``freeze_a`` (called through ``prepare_model`` before training) sets requires_grad=False on every
lora_A weight, so the optimiser never touches A and delta_A is exactly 0.  ``sparsify`` enforces that:
A deltas are replaced by zeros whatever the model did.  No regulariser, no error feedback (nothing is
withheld); ``keep_fraction`` is validated but ignored -- this is a dense baseline.

Bytes: the codec has no way to say "this tensor is all zero" yet, so the zero A tensors still travel
as values (see the report / docs/soft.md for the one-entry-kind codec change that removes them).
"""

from __future__ import annotations

import torch

from fedlora.lora import AdapterState, ModuleSpec
from fedlora.sparsify.base import SparseUpdate, Sparsifier, check_keep_fraction, lora_pairs


def freeze_a(model: torch.nn.Module) -> int:
    """requires_grad=False on every peft lora_A weight of ``model``; returns how many were frozen."""
    n = 0
    for mod in model.modules():
        la = getattr(mod, "lora_A", None)
        if isinstance(la, torch.nn.ModuleDict):
            for sub in la.values():
                for p in sub.parameters():
                    p.requires_grad_(False)
                    n += 1
    if n == 0:
        raise ValueError("freeze_a: the model has no peft LoRA layers")
    return n


class BOnlySparsifier(Sparsifier):
    name = "b_only"

    def prepare_model(self, model: torch.nn.Module) -> None:
        freeze_a(model)

    def sparsify(
        self,
        delta: AdapterState,
        trained: AdapterState,
        spec: ModuleSpec,
        keep_fraction: float,
        *,
        round_idx: int | None = None,
    ) -> SparseUpdate:
        check_keep_fraction(keep_fraction)
        pairs = lora_pairs(delta, spec)
        a_keys = {ka for ka, _ in pairs.values()}
        out = {
            k: (torch.zeros_like(v, dtype=torch.float32) if k in a_keys else v.detach().float().clone())
            for k, v in delta.items()
        }
        total = spec.rank * len(pairs)
        return SparseUpdate(
            out, None, self.dtype, {"kept_components": total, "total_components": total, "residual_norm": 0.0}
        )
