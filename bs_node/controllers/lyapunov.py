"""The proposed policy: Lyapunov drift-plus-penalty over module, power, bandwidth, modulation and sparsity.

Per round: minimise V·Φ(S) + Σ_k (Q_k + κ_E) E_k/Ē_k + Z·T/T̄ (docs/controller.md), S the effective number of
full updates that arrive. The devices decouple given a price λ of one update (bisected towards the marginal
value V·|Φ'(S)|), a bandwidth price μ (bisected until the shares fit the band) and, while the latency queue has
a backlog, a round length τ (searched on a grid).
Every input is a measurement: channel gains from the SNR the BS measured, compute from the devices' reports,
energy and latency queues from what the round actually cost.
"""

from __future__ import annotations

import numpy as np

from bs_node.controllers.base import Controller, DevicePlan, RoundState
from bs_node.controllers.costs import CostModel, OptionGrid, Predictions
from bs_node.controllers.estimates import ChannelEstimator, ComputeEstimator
from bs_node.measurements import RoundRecord
from config import BenchConfig, ExperimentConfig
from fedlora.sparsify import SPARSIFIERS
from phy.channel import PerCurve

TIE_BREAK = 1e-3


def participation_loss(effective_updates, num_devices: int):
    """Φ(S) = (1 − S/K) / (1 + S): the partial-participation variance of averaging S of K devices' updates
    (finite-population correction over S, with the global model counted as one more sample so that a round
    without any update costs 1, not infinity). Convex and decreasing: the first updates of a round are worth
    the most, which spreads participation over the rounds."""
    s = np.clip(effective_updates, 0.0, float(num_devices))
    return (1.0 - s / num_devices) / (1.0 + s)


def participation_slope(effective_updates: float, num_devices: int) -> float:
    """|Φ'(S)| = (1 + 1/K) / (1 + S)²: what one more full update is worth at S."""
    return (1.0 + 1.0 / num_devices) / (1.0 + max(effective_updates, 0.0)) ** 2


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
        self._last: dict = {}
        self._costs: CostModel | None = None
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
        if not state.devices:
            return {}
        cfg, radio = self.cfg, self.bench.radio
        if state.model_shape is None:
            raise ValueError("the lyapunov controller needs the round's model_shape to predict update sizes")
        self._costs = self.cost_model(state)
        L = self._num_layers = state.num_layers
        K = len(state.devices)
        grid = self._costs.grid(*self.choices(state), np.geomspace(1.0 / (4 * K), 1.0, cfg.share_levels))
        ids = [d.device_id for d in state.devices]
        pred = self.predict(state, grid)
        weights = np.array([state.device_weights.get(k, 1.0) for k in ids])
        weights = weights * K / weights.sum()  # mean 1: V is the price of one average device's round
        budgets = np.array([self.bench.device(k).energy_budget_j or np.inf for k in ids])
        queues = np.array([self.energy_queue.get(k, 0.0) for k in ids]) if self.uses_energy_queues else np.zeros(K)
        allowance = self._allowance_j(ids, budgets)
        feasible = self._energy_feasible(ids, grid, pred, allowance) & self.option_mask(ids, grid, pred)
        choice, tau, objective, effective_updates = self._solve(grid, pred, weights, queues, budgets, feasible)
        plans: dict[int, DevicePlan] = {}
        for dev, c in zip(state.devices, choice):
            if c < 0:
                plans[dev.device_id] = DevicePlan(
                    dev.device_id,
                    False,
                    state.max_rank,
                    L,
                    radio.max_tx_power_dbm,
                    0.0,
                    cfg.modulation,
                    1.0,
                    state.local_steps,
                )
                continue
            plans[dev.device_id] = DevicePlan(
                dev.device_id,
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
        self._last = {
            "round_length_s": round(tau, 2),
            "objective": round(objective, 4),
            "effective_updates": round(effective_updates, 3),
            "gain_db": {k: round(self.channel.estimates[k].mean_db, 2) for k in ids},
            "energy_allowance_j": {k: round(float(a), 1) for k, a in zip(ids, allowance) if np.isfinite(a)},
            "gain_std_db": {k: round(float(np.sqrt(self.channel.estimates[k].var_db2)), 2) for k in ids},
            "predicted": {
                k: {
                    "energy_j": round(float(pred.energy_j[i, c]), 2),
                    "latency_s": round(float(pred.latency_s[i, c]), 2),
                    "delivery": round(float(pred.delivery[i, c]), 4),
                }
                for i, (k, c) in enumerate(zip(ids, choice))
                if c >= 0
            },
        }
        return plans

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

    def predict(self, state: RoundState, grid: OptionGrid) -> Predictions:
        """Energy, latency and delivery of every (device, option) from the current estimates."""
        assert self._costs is not None
        cfg, L = self.cfg, state.num_layers
        ids = [d.device_id for d in state.devices]
        depths = grid.depth.astype(int)
        cpu = np.array([[self.compute.cpu_s(k, state.local_steps, d, L) for d in range(L + 1)] for k in ids])
        wall = np.array([[self.compute.wall_s(k, state.local_steps, d, L) for d in range(L + 1)] for k in ids])
        return self._costs.predict(
            grid,
            gain_db=np.array(
                [
                    self.channel.planning_gain_db(d.device_id, d.profile.distance_m, cfg.snr_margin_sigmas)
                    for d in state.devices
                ]
            ),
            cpu_s=cpu[:, depths],
            wall_s=wall[:, depths],
            watts_per_core=np.array([d.profile.compute_watts_per_core for d in state.devices]),
            fading_db=np.array(
                [self.channel.spread_nodes_db(d.device_id, d.profile.distance_m) for d in state.devices]
            ),
        )

    def option_mask(self, ids: list[int], grid: OptionGrid, pred: Predictions) -> np.ndarray:
        """(devices, options): the options a policy allows each device (all of them here)."""
        return np.ones((len(ids), len(grid.rank)), dtype=bool)

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

    def _energy_feasible(
        self, ids: list[int], grid: OptionGrid, pred: Predictions, allowance: np.ndarray
    ) -> np.ndarray:
        """(devices, options) mask of the energy guard: predicted energy within (1 − margin) × allowance.

        A device whose compute has never been measured may run its cheapest module once whatever the guard
        says (a probe): its prediction is only the prior, and without a measurement it would never get one."""
        ok = pred.energy_j <= (1 - self.cfg.energy_guard_margin) * allowance[:, None]
        cheapest = grid.depth == grid.depth.min()
        for i, k in enumerate(ids):
            if not self.compute.measured(k) and np.isfinite(allowance[i]):
                ok[i] |= cheapest
        return ok

    def _solve(
        self,
        grid: OptionGrid,
        pred: Predictions,
        weights: np.ndarray,
        queues: np.ndarray,
        budgets: np.ndarray,
        feasible: np.ndarray | None = None,
    ) -> tuple[list[int], float, float, float]:
        """Best per-device option (-1: sits this round out), round length, objective and S over (τ, λ, μ).

        The learning proxy couples the devices only through S, the effective number of full updates that
        arrive. For a participation price λ they decouple (each takes part when λ·(its share of S) pays for
        its energy, queue and bandwidth); λ is bisected to the fixed point λ = V·|Φ'(S(λ))|, every plan on
        the way is scored with the true objective V·Φ(S) + Σ_k (Q_k + κ_E) E_k/Ē_k + Z·T/T̄, and the best one
        is pruned of devices whose update is worth less than it costs. Queues count in units of their
        budgets, so V trades them against the proxy without units; a tiny tie-break on energy and latency
        picks the cheaper of options the objective cannot tell apart."""
        cfg = self.cfg
        V, Z = cfg.v, self.latency_queue
        K = len(weights)
        # scale references where there is no budget: each device's cheapest option, the slowest quickest device
        t_ref = cfg.latency_budget_s or max(float(pred.latency_s.min(axis=1).max()), 1e-6)
        e_ref = np.where(np.isfinite(budgets), budgets, np.maximum(pred.energy_j.min(axis=1), 1e-6))
        # energy's own price applies where there is a budget to price it in (a device without one spends freely)
        price = queues + np.where(np.isfinite(budgets), cfg.energy_price if self.uses_energy_queues else 0.0, 0.0)
        cost = (price / e_ref)[:, None] * pred.energy_j + TIE_BREAK * (
            pred.energy_j / e_ref[:, None] + pred.latency_s / t_ref
        )
        if feasible is not None:
            cost = np.where(feasible, cost, np.inf)
        value = weights[:, None] * pred.delivery * grid.info[None, :]  # each option's expected share of S
        rows = np.arange(K)
        n_shares = len(grid.share_levels)

        def plan(lam: float, tau: float) -> tuple[float, np.ndarray, float, float]:
            base = cost - lam * value
            allowed = base if np.isinf(tau) else np.where(pred.latency_s <= tau, base, np.inf)
            allowed = allowed.reshape(K, -1, n_shares)
            # μ·β is the same for every option of one share level: the best option per level does not depend
            # on μ, so the bandwidth bisection works on a (devices x share levels) table.
            best_of_level = allowed.argmin(axis=1)
            level_cost = np.take_along_axis(allowed, best_of_level[:, None, :], axis=1)[:, 0, :]
            level = self._allocate(level_cost, grid.share_levels)
            on = level >= 0
            choice = np.where(on, best_of_level[rows, np.maximum(level, 0)] * n_shares + level, -1)
            return self._prune(choice, value, cost, pred.latency_s, V, Z / t_ref)

        if Z > 0:  # the round length only matters while the latency queue has a backlog
            fastest = pred.latency_s.min(axis=1)  # each device's quickest option
            taus = np.unique(
                np.geomspace(
                    max(float(fastest.min()), 1e-6), max(float(pred.latency_s.max()), 1e-6), cfg.round_length_levels
                )
            )
        else:
            taus = np.array([np.inf])
        best = (V * float(participation_loss(0.0, K)), np.full(K, -1), 0.0, 0.0)
        for tau in taus:
            lo, hi = 0.0, V * participation_slope(0.0, K)
            for _ in range(cfg.participation_iterations):
                lam = 0.5 * (lo + hi)
                planned = plan(lam, tau)
                if planned[0] < best[0]:
                    best = planned
                if lam > V * participation_slope(planned[3], K):
                    hi = lam
                else:
                    lo = lam
        return [int(c) for c in best[1]], best[2], best[0], best[3]

    @staticmethod
    def _prune(
        choice: np.ndarray, value: np.ndarray, cost: np.ndarray, latency_s: np.ndarray, v: float, z_per_s: float
    ) -> tuple[float, np.ndarray, float, float]:
        """Drop, one at a time, the participant whose removal lowers the objective most, while one does.

        λ prices every participant at the same margin; dropping a device raises V·Φ by less than its cost
        when many others take part. Returns (objective, choice, round length, S)."""
        choice = choice.copy()
        on = np.flatnonzero(choice >= 0)
        k = len(choice)
        v_on, c_on = value[on, choice[on]], cost[on, choice[on]]
        s = float(v_on.sum())
        keep = np.ones(len(on), dtype=bool)
        while keep.any():
            gain = participation_loss(s - v_on, k) - participation_loss(s, k)
            delta = np.where(keep, v * gain - c_on, np.inf)
            i = int(delta.argmin())
            if delta[i] >= 0:
                break
            keep[i] = False
            s -= float(v_on[i])
        choice[on[~keep]] = -1
        on = on[keep]
        t_round = float(latency_s[on, choice[on]].max()) if len(on) else 0.0
        total = v * float(participation_loss(s, k)) + float(c_on[keep].sum()) + z_per_s * t_round
        return total, choice, t_round, s

    def _allocate(self, cost: np.ndarray, share: np.ndarray) -> np.ndarray:
        """Bisect the bandwidth price μ until the devices' best responses fit in the band together.

        cost: (devices, share levels); returns each device's share level, or -1 to sit out."""

        def respond(mu: float) -> tuple[np.ndarray, float]:
            priced = cost + mu * share[None, :]
            c = np.argmin(priced, axis=1)
            c = np.where(priced[np.arange(len(c)), c] < 0, c, -1)  # sitting out costs 0
            return c, float(share[c[c >= 0]].sum())

        choice, used = respond(0.0)
        if used <= 1.0 + 1e-9:
            return choice
        lo, hi = 0.0, 1.0
        while respond(hi)[1] > 1.0 + 1e-9:
            hi *= 2
        for _ in range(self.cfg.price_iterations):
            mid = 0.5 * (lo + hi)
            if respond(mid)[1] > 1.0 + 1e-9:
                lo = mid
            else:
                hi = mid
        return respond(hi)[0]

    # ------------------------------------------------------------------------------------------ observe
    def observe(self, record: RoundRecord) -> None:
        round_latency = 0.0
        for row in record.devices:
            self.channel.observe(row)
            if row.participated and row.status in ("ok", "undelivered"):
                self.compute.observe(row, self._local_steps, self._num_layers)
                round_latency = max(round_latency, row.train_wall_s + row.airtime_s)
            budget = self.bench.device(row.device_id).energy_budget_j
            if budget is not None:  # queues in units of the budget: Q += E/Ē − 1
                self.energy_spent_j[row.device_id] = self.energy_spent_j.get(row.device_id, 0.0) + row.energy_j
                q = self.energy_queue.get(row.device_id, 0.0)
                self.energy_queue[row.device_id] = max(q + row.energy_j / budget - 1.0, 0.0)
        if self.cfg.latency_budget_s is not None:
            self.latency_queue = max(self.latency_queue + round_latency / self.cfg.latency_budget_s - 1.0, 0.0)

    def explain(self) -> dict:
        return {
            **self._last,
            "energy_queue": {k: round(v, 3) for k, v in self.energy_queue.items()},
            "latency_queue": round(self.latency_queue, 3),
            "v": self.cfg.v,
        }
