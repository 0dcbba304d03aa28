"""The centralized ceiling: the same model, LoRA, data and budget of examples in one process, no federation.

    .venv/bin/python benchmarks/centralized_ceiling.py                         # the default experiment, seeds 0 1 2
    .venv/bin/python benchmarks/centralized_ceiling.py --lrs 1e-3 3e-4 --out results/ceiling/default.json
    .venv/bin/python benchmarks/centralized_ceiling.py --set training.local_steps=8 --seeds 0 1 2 --out ceiling.json

What it trains on is the union of the devices' training parts (their held-out validation parts stay out, as in
the federation); the adapter is the global one (rank `model.max_rank`, every layer, the head). It takes as many
AdamW steps of `training.batch_size` examples as the whole federation would at full participation, `round.rounds`
x `devices.count` x `training.local_steps`, and evaluates on validation after every `devices.count x local_steps`
of them (one "round"). With `--lrs`, each learning rate is a run, and the (lr, round) of best validation accuracy
is chosen per seed: the reported number is the test accuracy of that round's adapter (the test set is read only
there and at the end of each run), beside the chosen run's last; over seeds, mean and 95 % CI (sweep.stats). A
learning rate tuned for 25 local steps between averaging can diverge over hundreds of sequential steps, so a
ceiling taken at the federated lr alone is no ceiling. No label-skew correction: the pooled data is not skewed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from config import load_experiment  # noqa: E402
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec  # noqa: E402
from fedlora.models import build_backbone, load_tokenizer, num_layers  # noqa: E402
from fedlora.partition import device_splits, validation_union  # noqa: E402
from fedlora.tasks import load_task  # noqa: E402
from fedlora.training import evaluate, train_local  # noqa: E402
from sweep.stats import estimate  # noqa: E402


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    """Every learning rate of args.lrs on this seed's data; the (lr, round) of best validation accuracy is chosen."""
    exp = load_experiment(args.experiment, [*args.overrides, f"seed={seed}"])
    task = load_task(
        exp.task.name, exp.task.path, test_size=exp.task.test_size, seed=seed, max_train=exp.task.max_train
    )
    splits = device_splits([ex.label for ex in task.train], exp.devices, seed)
    train = [task.train[i] for split in splits for i in split.train]
    validation = [task.train[i] for i in validation_union(splits, exp.task.max_validation, seed=seed)]
    tokenizer = load_tokenizer(exp.model)
    steps_per_round = exp.devices.count * exp.training.local_steps
    runs = []
    for lr in args.lrs or [exp.training.lr]:
        backbone = build_backbone(exp.model, task.num_labels, seed, task=task.name)
        adapter = GlobalAdapter(backbone, exp.model, seed)
        local = LocalModel(backbone, exp.model)
        spec = ModuleSpec(adapter.max_rank, num_layers(backbone))
        local.load(spec, adapter.view(spec))
        trainable = {n: p for n, p in local.model.named_parameters() if p.requires_grad}
        curve, best, best_state = [], -1.0, {}
        t0 = time.perf_counter()
        for r in range(1, exp.round.rounds + 1):
            cfg = exp.training.model_copy(
                update={"lr": lr, "local_steps": steps_per_round, "seed": seed * 1000 + r, "logit_adjustment": 0.0}
            )
            stats = train_local(local.model, tokenizer, train, cfg)
            val = evaluate(local.model, tokenizer, validation, max_length=exp.model.max_length)
            curve.append({"round": r, "val_accuracy": val["accuracy"], "loss": stats.mean_loss})
            if val["accuracy"] > best:  # the earliest round of best validation accuracy
                best = val["accuracy"]
                best_state = {n: p.detach().clone() for n, p in trainable.items()}
            print(
                f"seed {seed} lr {lr:g} round {r}: loss {stats.mean_loss:.3f}, validation {val['accuracy']:.1%} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        # the test set is read twice per lr: at the end, and with the best-validation round's adapter put back
        final = evaluate(local.model, tokenizer, task.test, max_length=exp.model.max_length)["accuracy"]
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
        selected = evaluate(local.model, tokenizer, task.test, max_length=exp.model.max_length)["accuracy"]
        best_round = next(c["round"] for c in curve if c["val_accuracy"] == best)
        print(f"seed {seed} lr {lr:g}: test {final:.1%} at the end, {selected:.1%} at round {best_round}", flush=True)
        runs.append(
            {
                "lr": lr,
                "curve": curve,
                "best_val_accuracy": best,
                "selected_round": best_round,
                "selected_accuracy": selected,
                "final_accuracy": final,
            }
        )
    chosen = max(runs, key=lambda run: run["best_val_accuracy"])  # ties: the first lr given
    return {
        "seed": seed,
        "train_examples": len(train),
        "steps": steps_per_round * exp.round.rounds,
        "chosen_lr": chosen["lr"],
        "selected_round": chosen["selected_round"],
        "selected_accuracy": chosen["selected_accuracy"],
        "final_accuracy": chosen["final_accuracy"],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="experiment YAML (default: experiments/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates to choose from on validation (default: the experiment's)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the per-seed results and the summary as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [one_seed(args, s) for s in args.seeds]
    summary = {}
    for metric in ("selected_accuracy", "final_accuracy"):
        e = estimate([r[metric] for r in results])
        summary[metric] = {"mean": e.mean, "ci95": e.ci95, "n": e.n}
        print(f"{metric}: {e.mean:.1%} ± {e.ci95:.1%} (95 % CI, {e.n} seeds)")
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": results, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
