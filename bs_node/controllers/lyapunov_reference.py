"""The proposed policy's solver as it was before it was made fast: the specification the fast one must match.

`reference_decide(ctrl, state)` plans a round the way `LyapunovController.decide` did until the fast solver
(docs/controller.md, "How the solver is made fast"): every option of every device predicted (`CostModel.predict`),
λ bisected over all of them, μ bisected one price at a time, the participants pruned one vectorised pass per
drop. It reads and updates the controller exactly as that decide did, so a test can run both on copies of one
controller and ask for the same plans (tests/test_decision_equivalence.py), and the decision-time benchmark can
time both in one run. No run uses it.
"""

from __future__ import annotations

import numpy as np

from bs_node.controllers.base import DevicePlan, RoundState
from bs_node.controllers.costs import OptionGrid, Predictions
from bs_node.controllers.lyapunov import TIE_BREAK, LyapunovController, participation_loss, participation_slope
from bs_node.controllers.tsfa import TsfaController


def reference_decide(ctrl: LyapunovController, state: RoundState) -> dict[int, DevicePlan]:
    """The round's plans by the reference solver (the former `LyapunovController.decide`, line for line)."""
    if isinstance(ctrl, TsfaController):
        ctrl.offline_stage(state)
    if not state.devices:
        return {}
    cfg, radio = ctrl.cfg, ctrl.bench.radio
    if state.model_shape is None:
        raise ValueError("the lyapunov controller needs the round's model_shape to predict update sizes")
    costs = ctrl._costs = ctrl.cost_model(state)
    L = ctrl._num_layers = state.num_layers
    K = len(state.devices)
    grid = costs.grid(*ctrl.choices(state), np.geomspace(1.0 / (4 * K), 1.0, cfg.share_levels))
    ids = [d.device_id for d in state.devices]
    pred = reference_predict(ctrl, state, grid)
    weights = np.array([state.device_weights.get(k, 1.0) for k in ids])
    weights = weights * K / weights.sum()
    budgets = np.array([ctrl.bench.device(k).energy_budget_j or np.inf for k in ids])
    queues = np.array([ctrl.energy_queue.get(k, 0.0) for k in ids]) if ctrl.uses_energy_queues else np.zeros(K)
    allowance = ctrl._allowance_j(ids, budgets)
    feasible = _energy_feasible(ctrl, ids, grid, pred, allowance) & _option_mask(ctrl, ids, grid, pred)
    choice, tau, objective, effective_updates = _solve(ctrl, grid, pred, weights, queues, budgets, feasible)
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
    ctrl._local_steps = state.local_steps
    ctrl._last = {
        "round_length_s": round(tau, 2),
        "objective": round(objective, 4),
        "effective_updates": round(effective_updates, 3),
        "gain_db": {k: round(ctrl.channel.estimates[k].mean_db, 2) for k in ids},
        "energy_allowance_j": {k: round(float(a), 1) for k, a in zip(ids, allowance) if np.isfinite(a)},
        "gain_std_db": {k: round(float(np.sqrt(ctrl.channel.estimates[k].var_db2)), 2) for k in ids},
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


def reference_predict(ctrl: LyapunovController, state: RoundState, grid: OptionGrid) -> Predictions:
    """Energy, latency and delivery of every (device, option): the full K x options table."""
    assert ctrl._costs is not None
    cfg, L = ctrl.cfg, state.num_layers
    ids = [d.device_id for d in state.devices]
    depths = grid.depth.astype(int)
    cpu = np.array([[ctrl.compute.cpu_s(k, state.local_steps, d, L) for d in range(L + 1)] for k in ids])
    wall = np.array([[ctrl.compute.wall_s(k, state.local_steps, d, L) for d in range(L + 1)] for k in ids])
    gain = np.array(
        [ctrl.channel.planning_gain_db(d.device_id, d.profile.distance_m, cfg.snr_margin_sigmas) for d in state.devices]
    )
    fading = np.array([ctrl.channel.spread_nodes_db(d.device_id, d.profile.distance_m) for d in state.devices])
    wall = wall + ctrl._costs.downlink_wait_s(gain, fading, L)  # the view over the PHY comes before training
    return ctrl._costs.predict(
        grid,
        gain_db=gain,
        cpu_s=cpu[:, depths],
        wall_s=wall[:, depths],
        watts_per_core=np.array([d.profile.compute_watts_per_core for d in state.devices]),
        fading_db=fading,
    )


def _option_mask(ctrl: LyapunovController, ids: list[int], grid: OptionGrid, pred: Predictions) -> np.ndarray:
    """All options for the proposed policy; TSFA: its own rank, within the latency budget (else its fastest)."""
    if not isinstance(ctrl, TsfaController):
        return np.ones((len(ids), len(grid.rank)), dtype=bool)
    own = np.array([[grid.rank[c] == ctrl.offline_rank[k] for c in range(len(grid.rank))] for k in ids])
    within = own & (pred.latency_s <= ctrl.latency_budget_s)
    fastest = np.where(own, pred.latency_s, np.inf).argmin(axis=1)
    for i in range(len(ids)):
        if not within[i].any():
            within[i, fastest[i]] = True
    return within


def _energy_feasible(
    ctrl: LyapunovController, ids: list[int], grid: OptionGrid, pred: Predictions, allowance: np.ndarray
) -> np.ndarray:
    ok = pred.energy_j <= (1 - ctrl.cfg.energy_guard_margin) * allowance[:, None]
    cheapest = grid.depth == grid.depth.min()
    for i, k in enumerate(ids):
        if not ctrl.compute.measured(k) and np.isfinite(allowance[i]):
            ok[i] |= cheapest
    return ok


def _solve(
    ctrl: LyapunovController,
    grid: OptionGrid,
    pred: Predictions,
    weights: np.ndarray,
    queues: np.ndarray,
    budgets: np.ndarray,
    feasible: np.ndarray,
) -> tuple[list[int], float, float, float]:
    cfg = ctrl.cfg
    V, Z = cfg.v, ctrl.latency_queue
    K = len(weights)
    t_ref = cfg.latency_budget_s or max(float(pred.latency_s.min(axis=1).max()), 1e-6)
    e_ref = np.where(np.isfinite(budgets), budgets, np.maximum(pred.energy_j.min(axis=1), 1e-6))
    price = queues + np.where(np.isfinite(budgets), cfg.energy_price if ctrl.uses_energy_queues else 0.0, 0.0)
    cost = (price / e_ref)[:, None] * pred.energy_j + TIE_BREAK * (
        pred.energy_j / e_ref[:, None] + pred.latency_s / t_ref
    )
    cost = np.where(feasible, cost, np.inf)
    value = weights[:, None] * pred.delivery * grid.info[None, :]
    rows = np.arange(K)
    n_shares = len(grid.share_levels)

    def plan(lam: float, tau: float) -> tuple[float, np.ndarray, float, float]:
        base = cost - lam * value
        allowed = base if np.isinf(tau) else np.where(pred.latency_s <= tau, base, np.inf)
        allowed = allowed.reshape(K, -1, n_shares)
        best_of_level = allowed.argmin(axis=1)
        level_cost = np.take_along_axis(allowed, best_of_level[:, None, :], axis=1)[:, 0, :]
        level = _allocate(level_cost, grid.share_levels, cfg.price_iterations)
        on = level >= 0
        choice = np.where(on, best_of_level[rows, np.maximum(level, 0)] * n_shares + level, -1)
        return _prune(choice, value, cost, pred.latency_s, V, Z / t_ref)

    if Z > 0:
        fastest = pred.latency_s.min(axis=1)
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


def _prune(
    choice: np.ndarray, value: np.ndarray, cost: np.ndarray, latency_s: np.ndarray, v: float, z_per_s: float
) -> tuple[float, np.ndarray, float, float]:
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


def _allocate(cost: np.ndarray, share: np.ndarray, iterations: int) -> np.ndarray:
    def respond(mu: float) -> tuple[np.ndarray, float]:
        priced = cost + mu * share[None, :]
        c = np.argmin(priced, axis=1)
        c = np.where(priced[np.arange(len(c)), c] < 0, c, -1)
        return c, float(share[c[c >= 0]].sum())

    choice, used = respond(0.0)
    if used <= 1.0 + 1e-9:
        return choice
    lo, hi = 0.0, 1.0
    while respond(hi)[1] > 1.0 + 1e-9:
        hi *= 2
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if respond(mid)[1] > 1.0 + 1e-9:
            lo = mid
        else:
            hi = mid
    return respond(hi)[0]
