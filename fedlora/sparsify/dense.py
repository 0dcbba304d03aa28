"""Dense baselines: every component of every module goes out (kept=None), in fp32 or fp16.

They are the reference points for bytes and accuracy, so ``keep_fraction`` is validated but ignored
and there is no error feedback (nothing is withheld; fp16 rounding is the codec's business and the
same for every method that uses fp16).
"""

from __future__ import annotations

from fedlora.lora import AdapterState, ModuleSpec
from fedlora.sparsify.base import SparseUpdate, Sparsifier, check_keep_fraction, lora_pairs


class DenseSparsifier(Sparsifier):
    """Send the whole delta; ``dtype`` chooses the value width."""

    name = "dense"

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
        total = sum(delta[ka].shape[0] for ka, _ in pairs.values())
        out = {k: v.detach().float().clone() for k, v in delta.items()}
        return SparseUpdate(
            out, None, self.dtype, {"kept_components": total, "total_components": total, "residual_norm": 0.0}
        )


class DenseFp32(DenseSparsifier):
    name = "dense_fp32"

    def __init__(self) -> None:
        super().__init__("fp32")


class DenseFp16(DenseSparsifier):
    name = "dense_fp16"

    def __init__(self) -> None:
        super().__init__("fp16")
