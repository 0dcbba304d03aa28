"""Decision time per round of each policy for K = 10, 100, 1000 devices, side by side with the fixed policy.

    .venv/bin/python benchmarks/controller_decision_time.py [--repeats 5]

Prints milliseconds per decision and the ratio to the fixed policy measured in the same run; the growth with K
shows the algorithm's complexity (linear in K for the proposed policy, see docs/controller.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bs_node.controllers import DeviceState, RoundState, make_controller
from bs_node.controllers.costs import ModelShape
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


def timed_decisions(policy: str, K: int, repeats: int) -> float:
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
    # one observed round so every estimate is a measured one
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
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ctrl.decide(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--policies", nargs="+", default=["lyapunov", "tsfa", "greedy", "random"])
    args = parser.parse_args()
    print(f"{'K':>6} {'policy':>10} {'ms/decision':>12} {'x fixed':>9}")
    for K in (10, 100, 1000):
        base = timed_decisions("fixed", K, args.repeats)
        print(f"{K:6d} {'fixed':>10} {base:12.2f} {1.0:9.1f}")
        for policy in args.policies:
            ms = timed_decisions(policy, K, args.repeats)
            print(f"{K:6d} {policy:>10} {ms:12.2f} {ms / base:9.1f}")


if __name__ == "__main__":
    main()
