"""Replay a run's recorded rounds into a controller and print the plans it makes, to compare policies or versions.

    .venv/bin/python benchmarks/controller_replay.py runs/compare-x/lyapunov                  # plans as JSON
    .venv/bin/python benchmarks/controller_replay.py runs/compare-x/lyapunov --policy tsfa    # another policy
    .venv/bin/python benchmarks/controller_replay.py runs/compare-x/lyapunov --diff            # vs. the recorded plans
    .venv/bin/python benchmarks/controller_replay.py OLD_RUN --diff --set devices.validation_fraction=0

The controller is built from the run folder's own experiment.yaml and bench.yaml; each round it decides on the
devices the record lists, then observes the *recorded* round (the measurements the run made), whatever it
planned. So two controllers (two policies, or this code and an older checkout running the same script) see the
same history, and their plans differ only by what they predict. After the first plan that differs from the
recording, later observations no longer follow from the plans: compare round by round, not whole runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bs_node.controllers import make_controller  # noqa: E402
from bs_node.global_model import GlobalModel  # noqa: E402
from bs_node.measurements import DeviceRound, RoundRecord  # noqa: E402
from bs_node.rounds.planning import round_state  # noqa: E402
from bs_node.rounds.ports import EdgeInfo  # noqa: E402
from config import load_bench, load_experiment  # noqa: E402

PLAN_FIELDS = ("participate", "rank", "depth", "tx_power_dbm", "bandwidth_hz", "modulation", "keep_fraction")


def replay(run_dir: Path, policy: str | None, overrides: list[str]) -> list[dict[int, dict[str, Any]]]:
    """The plans of each recorded round, as the controller makes them given the recorded history."""
    overrides = overrides + ([f"controller.policy={policy}"] if policy else [])
    exp = load_experiment(run_dir / "experiment.yaml", overrides)
    bench = load_bench(run_dir / "bench.yaml")
    model = GlobalModel(exp)
    controller = make_controller(exp, bench)
    rows = set(DeviceRound.__dataclass_fields__)
    delivered: dict[int, int] = {}
    out = []
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ids = sorted(d["device_id"] for d in rec["devices"])
        ready = [EdgeInfo(k, "") for k in ids]
        state = round_state(rec["round"], ready, bench, exp, model, delivered)
        plans = controller.decide(state)
        out.append({k: {f: getattr(p, f) for f in PLAN_FIELDS} for k, p in sorted(plans.items())})
        devices = [DeviceRound(**{k: v for k, v in d.items() if k in rows}) for d in rec["devices"]]
        controller.observe(
            RoundRecord(
                round=rec["round"],
                accuracy=rec["accuracy"],
                eval_loss=rec["eval_loss"],
                wall_s=rec["wall_s"],
                policy=rec["policy"],
                downlink_bytes=rec["downlink_bytes"],
                devices=devices,
                controller=rec.get("controller", {}),
                stale_updates={int(k): v for k, v in rec.get("stale_updates", {}).items()},
                aggregation=_with_device_keys(rec.get("aggregation", {})),
            )
        )
        for d in devices:
            delivered[d.device_id] = delivered.get(d.device_id, 0) + (d.status == "ok")
    return out


def recorded(run_dir: Path) -> list[dict[int, dict[str, Any]]]:
    """The plans the run itself made (a device not taking part has only `participate`)."""
    out = []
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        rec = json.loads(line)
        plans = {}
        for d in rec["devices"]:
            plans[d["device_id"]] = {"participate": d["participated"], **{f: d[f] for f in PLAN_FIELDS[1:]}}
        out.append(plans)
    return out


def differences(a: list[dict[int, dict[str, Any]]], b: list[dict[int, dict[str, Any]]]) -> list[str]:
    """Round and device of every plan that differs (plans of devices sitting out are equal whatever their fields)."""
    lines = []
    for r, (pa, pb) in enumerate(zip(a, b), 1):
        for k in sorted(set(pa) | set(pb)):
            x, y = pa.get(k, {}), pb.get(k, {})
            if x.get("participate") != y.get("participate") or (x.get("participate") and x != y):
                lines.append(f"round {r} device {k}: {x} != {y}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (rounds.jsonl, experiment.yaml, bench.yaml)")
    parser.add_argument("--policy", help="replay with this policy instead of the run's own")
    parser.add_argument("--diff", action="store_true", help="list the plans that differ from the recorded ones")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="experiment override, e.g. devices.validation_fraction=0 for a run made before the hold-out existed",
    )
    args = parser.parse_args(argv)
    plans = replay(args.run_dir, args.policy, args.overrides)
    if args.diff:
        lines = differences(plans, recorded(args.run_dir))
        print("\n".join(lines) if lines else "every plan equals the recorded one")
    else:
        print(json.dumps([{str(k): p for k, p in r.items()} for r in plans]))
    return 0


def _with_device_keys(aggregation: dict) -> dict:
    """JSON made the per-device maps' keys strings (e.g. HetLoRA's tail_share); the controllers use ints."""
    return {k: ({int(d): x for d, x in v.items()} if k == "tail_share" else v) for k, v in aggregation.items()}


if __name__ == "__main__":
    sys.exit(main())
