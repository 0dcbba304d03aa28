"""Channel-greedy baseline: only the devices with the best measured channels take part.

The `controller.greedy_top` devices (default: half, at least one) with the highest estimated channel gain,
at max power, sharing the band equally, with the full module and dense updates. Gains come from the same
measurement-fed estimator as the proposed policy.
"""

from __future__ import annotations

from bs_node.controllers.base import Controller, DevicePlan, RoundState
from bs_node.controllers.estimates import ChannelEstimator
from bs_node.measurements import RoundRecord
from config import BenchConfig, ExperimentConfig


class GreedyController(Controller):
    name = "greedy"

    def __init__(self, experiment: ExperimentConfig, bench: BenchConfig):
        super().__init__(experiment, bench)
        self.channel = ChannelEstimator(bench.channel, ewma=experiment.controller.gain_ewma)

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        cfg = self.experiment.controller
        gains = {
            d.device_id: self.channel.planning_gain_db(d.device_id, d.profile.distance_m, 0.0) for d in state.devices
        }
        top = cfg.greedy_top or max(1, len(state.devices) // 2)
        chosen = set(sorted(gains, key=lambda d: gains[d], reverse=True)[:top])
        share_hz = state.total_bandwidth_hz / max(1, len(chosen))
        return {
            k: DevicePlan(
                k,
                k in chosen,
                state.max_rank,
                state.num_layers,
                state.max_tx_power_dbm,
                share_hz if k in chosen else 0.0,
                cfg.modulation,
                1.0,
                state.local_steps,
            )
            for k in gains
        }

    def observe(self, record: RoundRecord) -> None:
        for row in record.devices:
            self.channel.observe(row)

    def explain(self) -> dict:
        return {"gain_db": {k: round(e.mean_db, 2) for k, e in self.channel.estimates.items()}}
