"""Compare controller policies on heterogeneous devices: same seeds, same data split, same bench, real processes.

    .venv/bin/python benchmarks/policy_comparison.py                       # all policies, hw_configs/sim_hetero.yaml
    .venv/bin/python benchmarks/policy_comparison.py --policies fixed lyapunov --rounds 8
    .venv/bin/python benchmarks/policy_comparison.py --analyze runs/compare-20261122-060000   # table only
    .venv/bin/python benchmarks/policy_comparison.py --analyze runs/compare-a runs/compare-b  # later folders win
    .venv/bin/python benchmarks/policy_comparison.py --quick                # tiny model, 2 rounds (smoke test)

Each policy runs the full testbed (`fedlora-run`: BS and edge processes, sim PHY) into <out>/<policy>/. The
table: final accuracy, total energy and its ratio to the fixed policy, rounds to the target accuracy, and per
device the time-average energy per round against its budget (the long-term constraint). When the fixed policy
is in the table, it also gives the energy each policy had spent when it first reached the fixed policy's final
accuracy (policies may run for a different number of rounds: the budgets are per round).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launcher.main import entry_point  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("fixed", "lyapunov", "tsfa", "greedy", "random")


def run_policy(policy: str, out: Path, args: argparse.Namespace) -> None:
    cmd = [
        *entry_point("fedlora-run"),
        "--run-dir",
        str(out / policy),
        "--bench",
        args.bench,
        "--set",
        f"controller.policy={policy}",
        "--set",
        f"round.rounds={args.rounds}",
        "--set",
        f"devices.count={args.devices}",
        "--set",
        f"seed={args.seed}",
        *args.extra,
    ]
    t0 = time.monotonic()
    print(f"[{policy}] running: {' '.join(cmd[1:])}", flush=True)
    tail: list[str] = []
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # stream the live view's round lines as they come
            tail = (tail + [line])[-40:]
            if line.startswith(("round ", "run ", "edge ")):
                print(f"[{policy}] {line.rstrip()}", flush=True)
    if proc.returncode != 0:
        print("".join(tail), file=sys.stderr)
        raise SystemExit(f"[{policy}] failed with exit code {proc.returncode}")
    print(f"[{policy}] done in {time.monotonic() - t0:.0f} s", flush=True)


def summarise(run_dir: Path, target: float) -> dict:
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    bench = __import__("yaml").safe_load((run_dir / "bench.yaml").read_text())
    devices = sorted({d["device_id"] for r in rounds for d in r["devices"]})
    per_device = {}
    for k in devices:
        energy = sum(d["energy_j"] for r in rounds for d in r["devices"] if d["device_id"] == k)
        budget = bench["devices"][k % len(bench["devices"])].get("energy_budget_j")
        per_device[k] = {
            "avg_energy_j": energy / len(rounds),
            "budget_j": budget,
            "rounds_in": sum(d["status"] == "ok" for r in rounds for d in r["devices"] if d["device_id"] == k),
        }
    reached = next((r["round"] for r in rounds if r["accuracy"] is not None and r["accuracy"] >= target), None)
    spent, cumulative = 0.0, []
    for r in rounds:
        spent += sum(d["energy_j"] for d in r["devices"])
        cumulative.append(spent)
    return {
        "final_accuracy": rounds[-1]["accuracy"],
        "total_energy_j": spent,
        "accuracy_by_round": [r["accuracy"] for r in rounds],
        "energy_by_round_j": cumulative,
        "uplink_bytes": sum(d["uplink_bytes"] for r in rounds for d in r["devices"]),
        "rounds": len(rounds),
        "rounds_to_target": reached,
        "devices": per_device,
    }


def energy_to_accuracy(result: dict, accuracy: float) -> tuple[int, float] | None:
    """(round, cumulative energy J) when `result` first reached `accuracy`, or None."""
    for i, acc in enumerate(result.get("accuracy_by_round", [])):
        if acc is not None and acc >= accuracy - 1e-9:
            return i + 1, result["energy_by_round_j"][i]
    return None


def print_table(results: dict[str, dict], target: float) -> None:
    base = results.get("fixed", {}).get("total_energy_j")
    print(
        f"\n{'policy':>9} {'final acc':>9} {'energy J':>10} {'x fixed':>8} {'uplink MB':>9} "
        f"{f'rounds to {target:.0%}':>16}   per-device avg energy J/round (budget) [rounds delivered]"
    )
    for policy, r in results.items():
        ratio = f"{r['total_energy_j'] / base:8.2f}" if base else f"{'n/a':>8}"
        reached = r["rounds_to_target"] if r["rounds_to_target"] is not None else "not reached"
        devices = "  ".join(
            f"{k}:{d['avg_energy_j']:.0f}"
            + (
                f"({d['budget_j']:.0f}{'!' if d['avg_energy_j'] > 1.05 * d['budget_j'] else ''})"
                if d["budget_j"]
                else ""
            )
            + f"[{d['rounds_in']}]"
            for k, d in r["devices"].items()
        )
        print(
            f"{policy:>9} {r['final_accuracy'] * 100:8.1f}% {r['total_energy_j']:10.0f} {ratio} "
            f"{r['uplink_bytes'] / 1e6:9.2f} {str(reached):>16}   {devices}"
        )
    print("('!' marks a device whose time-average energy exceeds its budget by more than 5 %)")
    if base:
        ref = results["fixed"]["final_accuracy"]
        print(
            f"\nto the fixed policy's final accuracy ({ref:.1%}, {base:.0f} J in {results['fixed']['rounds']} rounds):"
        )
        for policy, r in results.items():
            hit = energy_to_accuracy(r, ref)
            print(
                f"{policy:>9} "
                + (
                    f"round {hit[0]:2d} of {r['rounds']}: {hit[1]:8.0f} J = {hit[1] / base:.2f} x fixed"
                    if hit
                    else f"not reached in {r['rounds']} rounds"
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--bench", default="hw_configs/sim_hetero.yaml")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.74, help="accuracy for 'rounds to target'")
    parser.add_argument("--out", help="parent folder of the runs (default: runs/compare-<time>)")
    parser.add_argument(
        "--analyze",
        nargs="+",
        metavar="FOLDER",
        help="only print the table of earlier comparison folders (a policy in a later one wins)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: checks the machinery only")
    parser.add_argument("--set", dest="extra_sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.extra = [x for s in args.extra_sets for x in ("--set", s)]
    if args.quick:
        args.rounds = 2
        args.extra += [
            "--set",
            "model.name_or_path=tiny",
            "--set",
            "task.test_size=100",
            "--set",
            "task.max_train=600",
            "--set",
            "training.local_steps=3",
            "--set",
            "round.heartbeat_s=0.5",
        ]
    if args.analyze:
        folders = [Path(a) for a in args.analyze]
        out = folders[-1]
        where = {p: f / p for f in folders for p in POLICIES if (f / p / "rounds.jsonl").exists()}
        policies = [p for p in POLICIES if p in where]
    else:
        out = Path(args.out or REPO / "runs" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        policies = args.policies
        for policy in policies:
            run_policy(policy, out, args)
        where = {p: out / p for p in policies}
    results = {p: summarise(where[p], args.target) for p in policies}
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    print_table(results, args.target)
    print(f"\nruns and comparison.json in {out}")


if __name__ == "__main__":
    main()
