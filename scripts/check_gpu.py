#!/usr/bin/env python3
"""Check the GPU paths for real on a GPU host: `.venv/bin/python scripts/check_gpu.py [--device cuda:0]`.

The tests exercise `model.device`, autocast and NVML energy with mocks (the lab's CI machines have no GPU); this
script runs them on the real thing: a tiny Llama causal LM with LoRA trains a few steps on the GPU under
autocast, is evaluated there, its update comes back to the CPU, and NVML's energy counter is read around the
training. It prints one line per check and exits 1 if any fails (2 if there is no GPU to check). A CUDA build of
torch is needed (scripts/install.sh installs the CPU build).
"""

from __future__ import annotations

import argparse
import sys

import torch

from config import ModelConfig
from fedlora.accelerator import GpuEnergy, autocast_dtype, resolve_device
from fedlora.energy import ComputeWindow
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
from fedlora.models import build_backbone, load_tokenizer
from fedlora.tasks import Example
from fedlora.training import TrainConfig, evaluate, train_local

DATA = [Example(t, None, y) for t, y in [("great superb film", 1), ("awful dreadful film", 0)] * 8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"check_gpu: no GPU to check: {exc}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print(f"check_gpu: {args.device} is not a CUDA device", file=sys.stderr)
        return 2
    results: list[tuple[str, bool, str]] = []
    cfg = ModelConfig(name_or_path="tiny-llama", head="lm", max_rank=4, device=args.device)
    backbone = build_backbone(cfg, 2, seed=0, task="rotten_tomatoes")
    adapter = GlobalAdapter(backbone, cfg, seed=0)
    local = LocalModel(backbone, cfg, device=device)
    spec = ModuleSpec(4, 2)
    local.load(spec, adapter.view(spec))
    on_gpu = all(p.device == device for p in local.model.parameters())
    results.append(("model on the GPU", on_gpu, str(device)))
    results.append(("autocast dtype", autocast_dtype(device) is not None, str(autocast_dtype(device))))
    tok = load_tokenizer(cfg)
    before = evaluate(local.model, tok, DATA, max_length=32)
    gpu = GpuEnergy(device.index or 0)
    with ComputeWindow(watts_per_core=0.0, gpu=gpu) as window:
        stats = train_local(local.model, tok, DATA, TrainConfig(local_steps=20, batch_size=8, lr=5e-2, max_length=32))
        torch.cuda.synchronize(device)
    after = evaluate(local.model, tok, DATA, max_length=32)
    results.append(
        ("training lowers the loss", after["loss"] < before["loss"], f"{before['loss']:.3f} -> {after['loss']:.3f}")
    )
    results.append(("finite training loss", stats.final_loss == stats.final_loss, f"{stats.final_loss:.3f}"))
    state = local.state()
    results.append(
        ("update returns to the CPU", all(t.device.type == "cpu" for t in state.values()), f"{len(state)} tensors")
    )
    result = window.result
    assert result is not None
    measured = gpu.available and result.source.endswith("+nvml")
    results.append(("NVML energy", measured, f"{result.energy_j:.3f} J ({result.source})"))
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
