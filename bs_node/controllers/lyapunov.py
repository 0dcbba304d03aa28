"""The proposed policy: Lyapunov drift-plus-penalty over module, power, bandwidth, modulation and sparsity.

Per round: minimise V·Φ(S) + Σ_k (Q_k + κ_E) E_k/Ē_k + Z·T/T̄ (docs/controller.md), S the effective number of
full updates that arrive. The devices decouple given a price λ of one update (bisected towards the marginal
value V·|Φ'(S)|), a bandwidth price μ (bisected until the shares fit the band) and, while the latency queue has
a backlog, a round length τ (searched on a grid).
Every input is a measurement: channel gains from the SNR the BS measured, compute from the devices' reports,
energy and latency queues from what the round actually cost.
The solver predicts only the options that can still win and searches them with the reference solver's steps
(lyapunov_reference.py): the same plans, found in a fraction of the time (docs/controller.md, "How the solver
is made fast").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bs_node.controllers.base import Controller, DevicePlan, RoundState
from bs_node.controllers.costs import CostModel, OptionGrid
from bs_node.controllers.estimates import ChannelEstimator, ComputeEstimator, GainEstimate
from bs_node.controllers.option_table import TIE_BREAK, DeviceInputs, GridIndex, index_grid, live_options
from bs_node.controllers.participation_search import participation_loss, participation_slope, search
from bs_node.measurements import RoundRecord
from config import BenchConfig, ExperimentConfig
from fedlora.sparsify import SPARSIFIERS
from phy.channel import PerCurve

__all__ = ["TIE_BREAK", "LyapunovController", "participation_loss", "participation_slope"]


@dataclass(frozen=True)
class DecisionRecord:
    """What `explain` reports of a decision, kept as arrays and turned into the record's dicts only when asked."""

    ids: list[int]
    round_length_s: float
    objective: float
    effective_updates: float
    gain_mean_db: list[float]
    gain_var_db2: list[float]
    allowance_j: np.ndarray
    planned: np.ndarray  # bool per device
    energy_j: np.ndarray  # of the planned option (where planned)
    latency_s: np.ndarray
    delivery: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        ids = self.ids
        return {
            "round_length_s": round(self.round_length_s, 2),
            "objective": round(self.objective, 4),
            "effective_updates": round(self.effective_updates, 3),
            "gain_db": {k: round(m, 2) for k, m in zip(ids, self.gain_mean_db)},
            "energy_allowance_j": {k: round(float(a), 1) for k, a in zip(ids, self.allowance_j) if np.isfinite(a)},
            "gain_std_db": {k: round(float(np.sqrt(v)), 2) for k, v in zip(ids, self.gain_var_db2)},
            "predicted": {
                k: {
                    "energy_j": round(float(self.energy_j[i]), 2),
                    "latency_s": round(float(self.latency_s[i]), 2),
                    "delivery": round(float(self.delivery[i]), 4),
                }
                for i, k in enumerate(ids)
                if self.planned[i]
            },
        }


class LyapunovController(Controller):
    name = "lyapunov"
    uses_energy_queues = True  # TSFA reuses the solver without them

    def __init__(self, experiment: ExperimentConfig, bench: BenchConfig):
        super().__init__(experiment, bench)
        cfg = experiment.controller
        self.cfg = cfg
        self.channel = ChannelEstimator(bench.channel, ewma=cfg.gain_ewma)
        self.compute = ComputeEstimator(ewma=cfg.gain_ewma)
        self.per_curve = PerCurve.for_bench(bench)
        self.energy_queue: dict[int, float] = {}
        self.energy_spent_j: dict[int, float] = {}  # measured, since the device was first planned
        self.rounds_planned: dict[int, int] = {}  # rounds the device was present for (its budget accrues)
        self.latency_queue = 0.0
        self._last: dict | DecisionRecord = {}
        self._costs: CostModel | None = None
        self._grid_cache: tuple[tuple, OptionGrid, GridIndex] | None = None  # not checkpointed: rebuilt
        self._local_steps = 0
        self._num_layers = 1

    def choices(self, state: RoundState) -> tuple[list[tuple[int, int]], list[str], list[float], np.ndarray]:
        """The options every device has: modules (rank, depth), modulations, keep fractions, powers (dBm)."""
        cfg, radio = self.cfg, self.bench.radio
        modules = sorted({(min(r, state.max_rank), min(d, state.num_layers)) for r in cfg.ranks for d in cfg.depths})
        powers = np.linspace(radio.min_tx_power_dbm, radio.max_tx_power_dbm, cfg.power_levels)
        return modules, list(cfg.modulations), self.keep_fractions(), powers

    def keep_fractions(self) -> list[float]:
        """The keep fractions the run's sparsifier honours: a dense or B-only codec sends everything."""
        if SPARSIFIERS[self.experiment.codec.sparsifier].honours_keep_fraction:
            return list(self.cfg.keep_fractions)
        return [1.0]

    # ------------------------------------------------------------------------------------------ decide
    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        """The round's plans: the live options predicted exactly (option_table), then the (τ, λ, μ) search over
        them (participation_search); the same plans as lyapunov_reference's full solver, found faster."""
        if not state.devices:
            return {}
        cfg, radio = self.cfg, self.bench.radio
        if state.model_shape is None:
            raise ValueError("the lyapunov controller needs the round's model_shape to predict update sizes")
        costs = self._costs = self.cost_model(state)
        L = self._num_layers = state.num_layers
        K = len(state.devices)
        grid, index = self._grid(costs, state)
        ids = [d.device_id for d in state.devices]
        ests, allowance, dev = self._device_inputs(state, ids)
        cands = live_options(
            costs,
            grid,
            index,
            dev,
            lambda_max=cfg.v * participation_slope(0.0, K),
            latency_budget_s=cfg.latency_budget_s,
            option_mask=self.option_mask(ids, grid),
            need_slowest=self.latency_queue > 0,
        )
        best = search(
            cands,
            K,
            grid.share_levels,
            v=cfg.v,
            latency_queue=self.latency_queue,
            lambda_iterations=cfg.participation_iterations,
            price_iterations=cfg.price_iterations,
            round_length_levels=cfg.round_length_levels,
        )
        planned = best.rows >= 0
        row = np.where(planned, best.rows, len(cands.option))  # one past the end: a padding row for those out

        def chosen(values: np.ndarray) -> np.ndarray:
            return np.r_[values, 0][row]

        choice = np.where(planned, chosen(cands.option), -1).tolist()
        plans: dict[int, DevicePlan] = {}
        for k, c in zip(ids, choice):
            if c < 0:
                plans[k] = DevicePlan(
                    k, False, state.max_rank, L, radio.max_tx_power_dbm, 0.0, cfg.modulation, 1.0, state.local_steps
                )
                continue
            plans[k] = DevicePlan(
                k,
                True,
                int(grid.rank[c]),
                int(grid.depth[c]),
                float(grid.power_dbm[c]),
                float(grid.share[c] * radio.total_bandwidth_hz),
                grid.modulations[int(grid.modulation[c])],
                float(grid.keep[c]),
                state.local_steps,
            )
        self._local_steps = state.local_steps
        self._last = DecisionRecord(
            ids,
            best.round_length_s,
            best.objective,
            best.effective_updates,
            [e.mean_db for e in ests],
            [e.var_db2 for e in ests],
            allowance,
            planned,
            chosen(cands.energy_j),
            chosen(cands.latency_s),
            chosen(cands.delivery),
        )
        return plans

    def _grid(self, costs: CostModel, state: RoundState) -> tuple[OptionGrid, GridIndex]:
        """The option grid and its index, rebuilt only when the choices or the share levels change."""
        modules, modulations, keeps, powers = self.choices(state)
        shares = np.geomspace(1.0 / (4 * len(state.devices)), 1.0, self.cfg.share_levels)
        key = (tuple(modules), tuple(modulations), tuple(keeps), tuple(powers.tolist()), tuple(shares.tolist()))
        if self._grid_cache is None or self._grid_cache[0] != key:
            grid = costs.grid(modules, modulations, keeps, powers, shares)
            self._grid_cache = (key, grid, index_grid(costs, grid))
        return self._grid_cache[1], self._grid_cache[2]

    def _device_inputs(self, state: RoundState, ids: list[int]) -> tuple[list[GainEstimate], np.ndarray, DeviceInputs]:
        """The round's estimates per device, and the allowance of the energy guard (which counts the round)."""
        cfg, K = self.cfg, len(ids)
        ests, gain, fading = self.channel.planning_table(
            [(d.device_id, d.profile.distance_m) for d in state.devices], cfg.snr_margin_sigmas
        )
        cpu, wall = self.compute.tables(ids, state.local_steps, state.num_layers)
        assert self._costs is not None  # decide() made it
        wall = wall + self._costs.downlink_wait_s(gain, fading, state.num_layers)  # the view comes first
        weights = np.array([state.device_weights.get(k, 1.0) for k in ids])
        budgets = np.array([self.bench.device(k).energy_budget_j or np.inf for k in ids])
        queues = np.array([self.energy_queue.get(k, 0.0) for k in ids]) if self.uses_energy_queues else np.zeros(K)
        price = queues + np.where(np.isfinite(budgets), cfg.energy_price if self.uses_energy_queues else 0.0, 0.0)
        allowance = self._allowance_j(ids, budgets)
        probe = np.array([not self.compute.measured(k) for k in ids]) & np.isfinite(allowance)
        return (
            ests,
            allowance,
            DeviceInputs(
                gain_db=gain,
                fading_db=fading,
                cpu_s=cpu,
                wall_s=wall,
                watts_per_core=np.array([d.profile.compute_watts_per_core for d in state.devices]),
                weights=weights * K / weights.sum(),  # mean 1: V is the price of one average device's round
                budgets_j=budgets,
                price=price,
                energy_cap_j=(1 - cfg.energy_guard_margin) * allowance,
                probe=probe,
            ),
        )

    def cost_model(self, state: RoundState) -> CostModel:
        """The update-size, airtime and energy model, made once the model's shape is known."""
        if self._costs is None:
            if state.model_shape is None:
                raise ValueError(f"the {self.name} controller needs the round's model_shape to predict update sizes")
            self._costs = CostModel(
                self.bench,
                self.per_curve,
                state.model_shape,
                state.max_rank,
                self.cfg.loss_weights,
                codec=self.experiment.codec,
            )
        return self._costs

    def option_mask(self, ids: list[int], grid: OptionGrid) -> Callable[[np.ndarray], np.ndarray] | None:
        """The policy's (devices, options) mask from the (devices, options) latency of every option; None: every
        option (the proposed policy, whose grid is too large to tabulate)."""
        return None

    def capability(self, device_id: int, max_rank: int, num_layers: int) -> tuple[int, int]:
        return min(max(self.cfg.ranks), max_rank), min(max(self.cfg.depths), num_layers)

    def _allowance_j(self, ids: list[int], budgets: np.ndarray) -> np.ndarray:
        """Energy each device may still spend this round: Ē_k · (n_k + c·(N − n_k)/(N − 1)) − measured spend,
        n_k the rounds it has been present (this one included), N the run's rounds, c the credit (inf without
        a budget).

        The credit lets a device whose useful module costs more than one budget take part before it has sat
        out. It shrinks to nothing at the last round, so the run's time average stays within the budget and a
        device that borrowed repays over the remaining rounds rather than sitting out the last ones."""
        for k in ids:
            self.rounds_planned[k] = self.rounds_planned.get(k, 0) + 1
        if not (self.uses_energy_queues and self.cfg.energy_guard):
            return np.full(len(ids), np.inf)
        horizon = self.experiment.round.rounds

        def budgets_so_far(n: int) -> float:
            left = max(horizon - n, 0) / max(horizon - 1, 1)
            return n + self.cfg.energy_credit_rounds * left

        return np.array(
            [
                b * budgets_so_far(self.rounds_planned[k]) - self.energy_spent_j.get(k, 0.0)
                if np.isfinite(b)
                else np.inf
                for k, b in zip(ids, budgets)
            ]
        )

    # ------------------------------------------------------------------------------------------ observe
    def observe(self, record: RoundRecord) -> None:
        round_latency = 0.0
        for row in record.devices:
            self.channel.observe(row)
            if row.participated and row.status in ("ok", "undelivered"):
                self.compute.observe(row, self._local_steps, self._num_layers)
                view_s = row.downlink_wait_s or 0.0  # the view over the PHY came first (0 on the control plane)
                round_latency = max(round_latency, view_s + row.train_wall_s + row.airtime_s)
            budget = self.bench.device(row.device_id).energy_budget_j
            if budget is not None:  # queues in units of the budget: Q += E/Ē − 1
                self.energy_spent_j[row.device_id] = self.energy_spent_j.get(row.device_id, 0.0) + row.energy_j
                q = self.energy_queue.get(row.device_id, 0.0)
                self.energy_queue[row.device_id] = max(q + row.energy_j / budget - 1.0, 0.0)
        if self.cfg.latency_budget_s is not None:
            self.latency_queue = max(self.latency_queue + round_latency / self.cfg.latency_budget_s - 1.0, 0.0)

    def explain(self) -> dict:
        last = self._last.as_dict() if isinstance(self._last, DecisionRecord) else self._last
        return {
            **last,
            "energy_queue": {k: round(v, 3) for k, v in self.energy_queue.items()},
            "latency_queue": round(self.latency_queue, 3),
            "v": self.cfg.v,
        }

    def state_dict(self) -> dict[str, Any]:
        """As Controller's, without the grid cache (a function of the configuration, rebuilt on the next decide)."""
        return copy.deepcopy({k: v for k, v in vars(self).items() if k != "_grid_cache"})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({**state, "_grid_cache": None})
