"""Decision time per round of each policy for K = 10, 100, 1000 devices, side by side with the fixed policy.

    .venv/bin/python benchmarks/controller_decision_time.py [--repeats 5] [--policies lyapunov tsfa greedy random]

Prints milliseconds per decision and the ratio to the fixed policy measured in the same run; the growth with K
shows the algorithm's complexity (linear in K for the proposed policy, see docs/controller.md). Next to the
proposed policy's figures: the goal (1 / 10 / 100 ms at K = 10 / 100 / 1000). For the policies on the
drift-plus-penalty solver (lyapunov, tsfa): the time of the reference solver
(bs_node/controllers/lyapunov_reference.py) on the same states, the speed-up, and whether both planned the
same round.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from bs_node.controllers import DeviceState, RoundState, make_controller
from bs_node.controllers.base import Controller
from bs_node.controllers.costs import ModelShape
from bs_node.controllers.lyapunov import LyapunovController
from bs_node.controllers.lyapunov_reference import reference_decide
from bs_node.measurements import DeviceRound, RoundRecord
from config import load_bench, load_experiment

SHAPE = ModelShape.from_shapes(  # MiniLM: 6 layers, hidden 384, LoRA rank 8 on query/value, 2-class head
    {
        f"bert.encoder.layer.{i}.attention.self.{m}.lora_{f}": (8, 384) if f == "A" else (384, 8)
        for i in range(6)
        for m in ("query", "value")
        for f in "AB"
    }
    | {"head.classifier.weight": (2, 384), "head.classifier.bias": (2,)},
    6,
)
GOAL_MS = {10: 1.0, 100: 10.0, 1000: 100.0}  # issue 14: the proposed (lyapunov) policy's decision time


def measured_controller(policy: str, K: int) -> tuple[Controller, RoundState]:
    """A controller of the policy after one observed round (every estimate a measured one), and the next round."""
    devices = ", ".join(f"{{distance_m: {10 + (k * 7) % 90}, energy_budget_j: 150}}" for k in range(min(K, 50)))
    bench = load_bench(None, [f"devices=[{devices}]"])
    ctrl = make_controller(load_experiment(None, [f"controller.policy={policy}"]), bench)
    state = RoundState(
        1,
        tuple(DeviceState(k, bench.device(k)) for k in range(K)),
        bench.radio.total_bandwidth_hz,
        bench.radio.max_tx_power_dbm,
        bench.radio.min_tx_power_dbm,
        8,
        6,
        25,
        SHAPE,
        {k: 1000.0 + k for k in range(K)},
    )
    rows = [
        DeviceRound(
            k,
            True,
            "ok",
            rank=8,
            depth=6,
            tx_power_dbm=10.0,
            bandwidth_hz=1e6 / K,
            modulation="qpsk",
            snr_db=30.0 - (k % 20),
            compute_s=16.0,
            train_wall_s=40.0,
            airtime_s=4.0,
            energy_j=200.0,
        )
        for k in range(K)
    ]
    ctrl.decide(state)
    ctrl.observe(RoundRecord(1, 0.7, 0.5, 60.0, policy, 0, rows))
    ctrl.decide(state)  # warm: the option grid is built once per configuration
    return ctrl, state


def timed_decisions(ctrl: Controller, state: RoundState, repeats: int, reference: bool = False) -> float:
    """Median milliseconds of one decision, each on a fresh copy of the same controller (copying not timed)."""
    times = []
    for _ in range(repeats):
        c = copy.deepcopy(ctrl)
        t0 = time.perf_counter()
        if reference:
            assert isinstance(c, LyapunovController)
            reference_decide(c, state)
        else:
            c.decide(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--policies", nargs="+", default=["lyapunov", "tsfa", "greedy", "random"])
    args = parser.parse_args()
    print(
        f"{'K':>6} {'policy':>10} {'ms/decision':>12} {'goal ms':>12} {'x fixed':>9} "
        f"{'reference ms':>13} {'speed-up':>9} {'same plans':>11}"
    )
    for K in (10, 100, 1000):
        fixed, fixed_state = measured_controller("fixed", K)
        base = timed_decisions(fixed, fixed_state, args.repeats)
        print(f"{K:6d} {'fixed':>10} {base:12.2f} {'':>12} {1.0:9.1f}")
        for policy in args.policies:
            ctrl, state = measured_controller(policy, K)
            ms = timed_decisions(ctrl, state, args.repeats)
            goal = "" if policy != "lyapunov" else f"<={GOAL_MS[K]:g}" + (" met" if ms <= GOAL_MS[K] else " MISSED")
            line = f"{K:6d} {policy:>10} {ms:12.2f} {goal:>12} {ms / base:9.1f}"
            if not isinstance(ctrl, LyapunovController):
                print(line)
                continue
            ref = timed_decisions(ctrl, state, args.repeats, reference=True)
            same = copy.deepcopy(ctrl).decide(state) == reference_decide(copy.deepcopy(ctrl), state)
            print(f"{line} {ref:13.2f} {ref / ms:9.1f} {'yes' if same else 'NO':>11}")


if __name__ == "__main__":
    main()
