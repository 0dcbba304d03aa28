"""Random baseline: each device takes part with probability `controller.random_participation`, with a random
module and keep fraction from the configured sets, at max power, sharing the band equally (seeded per round)."""

from __future__ import annotations

import numpy as np

from bs_node.controllers.base import Controller, DevicePlan, RoundState


class RandomController(Controller):
    name = "random"

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        cfg = self.experiment.controller
        rng = np.random.default_rng([self.experiment.seed, 0x5A17, state.round_idx])
        ids = [d.device_id for d in state.devices]
        take = rng.random(len(ids)) < cfg.random_participation
        if ids and not take.any():
            take[rng.integers(len(ids))] = True  # a round with nobody teaches nothing
        share_hz = state.total_bandwidth_hz / max(1, int(take.sum()))
        plans = {}
        for k, on in zip(ids, take):
            rank = min(int(rng.choice(cfg.ranks)), state.max_rank)
            depth = min(int(rng.choice(cfg.depths)), state.num_layers)
            keep = float(rng.choice(cfg.keep_fractions))
            plans[k] = DevicePlan(
                k,
                bool(on),
                rank,
                depth,
                state.max_tx_power_dbm,
                share_hz if on else 0.0,
                cfg.modulation,
                keep,
                state.local_steps,
            )
        return plans
