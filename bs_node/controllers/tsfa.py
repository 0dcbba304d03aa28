"""TSFA, the two-stage federated algorithm of the SOFT paper (arXiv 2505.00333): rank offline, sparsity and
bandwidth online, under a per-round latency budget, with the SOFT codec.

The paper's full text is not available here; this is our formulation of its two stages (docs/controller.md):

Stage one (offline, before round 1, from long-run statistics only): each device's rank r_k is the largest in
`controller.ranks` whose update, at the sparsest keep fraction the online stage may pick, an equal share of the
band and full power, arrives within the latency budget T̄ on the device's long-run channel (the path-loss mean
at its distance, no fading) after its local training (the compute prior, scaled by the device's declared
`compute_speed`). A device for which no rank fits gets the smallest. The rank then stays: it is the device's
capability in the aggregation rule.

Stage two (online, every round): each device's keep fraction and bandwidth share by the drift-plus-penalty
solver of the proposed policy, with the module pinned to (r_k, all layers), the configured modulation, full
power, no energy queues, and every option whose predicted round latency exceeds T̄ ruled out (a hard per-round
constraint; if none fits, the device's fastest option stays allowed). T̄ is `controller.latency_budget_s`, or
the round deadline when that is unset.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bs_node.controllers.base import DevicePlan, RoundState
from bs_node.controllers.costs import OptionGrid
from bs_node.controllers.lyapunov import LyapunovController
from config import BenchConfig, ExperimentConfig


class TsfaController(LyapunovController):
    name = "tsfa"
    uses_energy_queues = False

    def __init__(self, experiment: ExperimentConfig, bench: BenchConfig):
        super().__init__(experiment, bench)
        self.offline_rank: dict[int, int] = {}  # stage one's choice, per device

    @property
    def latency_budget_s(self) -> float:
        return self.cfg.latency_budget_s or self.experiment.round.deadline_s

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        self.offline_stage(state)
        return super().decide(state)

    def offline_stage(self, state: RoundState) -> None:
        """Stage one for the devices not yet ranked (a late joiner is ranked when it first appears)."""
        if all(d.device_id in self.offline_rank for d in state.devices):
            return
        costs = self.cost_model(state)
        L, K = state.num_layers, max(1, len(state.devices))
        ranks = sorted({min(r, state.max_rank) for r in self.cfg.ranks})
        grid = costs.grid(
            [(r, L) for r in ranks],
            [self.cfg.modulation],
            [min(self.keep_fractions())],
            np.array([self.bench.radio.max_tx_power_dbm]),
            np.array([1.0 / K]),
        )
        depths = grid.depth.astype(int)
        for dev in state.devices:
            k = dev.device_id
            if k in self.offline_rank:
                continue
            speed = dev.profile.compute_speed
            cpu = np.array([self.compute.cpu_s(k, state.local_steps, int(d), L) for d in depths]) / speed
            pred = costs.predict(
                grid,
                gain_db=np.array([self.channel.planning_gain_db(k, dev.profile.distance_m, 0.0)]),
                cpu_s=cpu[None, :],
                wall_s=cpu[None, :],
                watts_per_core=np.array([dev.profile.compute_watts_per_core]),
                fading_db=None,
            )
            fits = [int(grid.rank[c]) for c in range(len(grid.rank)) if pred.latency_s[0, c] <= self.latency_budget_s]
            self.offline_rank[k] = max(fits) if fits else ranks[0]

    def capability(self, device_id: int, max_rank: int, num_layers: int) -> tuple[int, int]:
        return min(self.offline_rank.get(device_id, max_rank), max_rank), num_layers

    def choices(self, state: RoundState) -> tuple[list[tuple[int, int]], list[str], list[float], np.ndarray]:
        self.offline_stage(state)
        ranks = sorted({self.offline_rank[d.device_id] for d in state.devices})
        return (
            [(r, state.num_layers) for r in ranks],
            [self.cfg.modulation],
            self.keep_fractions(),
            np.array([self.bench.radio.max_tx_power_dbm]),
        )

    def option_mask(self, ids: list[int], grid: OptionGrid) -> Callable[[np.ndarray], np.ndarray]:
        """Each device's own rank, and only options within the per-round latency budget (else its fastest)."""
        own = grid.rank[None, :] == np.array([self.offline_rank[k] for k in ids], dtype=float)[:, None]

        def mask(latency_s: np.ndarray) -> np.ndarray:
            within = own & (latency_s <= self.latency_budget_s)
            stuck = np.flatnonzero(~within.any(axis=1))
            within[stuck, np.where(own[stuck], latency_s[stuck], np.inf).argmin(axis=1)] = True
            return within

        return mask

    def explain(self) -> dict:
        return {**super().explain(), "offline_rank": dict(self.offline_rank), "latency_budget_s": self.latency_budget_s}
