"""Fixed baseline: every ready device, max power, equal bandwidth, one rank and depth, one keep fraction
(dense by default)."""

from __future__ import annotations

from bs_node.controllers.base import Controller, DevicePlan, RoundState


class FixedController(Controller):
    name = "fixed"

    def capability(self, device_id: int, max_rank: int, num_layers: int) -> tuple[int, int]:
        cfg = self.experiment.controller
        return min(cfg.rank or max_rank, max_rank), min(cfg.depth or num_layers, num_layers)

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        if not state.devices:
            return {}
        cfg = self.experiment.controller
        rank = min(cfg.rank or state.max_rank, state.max_rank)
        depth = min(cfg.depth or state.num_layers, state.num_layers)
        share_hz = state.total_bandwidth_hz / len(state.devices)
        return {
            d.device_id: DevicePlan(
                device_id=d.device_id,
                participate=True,
                rank=rank,
                depth=depth,
                tx_power_dbm=state.max_tx_power_dbm,
                bandwidth_hz=share_hz,
                modulation=cfg.modulation,
                keep_fraction=cfg.keep_fraction,
                local_steps=state.local_steps,
            )
            for d in state.devices
        }
