"""Encode/decode speed of the update codec on a MiniLM-sized rank-8 update, next to torch.save/torch.load.

    .venv/bin/python benchmarks/codec_throughput.py [--min-time 0.5] [--threads 1] [--step-seconds S]

The update has all-MiniLM-L6-v2's LoRA layout (6 layers x query/value, A 8x384, B 384x8: 73,728 values,
plus the 2-class head); values are N(0, 0.02^2), the spread of a real 20-step delta at lr 5e-3 (random
mantissas compress like real ones: deflate saves ~8 % on both).  Cases: dense fp16, dense fp32, and SOFT at
keep 0.25 (2 of 8 components per module, kept masks), each raw and deflated (compress="always").  The
baseline serialises the same values -- the dense tensors, or the kept slices plus the bool masks -- with
torch.save into a BytesIO and reads them back with torch.load(weights_only=True).  Decoding is timed
with `expected_shapes`, as the BS does.

MB/s is megabytes (10^6) of *encoded update* per second; ratio = torch time / codec time (> 1: the codec is
faster).  The last block compares one encode + decode with the time of one federated round on the edge
(local steps x the time of one training step, measured here unless --step-seconds is given).  The machine
is shared: absolute numbers move between runs; compare within one run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedlora.lora import AdapterState, ModuleSpec  # noqa: E402
from proto.codec import decode_update, encode_update, expected_shapes  # noqa: E402

RANK, HIDDEN, LAYERS = 8, 384, 6
SPEC = ModuleSpec(RANK, LAYERS)


@dataclass
class Case:
    name: str
    dtype: str
    kept: dict[str, torch.Tensor] | None
    compress: str


@dataclass
class Timing:
    size: int
    encode_s: float
    decode_s: float


def minilm_update(seed: int = 0) -> AdapterState:
    """Same keys and shapes as a MiniLM rank-8 q/v view with the classifier head."""
    g = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for layer in range(LAYERS):
        for mod in ("query", "value"):
            base = f"bert.encoder.layer.{layer}.attention.self.{mod}"
            state[f"{base}.lora_A"] = torch.randn(RANK, HIDDEN, generator=g) * 0.02
            state[f"{base}.lora_B"] = torch.randn(HIDDEN, RANK, generator=g) * 0.02
    state["head.classifier.weight"] = torch.randn(2, HIDDEN, generator=g) * 0.02
    state["head.classifier.bias"] = torch.randn(2, generator=g) * 0.02
    return state


def soft_masks(state: AdapterState, keep: int) -> dict[str, torch.Tensor]:
    """Top-`keep` components per module by ||b_i|| ||a_i|| (SOFT's score on this synthetic update)."""
    masks = {}
    for key in state:
        if key.endswith(".lora_A"):
            path = key[: -len(".lora_A")]
            score = state[key].norm(dim=1) * state[path + ".lora_B"].norm(dim=0)
            mask = torch.zeros(RANK, dtype=torch.bool)
            mask[score.topk(keep).indices] = True
            masks[path] = mask
    return masks


def sent_tensors(state: AdapterState, case: Case) -> dict[str, torch.Tensor]:
    """What torch.save gets: the values that travel, in the case's dtype, plus the masks."""
    dtype = torch.float16 if case.dtype == "fp16" else torch.float32
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        path, _, leaf = key.rpartition(".")
        mask = case.kept.get(path) if case.kept else None
        if mask is not None:
            value = value[mask] if leaf == "lora_A" else value[:, mask]
            out[path + ".kept"] = mask
        out[key] = value.to(dtype).contiguous()
    return out


def best_time(fn: Callable[[], object], min_time: float) -> float:
    """Best per-call time over repeats of a loop that runs at least `min_time / 5` seconds."""
    n, t = 1, 0.0
    while True:  # calibrate
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time / 5:
            break
        n *= 2
    best = t / n
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def time_codec(state: AdapterState, case: Case, min_time: float) -> Timing:
    shapes = expected_shapes(state)

    def enc() -> bytes:
        return encode_update(
            state, spec=SPEC, round_idx=1, device_id=0, dtype=case.dtype, kept=case.kept, compress=case.compress
        )

    data = enc()
    return Timing(
        len(data), best_time(enc, min_time), best_time(lambda: decode_update(data, expected_shapes=shapes), min_time)
    )


def time_torch(tensors: dict[str, torch.Tensor], min_time: float) -> Timing:
    def enc() -> bytes:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return buf.getvalue()

    data = enc()
    return Timing(
        len(data),
        best_time(enc, min_time),
        best_time(lambda: torch.load(io.BytesIO(data), weights_only=True), min_time),
    )


def measure_step_seconds(steps: int = 3) -> float:
    """Mean time of one real local training step (MiniLM, rank 8, all 6 layers, batch 16) after a warm-up."""
    from fedlora.lora import GlobalAdapter, LocalModel
    from fedlora.models import ModelConfig, build_backbone, load_tokenizer
    from fedlora.tasks import load_task
    from fedlora.training import TrainConfig, train_local

    cfg = ModelConfig()
    task = load_task("rotten_tomatoes", test_size=100, seed=0, max_train=2000)
    backbone = build_backbone(cfg, task.num_labels, 0, task=task.name)
    local = LocalModel(backbone, cfg, cache_size=1)
    local.load(SPEC, GlobalAdapter(backbone, cfg, 0).view(SPEC))
    tokenizer = load_tokenizer(cfg)
    train_local(local.model, tokenizer, task.train, TrainConfig(local_steps=1, lr=5e-3))
    stats = train_local(local.model, tokenizer, task.train, TrainConfig(local_steps=steps, lr=5e-3, seed=1))
    return stats.wall_s / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the codec itself is single-threaded)")
    p.add_argument("--local-steps", type=int, default=20, help="local steps per round, for the round time")
    p.add_argument("--step-seconds", type=float, help="time of one local step (default: measure it, ~15 s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    state = minilm_update()
    masks = soft_masks(state, keep=RANK // 4)
    cases = [
        Case("dense fp16", "fp16", None, "never"),
        Case("dense fp16 + deflate", "fp16", None, "always"),
        Case("dense fp32", "fp32", None, "never"),
        Case("dense fp32 + deflate", "fp32", None, "always"),
        Case("soft 0.25 fp16", "fp16", masks, "never"),
        Case("soft 0.25 fp16 + deflate", "fp16", masks, "always"),
    ]
    n_values = sum(v.numel() for v in state.values())
    print(
        f"MiniLM rank-{RANK} q/v update, {LAYERS} layers: {n_values} values ({4 * n_values} B as fp32); "
        f"best of 5, >= {args.min_time:g} s per measurement, {args.threads} torch thread(s)\n"
    )
    head = (
        f"{'case':<26} {'bytes':>7} {'enc ms':>7} {'enc MB/s':>9} {'dec ms':>7} {'dec MB/s':>9} | "
        f"{'torch B':>7} {'save ms':>7} {'load ms':>7} | {'enc x':>6} {'dec x':>6}"
    )
    print(head)
    print("-" * len(head))
    round_trip = {}
    for case in cases:
        c = time_codec(state, case, args.min_time)
        t = time_torch(sent_tensors(state, case), args.min_time)
        round_trip[case.name] = c.encode_s + c.decode_s
        print(
            f"{case.name:<26} {c.size:7d} {1e3 * c.encode_s:7.2f} {c.size / c.encode_s / 1e6:9.1f} "
            f"{1e3 * c.decode_s:7.2f} {c.size / c.decode_s / 1e6:9.1f} | {t.size:7d} {1e3 * t.encode_s:7.2f} "
            f"{1e3 * t.decode_s:7.2f} | {t.encode_s / c.encode_s:6.2f} {t.decode_s / c.decode_s:6.2f}"
        )
    print("enc x / dec x = torch.save / torch.load time divided by the codec's (> 1: the codec is faster)\n")

    if args.step_seconds is None:
        print("measuring one local training step (MiniLM, batch 16)...", flush=True)
        step_s, how = measure_step_seconds(), "measured"
    else:
        step_s, how = args.step_seconds, "given"
    round_s = args.local_steps * step_s
    print(f"one local step: {step_s:.3f} s ({how}); one round of {args.local_steps} local steps: {round_s:.1f} s")
    for name, s in round_trip.items():
        print(f"  {name:<26} encode + decode {1e3 * s:7.2f} ms = {100 * s / round_s:6.3f} % of the round's training")


if __name__ == "__main__":
    main()
