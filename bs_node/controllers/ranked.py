"""Heterogeneous-rank baselines of the field (HetLoRA, FlexLoRA) as policies: every ready device takes part
every round, at full power, with an equal share of the band, on every layer, dense, at its own rank.

The ranks come from TSFA's offline stage (bs_node/controllers/tsfa.py) with dense updates: the largest rank
whose update fits the latency budget on the device's long-run channel after its training, so a far or slow
device trains a smaller module. What makes the methods differ is their aggregator (`round.aggregator`:
fedlora/aggregators/hetlora.py, flexlora.py) and, for HetLoRA, the rank self-pruning in `hetlora.py`.
"""

from __future__ import annotations

from bs_node.controllers.base import DevicePlan, RoundState
from bs_node.controllers.tsfa import TsfaController


class RankedController(TsfaController):
    name = "ranked"

    def keep_fractions(self) -> list[float]:
        return [1.0]

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        if not state.devices:
            return {}
        self.offline_stage(state)
        share_hz = state.total_bandwidth_hz / len(state.devices)
        return {
            d.device_id: DevicePlan(
                device_id=d.device_id,
                participate=True,
                rank=self.capability(d.device_id, state.max_rank, state.num_layers)[0],
                depth=state.num_layers,
                tx_power_dbm=state.max_tx_power_dbm,
                bandwidth_hz=share_hz,
                modulation=self.cfg.modulation,
                keep_fraction=1.0,
                local_steps=state.local_steps,
            )
            for d in state.devices
        }

    def explain(self) -> dict:
        return {"rank": dict(self.offline_rank), "latency_budget_s": self.latency_budget_s}
