"""What one edge's round costs with the offline SmolLM2-135M at LoRA rank 4, 8 and 16, side by side.

    .venv/bin/python benchmarks/llm_round_cost.py [--steps 3] [--ranks 4 8 16] [--out results/llm/round_cost.json]

Each rank runs in its own process (so peak memory is that rank's alone): load the model (converted once into the
cache, fedlora/embedded_llm.py), take `--steps` local steps of the causal-LM loss (batch 8, max_length 64, q/v of
all 30 blocks, the Rotten Tomatoes prompts), then encode the update dense fp16 and with SOFT at keep 1/8 (after
`--steps` more steps with SOFT's regulariser, as an edge would). Reported per rank: CPU-seconds per step, peak
RSS, LoRA values, update bytes (dense fp16 and SOFT), and the ratios against the first rank measured in this run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path


def one_rank(rank: int, steps: int, threads: int, queue) -> None:
    import torch

    from config import CodecConfig, ModelConfig, TrainConfig
    from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
    from fedlora.models import build_backbone, load_tokenizer, num_layers
    from fedlora.sparsify import sparsifier_from_config
    from fedlora.tasks import load_task
    from fedlora.training import train_local
    from proto.codec import encode_update

    torch.set_num_threads(threads)
    cfg = ModelConfig(name_or_path="smollm2", head="lm", max_rank=rank, lora_alpha=2.0 * rank, max_length=64)
    task = load_task("rotten_tomatoes", test_size=100, seed=0, max_train=2000)
    t0 = time.perf_counter()
    backbone = build_backbone(cfg, task.num_labels, 0, task=task.name)
    load_s = time.perf_counter() - t0
    adapter = GlobalAdapter(backbone, cfg, 0)
    spec = ModuleSpec(rank, num_layers(backbone))
    tok = load_tokenizer(cfg)
    out: dict = {"rank": rank, "load_s": load_s, "lora_values": sum(v.numel() for v in adapter.state.values())}
    for codec in (CodecConfig(sparsifier="dense_fp16"), CodecConfig(sparsifier="soft")):
        local = LocalModel(backbone, cfg, cache_size=1)
        view = adapter.view(spec)
        local.load(spec, view)
        sparsifier = sparsifier_from_config(codec, seed=0, device_id=0)
        sparsifier.prepare_model(local.model)
        train = TrainConfig(local_steps=steps, batch_size=8, lr=1e-3, max_length=64, seed=1)
        stats = train_local(local.model, tok, task.train, train, regularizer=sparsifier.regularizer())
        trained = local.state()
        delta = {k: trained[k] - view[k] for k in view}
        update = sparsifier.sparsify(delta, trained, spec, 0.125, round_idx=1)
        payload = encode_update(update.delta, spec=spec, round_idx=1, device_id=0, dtype=update.dtype, kept=update.kept)
        out[codec.sparsifier] = {"cpu_s_per_step": stats.cpu_s / steps, "update_bytes": len(payload)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for rank in args.ranks:
        queue = ctx.Queue()
        proc = ctx.Process(target=one_rank, args=(rank, args.steps, args.threads, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    base = rows[0]
    print(f"SmolLM2-135M (4-bit GGUF, dequantized), q/v LoRA on 30 blocks, batch 8 x 64 tokens, {args.steps} steps")
    print(
        f"{'rank':>4} {'LoRA values':>11} {'CPU-s/step':>10} {'x':>5} {'peak RSS MB':>11} {'dense fp16 B':>12} "
        f"{'SOFT 1/8 B':>10} {'SOFT/dense':>10} {'dense x':>7}"
    )
    for r in rows:
        dense, soft = r["dense_fp16"], r["soft"]
        print(
            f"{r['rank']:4d} {r['lora_values']:11d} {dense['cpu_s_per_step']:10.2f} "
            f"{dense['cpu_s_per_step'] / base['dense_fp16']['cpu_s_per_step']:5.2f} {r['peak_rss_mb']:11.0f} "
            f"{dense['update_bytes']:12d} {soft['update_bytes']:10d} "
            f"{soft['update_bytes'] / dense['update_bytes']:10.3f} "
            f"{dense['update_bytes'] / base['dense_fp16']['update_bytes']:7.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
