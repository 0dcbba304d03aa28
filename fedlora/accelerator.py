"""Where a model runs (``model.device: auto | cpu | cuda[:N]``), mixed precision on a GPU, and a GPU's energy.

``auto`` takes the first CUDA device when torch sees one, else the CPU; naming CUDA where there is none is an
error, not a silent CPU run. On a GPU the forward passes run under autocast (bf16 where the GPU has it, else fp16
with a gradient scaler); LoRA values still travel as the codec's dtype, and the adapter is exchanged on the CPU.
A GPU's energy is read from NVML's total-energy counter (``nvidia-ml-py``), so a figure says where it came from.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``model.device``; ValueError naming the setting when it cannot be had here."""
    if not DEVICE_RE.match(spec):
        raise ValueError(f"model.device = {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda:0" if has_cuda else "cpu")
    if not has_cuda:
        raise ValueError(
            f"model.device = {spec!r}: torch {torch.__version__} sees no CUDA device here "
            "(set model.device: auto or cpu, or install a CUDA build of torch on a GPU host)"
        )
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"model.device = {spec!r}: this host has {count} CUDA device(s), 0..{count - 1}")
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The GPU's mixed-precision dtype (bf16 where supported, else fp16); None on the CPU (full fp32)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    dtype = autocast_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device) -> Any:
    """A gradient scaler for fp16 autocast (bf16 and fp32 need none); None where not needed."""
    if autocast_dtype(device) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


class GpuEnergy:
    """Joules a GPU used between ``start`` and ``stop``, from NVML's total-energy counter (millijoules since the
    driver loaded). ``available`` is False where NVML or the counter is missing: the figure is then not measured."""

    def __init__(self, index: int):
        self.index = index
        self._handle: Any = None
        self._nvml: Any = None
        self._start_mj: int | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # older GPUs lack the counter
            self._nvml = pynvml
        except Exception:  # NVML missing, no driver, or no counter: say so in the source, never stop a round
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def start(self) -> None:
        self._start_mj = self._read_mj()

    def stop(self) -> float | None:
        end = self._read_mj()
        if self._start_mj is None or end is None:
            return None
        return max(end - self._start_mj, 0) / 1000.0

    def _read_mj(self) -> int | None:
        if self._nvml is None:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None
