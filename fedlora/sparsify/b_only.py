"""FFA-LoRA style baseline: A stays frozen at its (seeded, shared) initialisation; train and send B + head.

``freeze_a`` (called through ``prepare_model`` before training) sets requires_grad=False on every
lora_A weight, so the optimiser never touches A and delta_A is exactly 0.  ``sparsify`` enforces that:
A deltas are replaced by zeros whatever the model did (and A has no residual).  No regulariser;
``keep_fraction`` is validated but ignored -- this is a dense baseline.  Nothing is withheld, so with
``error_feedback`` on the residual holds only B and head of updates the BS closed its round without,
folded back to go out with the next update (``fedlora.sparsify.feedback``).

Bytes: the codec writes an all-zero tensor as a zero entry (kind 2), so the frozen A costs only its key.
"""

from __future__ import annotations

import torch

from fedlora.lora import AdapterState, ModuleSpec
from fedlora.sparsify.base import SparseUpdate, Sparsifier


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

    def _select(
        self,
        delta: AdapterState,
        trained: AdapterState,
        spec: ModuleSpec,
        keep_fraction: float,
        pairs: dict[str, tuple[str, str]],
        round_idx: int,
    ) -> SparseUpdate:
        a_keys = {ka for ka, _ in pairs.values()}
        out = {
            k: (torch.zeros_like(v, dtype=torch.float32) if k in a_keys else self.sent_all(k, self.with_residual(k, v)))
            for k, v in delta.items()
        }
        total = spec.rank * len(pairs)
        return SparseUpdate(out, None, self.dtype, {"kept_components": total, "total_components": total})
