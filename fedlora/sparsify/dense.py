"""Dense baselines: every component of every module goes out (kept=None), in fp32 or fp16.

They are the reference points for bytes and accuracy, so ``keep_fraction`` is validated but ignored.
Nothing is withheld, so their residual holds only what was lost: with ``error_feedback`` on, an update the
BS closed its round without is folded back and goes out with the next one (``fedlora.sparsify.feedback``).
fp16 rounding is the codec's business and the same for every method that uses fp16.
"""

from __future__ import annotations

from fedlora.lora import AdapterState, ModuleSpec
from fedlora.sparsify.base import SparseUpdate, Sparsifier


class DenseSparsifier(Sparsifier):
    """Send the whole delta (plus whatever of earlier updates was lost); ``dtype`` chooses the value width."""

    name = "dense"

    def _select(
        self,
        delta: AdapterState,
        trained: AdapterState,
        spec: ModuleSpec,
        keep_fraction: float,
        pairs: dict[str, tuple[str, str]],
        round_idx: int,
    ) -> SparseUpdate:
        total = sum(delta[ka].shape[0] for ka, _ in pairs.values())
        out = {k: self.sent_all(k, self.with_residual(k, v)) for k, v in delta.items()}
        return SparseUpdate(out, None, self.dtype, {"kept_components": total, "total_components": total})


class DenseFp32(DenseSparsifier):
    name = "dense_fp32"

    def __init__(self, error_feedback: bool = True) -> None:
        super().__init__("fp32", error_feedback)


class DenseFp16(DenseSparsifier):
    name = "dense_fp16"

    def __init__(self, error_feedback: bool = True) -> None:
        super().__init__("fp16", error_feedback)
