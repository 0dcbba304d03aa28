"""Bytes on the air vs held-out accuracy of every update sparsifier, same seeds, same data, same rounds.

    .venv/bin/python benchmarks/sparsify_accuracy.py [--devices 6] [--rounds 4] [--local-steps 20] \
        [--methods dense_fp32,dense_fp16,soft,topk,randomk,b_only] [--keep-fractions 0.125,0.25] \
        [--test-size 500] [--threads 2] [--out results.json|results.csv] [--quick]

One process, no sockets: each round, every device in turn runs the edge's real code path --
global.view(spec) -> LocalModel.load -> sparsifier.prepare_model -> train_local(regularizer=...) -> delta ->
sparsifier.sparsify -> encode_update -> decode_update (the BS's checks) -> ClientUpdate -- then the BS
aggregates, applies and evaluates the global adapter on the balanced Rotten Tomatoes test set.  Every
method starts from the same global adapter (same seed), trains on the same Dirichlet split with the same
per-(round, device) training seeds, so the methods differ only in what the sparsifier sends.

--methods: comma-separated `name[@keep_fraction][:option=value...]`, e.g. `soft@0.125:lam=0:score=update`.
A component method (soft, topk, randomk) without `@` runs once per --keep-fractions value; dense methods and
b_only ignore keep_fraction.  Options go to `make_sparsifier` (soft: lam, score, normalize; error_feedback).

Bytes: "update" is the encoded update (codec v2, --compress auto by default); "on air" adds the data-plane
frame overhead (20 bytes per frame of --frame-payload bytes).  Averaged over devices and rounds (every
device sends every round).  Defaults take ~35 min on 2 free cores (one local step of MiniLM ~0.45 s);
--quick runs a tiny random BERT for 2 rounds (seconds; exercises the pipeline, its accuracy means nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.sparsify_results import Result, load_results, table, write_out  # noqa: E402
from config import ModelConfig, TrainConfig  # noqa: E402
from fedlora.aggregation import ClientUpdate, aggregate  # noqa: E402
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec  # noqa: E402
from fedlora.models import build_backbone, load_tokenizer, num_layers  # noqa: E402
from fedlora.partition import dirichlet_split  # noqa: E402
from fedlora.sparsify import SPARSIFIERS, make_sparsifier  # noqa: E402
from fedlora.tasks import Example, load_task  # noqa: E402
from fedlora.training import evaluate, train_local  # noqa: E402
from proto.codec import decode_update, encode_update, expected_shapes  # noqa: E402
from proto.framing import frame_overhead_bytes  # noqa: E402

COMPONENT_METHODS = ("soft", "topk", "randomk")
DEFAULT_METHODS = "dense_fp32,dense_fp16,soft,topk,randomk,b_only"

# Presets; an explicit flag overrides either.
FULL = dict(devices=6, rounds=4, local_steps=20, test_size=500, max_train=None, model="embedded")
QUICK = dict(devices=6, rounds=2, local_steps=2, test_size=40, max_train=400, model="tiny")


@dataclass(frozen=True)
class Method:
    label: str  # as printed, e.g. "soft@0.125" or "soft@0.125:lam=0"
    name: str  # sparsifier name (fedlora.sparsify.SPARSIFIERS)
    keep_fraction: float
    options: tuple[tuple[str, Any], ...] = ()


@dataclass
class Settings:
    devices: int
    rounds: int
    local_steps: int
    test_size: int
    max_train: int | None
    model: str
    rank: int = 8
    lr: float = 5e-3
    logit_adjustment: float = 1.0
    batch_size: int = 16
    alpha: float = 1.0
    seed: int = 0
    dtype: str = "fp16"  # value width of the sparsifiers that do not fix their own
    compress: str = "auto"
    frame_payload: int = 1000


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def parse_methods(text: str, keep_fractions: Sequence[float]) -> list[Method]:
    """`name[@keep][:opt=value...]` items; component methods without `@` expand over `keep_fractions`."""
    methods: list[Method] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        head, *opts = item.split(":")
        name, _, keep = head.partition("@")
        if name not in SPARSIFIERS:
            raise SystemExit(f"--methods: unknown sparsifier {name!r}; known: {sorted(SPARSIFIERS)}")
        options = []
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq:
                raise SystemExit(f"--methods: option {opt!r} of {item!r} is not key=value")
            options.append((key, _parse_value(value)))
        suffix = "".join(f":{k}={v}" for k, v in options)
        if keep:
            fractions = [float(keep)]
        elif name in COMPONENT_METHODS:
            fractions = list(keep_fractions)
        else:
            fractions = [1.0]
        for kf in fractions:
            label = f"{name}@{kf:g}{suffix}" if name in COMPONENT_METHODS or keep else f"{name}{suffix}"
            methods.append(Method(label, name, kf, tuple(options)))
    if not methods:
        raise SystemExit("--methods: nothing to run")
    return methods


class Progress:
    """One line per device-round on stderr with elapsed time and an ETA from the local steps done."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.t0 = total_steps, 0, time.perf_counter()

    def step(self, steps: int, message: str) -> None:
        self.done += steps
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"[{_clock(elapsed)} ETA {_clock(eta)}] {message}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def on_air(update_bytes: int, frame_payload: int) -> int:
    return update_bytes + frame_overhead_bytes(sealed=True) * math.ceil(update_bytes / frame_payload)


class Experiment:
    """What every method shares: data split, backbone, tokenizer, test set, initial accuracy."""

    def __init__(self, s: Settings):
        self.s = s
        task = load_task("rotten_tomatoes", test_size=s.test_size, seed=s.seed, max_train=s.max_train)
        self.test = task.test
        parts = dirichlet_split([e.label for e in task.train], s.devices, s.alpha, s.seed)
        self.shards: list[list[Example]] = [[task.train[i] for i in p] for p in parts]
        self.cfg = ModelConfig(name_or_path=s.model, max_rank=s.rank)
        self.backbone = build_backbone(self.cfg, task.num_labels, s.seed, task=task.name)
        self.tokenizer = load_tokenizer(self.cfg)
        self.spec = ModuleSpec(s.rank, num_layers(self.backbone))
        self.initial_accuracy: float | None = None

    def train_config(self, round_idx: int, device: int) -> TrainConfig:
        """Same seed for the same (round, device) in every method -- the edge's formula (edge_node/node.py),
        so a dense run reproduces the testbed's."""
        return TrainConfig(
            local_steps=self.s.local_steps,
            batch_size=self.s.batch_size,
            lr=self.s.lr,
            logit_adjustment=self.s.logit_adjustment,
            max_length=self.cfg.max_length,
            seed=self.s.seed * 100003 + round_idx * 101 + device,
        )

    def evaluate(self, local: LocalModel, adapter: GlobalAdapter) -> float:
        local.load(self.spec, adapter.view(self.spec))
        return evaluate(local.model, self.tokenizer, self.test, max_length=self.cfg.max_length)["accuracy"]

    def run(self, method: Method, progress: Progress) -> Result:
        s, spec = self.s, self.spec
        t0 = time.perf_counter()
        adapter = GlobalAdapter(self.backbone, self.cfg, s.seed)
        local = LocalModel(self.backbone, self.cfg, cache_size=1)  # fresh: b_only's freeze must not leak
        sparsifiers = [
            make_sparsifier(method.name, dtype=s.dtype, seed=s.seed, device_id=d, **dict(method.options))
            for d in range(s.devices)
        ]
        if self.initial_accuracy is None:  # identical for every method: same seed, same adapter
            self.initial_accuracy = self.evaluate(local, adapter)
        result = Result(
            method.label,
            method.name,
            method.keep_fraction,
            dict(method.options),
            0.0,
            0.0,
            0.0,
            [self.initial_accuracy],
        )
        sizes: list[int] = []
        sent = held = 0
        for r in range(1, s.rounds + 1):
            updates, losses = [], []
            for d, sp in enumerate(sparsifiers):
                view = adapter.view(spec)
                local.load(spec, view)
                sp.prepare_model(local.model)
                stats = train_local(
                    local.model, self.tokenizer, self.shards[d], self.train_config(r, d), regularizer=sp.regularizer()
                )
                trained = local.state()
                delta = {k: trained[k] - view[k] for k in view}
                up = sp.sparsify(delta, trained, spec, method.keep_fraction, round_idx=r)
                data = encode_update(
                    up.delta, spec=spec, round_idx=r, device_id=d, dtype=up.dtype, kept=up.kept, compress=s.compress
                )
                dec = decode_update(data, expected_shapes=expected_shapes(view))
                updates.append(ClientUpdate(spec, dec.state, weight=float(len(self.shards[d])), kept=dec.kept or None))
                sizes.append(len(data))
                losses.append(stats.mean_loss)
                sent += int(up.info.get("kept_components", 0))
                held += int(up.info.get("total_components", 0))
                progress.step(
                    s.local_steps,
                    f"{method.label}: round {r}/{s.rounds} device {d + 1}/{s.devices} "
                    f"loss {stats.mean_loss:.3f} update {len(data)} B",
                )
            adapter.apply(aggregate(adapter, updates))
            result.accuracy.append(self.evaluate(local, adapter))
            result.train_loss.append(sum(losses) / len(losses))
            print(f"  {method.label}: round {r} accuracy {result.accuracy[-1]:.4f}", file=sys.stderr, flush=True)
        result.update_bytes = sum(sizes) / len(sizes)
        result.air_bytes = sum(on_air(n, s.frame_payload) for n in sizes) / len(sizes)
        result.kept_fraction = sent / held if held else 1.0
        result.seconds = time.perf_counter() - t0
        return result


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny random BERT, 2 rounds: checks the pipeline only")
    p.add_argument("--devices", type=int, help=f"edge devices (default {FULL['devices']})")
    p.add_argument("--rounds", type=int, help=f"federated rounds (default {FULL['rounds']}, quick {QUICK['rounds']})")
    p.add_argument("--local-steps", type=int, help=f"local steps per round (default {FULL['local_steps']})")
    p.add_argument("--test-size", type=int, help=f"balanced held-out examples (default {FULL['test_size']})")
    p.add_argument("--max-train", type=int, help="subsample the training set before splitting (default: all)")
    p.add_argument("--model", help="'embedded' (MiniLM), 'tiny' or a HF folder")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="name[@keep][:opt=value...], comma-separated")
    p.add_argument("--keep-fractions", default="0.125,0.25", help="for component methods without @")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument(
        "--logit-adjustment",
        type=float,
        default=1.0,
        help="tau of the label-skew correction in local training (fedlora.training)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label-skew concentration")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="model, adapter, split and training seeds (default 1: seed 0's 6-device split gives one "
        "device 42%% of the data at 98%% positive, and dense FedAvg stayed at chance for 3 rounds)",
    )
    p.add_argument("--compress", choices=("never", "auto", "always"), default="auto")
    p.add_argument("--frame-payload", type=int, default=1000, help="update bytes per PHY frame")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    p.add_argument("--out", type=Path, help="write results as .json or .csv")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print one table from the --out .json files of earlier runs (split runs) and exit",
    )
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    picked = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in preset.items()}
    settings = Settings(
        **picked,
        rank=args.rank,
        lr=args.lr,
        logit_adjustment=args.logit_adjustment,
        alpha=args.alpha,
        seed=args.seed,
        compress=args.compress,
        frame_payload=args.frame_payload,
    )
    return args, settings


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args, settings = parse_args(argv)
    if args.merge:
        merged_settings, results = load_results(args.merge)
        print(f"settings: {merged_settings}")
        print(table(results))
        return results
    keep = [float(x) for x in args.keep_fractions.split(",") if x.strip()]
    methods = parse_methods(args.methods, keep)
    torch.set_num_threads(args.threads)
    print(f"settings: {settings}; threads {args.threads}", file=sys.stderr, flush=True)
    exp = Experiment(settings)
    print(
        f"devices' examples: {[len(s) for s in exp.shards]}; test {len(exp.test)}; spec {exp.spec}",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(len(methods) * settings.rounds * settings.devices * settings.local_steps)
    results: list[Result] = []
    for m in methods:
        results.append(exp.run(m, progress))
        if args.out:  # keep what finished if a long run is interrupted
            write_out(args.out, settings, results)
    print(
        f"\nRotten Tomatoes, {settings.model}, {settings.devices} devices (Dirichlet α={settings.alpha}), "
        f"{settings.rounds} rounds × {settings.local_steps} local steps, rank {settings.rank}, lr {settings.lr}, "
        f"logit adjustment {settings.logit_adjustment}, test {len(exp.test)}, compress={settings.compress}, "
        f"frames of {settings.frame_payload} B"
    )
    print(table(results))
    return results


if __name__ == "__main__":
    main()
