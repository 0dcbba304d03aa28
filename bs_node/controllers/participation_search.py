"""The proposed policy's search over round length τ, participation price λ and bandwidth price μ, on the live options
only (option_table.Candidates), taking the reference solver's steps (lyapunov_reference) at a fraction of the work.

Per λ the reference takes each (device, share level)'s cheapest option, bisects μ until the chosen shares fit the
band, then drops participants one at a time while that lowers the objective. Here:
- the level minima run over the live options (a dead option never has a negative price, so never wins);
- μ: the prices where a device changes level are known in closed form, so the bisection's whole path can be
  guessed from where the band first fits, then checked with one batched evaluation of exactly the prices the
  bisection would try (a wrong guess falls back to the bisection itself);
- the drops keep every participant's delta in a heap: dropping one only raises the others' deltas, so a stale
  delta is a lower bound, and only the top is recomputed; a near tie runs the reference's own vectorised step.
The same floating-point operations decide every comparison, so the plans are the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bs_node.controllers.option_table import Candidates

BAND_FULL = 1.0 + 1e-9  # the shares fit when they sum to at most this
BATCH_ELEMENTS = 60_000  # prices x devices x levels evaluated at once when checking a guessed μ path
_DROP_BATCH = 48  # drops guessed and checked at once
_PYTHON_DROPS = 24  # up to this many participants, the drops run in Python floats
_BIG = 1e290  # an option-less level's price, finite so that the closed-form crossings stay numbers


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


def _loss(effective_updates: np.ndarray, num_devices: int) -> np.ndarray:
    """participation_loss on arrays, clipped by maximum/minimum instead of np.clip (the same numbers: clipping
    does no arithmetic, and Φ(±0) is the same; np.clip's call overhead is several microseconds)."""
    s = np.minimum(np.maximum(effective_updates, 0.0), float(num_devices))
    return (1.0 - s / num_devices) / (1.0 + s)


def _phi(s: float, num_devices: int) -> float:
    """participation_loss for one number, with the same operations (Python floats are IEEE doubles too)."""
    s = min(max(s, 0.0), float(num_devices))
    return (1.0 - s / num_devices) / (1.0 + s)


@dataclass(frozen=True)
class SearchPlan:
    objective: float
    rows: np.ndarray  # (K,) each device's candidate row, -1: sits out
    round_length_s: float
    effective_updates: float


def search(
    cands: Candidates,
    num_devices: int,
    share_levels: np.ndarray,
    *,
    v: float,
    latency_queue: float,
    lambda_iterations: int,
    price_iterations: int,
    round_length_levels: int,
) -> SearchPlan:
    """The best plan over (τ, λ, μ), as the reference's `_solve` finds it."""
    K = num_devices
    if latency_queue > 0:  # the round length only matters while the latency queue has a backlog
        lo_s, hi_s = max(float(cands.fastest_s.min()), 1e-6), max(cands.slowest_s, 1e-6)
        taus = np.unique(np.geomspace(lo_s, hi_s, round_length_levels))
    else:
        taus = np.array([np.inf])
    best = SearchPlan(v * float(participation_loss(0.0, K)), np.full(K, -1), 0.0, 0.0)
    for tau in taus:
        stage = _Stage(cands, tau, K, share_levels, v, latency_queue / cands.t_ref_s, price_iterations)
        lo, hi = 0.0, v * participation_slope(0.0, K)
        for _ in range(lambda_iterations):
            lam = 0.5 * (lo + hi)
            planned = stage.plan(lam)
            if planned.objective < best.objective:
                best = planned
            if lam > v * participation_slope(planned.effective_updates, K):
                hi = lam
            else:
                lo = lam
    return best


class _Stage:
    """The live options allowed at one round length τ, grouped by (device, share level), and the plans of each λ."""

    def __init__(self, cands: Candidates, tau: float, K: int, shares: np.ndarray, v: float, z_per_s: float, it: int):
        self.rows = np.arange(len(cands.cost)) if np.isinf(tau) else np.flatnonzero(cands.latency_s <= tau)
        group = cands.group[self.rows]
        self.starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else np.zeros(0, int)
        self.lengths = np.diff(np.r_[self.starts, len(group)])
        self.groups = group[self.starts]
        self.slot_of_group = np.full(K * len(shares), -1)
        self.slot_of_group[self.groups] = np.arange(len(self.groups))
        self.cost, self.value = cands.cost[self.rows], cands.value[self.rows]
        self.latency_s, self.option = cands.latency_s[self.rows], cands.option[self.rows]
        self.K, self.shares, self.v, self.z_per_s, self.price_iterations = K, shares, v, z_per_s, it
        self.band = Band.of(shares)
        self.plans: dict[bytes, SearchPlan] = {}  # the drops depend on the choices only

    def plan(self, lam: float) -> SearchPlan:
        base = self.cost - lam * self.value
        level_cost = np.full(self.K * len(self.shares), np.inf)
        if len(base):
            level_cost[self.groups] = np.minimum.reduceat(base, self.starts)
        level = allocate(level_cost.reshape(self.K, -1), self.band, self.price_iterations)
        on = np.flatnonzero(level >= 0)
        slots = self.slot_of_group[on * len(self.shares) + level[on]]
        picked = self._cheapest(base, slots, level_cost[self.groups[slots]])
        key = on.tobytes() + picked.tobytes()
        if key not in self.plans:
            self.plans[key] = self._prune(on, picked)
        return self.plans[key]

    def _cheapest(self, base: np.ndarray, slots: np.ndarray, minima: np.ndarray) -> np.ndarray:
        """Row (in this stage) of each slot's cheapest option; of equal prices the smallest option index, as
        argmin over the full option grid picks it."""
        lengths = self.lengths[slots]
        firsts = np.cumsum(lengths) - lengths
        rows = np.repeat(self.starts[slots] - firsts, lengths) + np.arange(int(lengths.sum()))
        hit = base[rows] == np.repeat(minima, lengths)
        option = np.where(hit, self.option[rows], np.iinfo(np.int64).max)
        smallest = np.minimum.reduceat(option, firsts) if len(rows) else option
        return rows[np.flatnonzero(hit & (self.option[rows] == np.repeat(smallest, lengths)))]

    def _prune(self, on: np.ndarray, picked: np.ndarray) -> SearchPlan:
        v_on, c_on = self.value[picked], self.cost[picked]
        keep, s = drop_participants(v_on, c_on, self.K, self.v)
        rows = np.full(self.K, -1)
        rows[on[keep]] = self.rows[picked[keep]]
        t_round = float(self.latency_s[picked[keep]].max()) if keep.any() else 0.0
        total = self.v * float(participation_loss(s, self.K)) + float(c_on[keep].sum()) + self.z_per_s * t_round
        return SearchPlan(total, rows, t_round, s)


def drop_participants(v_on: np.ndarray, c_on: np.ndarray, K: int, v: float) -> tuple[np.ndarray, float]:
    """Drop, one at a time, the participant whose removal lowers V·Φ(S) + Σ cost most, while one does.

    Returns the mask of those kept and S. The reference recomputes every delta V·(Φ(S − v_i) − Φ(S)) − c_i per
    drop. Here the next m drops are guessed from the current deltas' order and checked together: the deltas of
    the 2m lowest at the S before each guessed drop form one (m x 2m) table (the reference's operations at the
    reference's S), whose row minima are the reference's choices for as long as the guess holds. A drop lowers
    S, which only raises the other deltas, so a participant outside the table stays at least at its current
    delta (less `slack` for rounding) and cannot win a step whose winner is lower."""
    keep = np.ones(len(v_on), dtype=bool)
    s = float(v_on.sum())
    if len(v_on) <= _PYTHON_DROPS:
        return _drop_few(v_on.tolist(), c_on.tolist(), K, v, s, keep)
    alive = np.arange(len(v_on))
    slack = 1e-9 * (v + float(np.abs(c_on).max()))
    while len(alive):
        d = v * (_loss(s - v_on[alive], K) - _phi(s, K)) - c_on[alive]
        order = np.argsort(d, kind="stable")  # equal deltas: the lower index first, as argmin takes it
        if d[order[0]] >= 0:
            break
        m = min(len(alive), _DROP_BATCH)
        width = min(len(alive), 2 * m)
        pool = np.sort(order[:width])  # positions in `alive`, ascending
        outside = float(d[order[width]]) - slack if width < len(alive) else np.inf
        guess = order[:m]
        s_before = np.subtract.accumulate(np.r_[s, v_on[alive[guess]]])  # S before each guessed drop, as `s -= v`
        vs, cs = v_on[alive[pool]], c_on[alive[pool]]
        table = v * (_loss(s_before[:m, None] - vs[None, :], K) - _loss(s_before[:m], K)[:, None])
        table = table - cs[None, :]
        rank = np.full(width, m)
        rank[np.searchsorted(pool, guess)] = np.arange(m)
        table[rank[None, :] < np.arange(m)[:, None]] = np.inf  # the guessed drops before each step are gone
        win = table.argmin(axis=1)
        best = table[np.arange(m), win].tolist()
        dropped, done = [], False
        for t, (w, b) in enumerate(zip(win.tolist(), best)):
            if b >= 0:
                done = True  # the reference stops: nobody's removal pays
                break
            if t > 0 and b >= outside:
                break  # someone outside the table might win this step: recompute every delta
            dropped.append(int(pool[w]))
            s = float(s_before[t]) - float(v_on[alive[pool[w]]])
            if pool[w] != guess[t]:
                break  # the guess is off from here on
        keep[alive[dropped]] = False
        alive = np.delete(alive, dropped)
        if done:
            break
    return keep, s


@dataclass(frozen=True)
class Band:
    """The share levels and what the closed-form level crossings need of them, worked out once per search."""

    share: np.ndarray  # (levels,) ascending
    inverse_gap: np.ndarray  # [j, k] = 1 / (s_k − s_j), 0 on the diagonal
    above: np.ndarray  # [j, k]: 0 where k > j, -inf elsewhere (added before a max over k)
    below: np.ndarray  # [j, k]: 0 where k < j, +inf elsewhere (added before a min over k)

    @classmethod
    def of(cls, share: np.ndarray) -> Band:
        gap = share[None, :] - share[:, None]
        upper = np.arange(len(share))[None, :] > np.arange(len(share))[:, None]
        return cls(
            share,
            np.divide(1.0, gap, out=np.zeros_like(gap), where=gap != 0),
            np.where(upper, 0.0, -np.inf),
            np.where(upper.T, 0.0, np.inf),
        )


def _drop_few(
    values: list[float], costs: list[float], K: int, v: float, s: float, keep: np.ndarray
) -> tuple[np.ndarray, float]:
    """The reference's drop loop in Python floats (IEEE doubles, the same operations): for a handful of
    participants cheaper than numpy calls."""
    alive = list(range(len(values)))
    while alive:
        phi_s = _phi(s, K)
        best_i, best = -1, np.inf
        for i in alive:  # ascending: of equal deltas the first, as argmin takes it
            delta = v * (_phi(s - values[i], K) - phi_s) - costs[i]
            if delta < best:
                best_i, best = i, delta
        if best >= 0:
            break
        keep[best_i] = False
        alive.remove(best_i)
        s -= values[best_i]
    return keep, s


def allocate(cost: np.ndarray, band: Band, iterations: int) -> np.ndarray:
    """Each device's share level (-1: sits out) at the bandwidth price the reference's bisection ends at.

    cost: (devices, share levels), each level's cheapest price (inf: no option there)."""
    out = np.full(len(cost), -1)
    live = np.flatnonzero((cost < 0).any(axis=1))  # a device without a negative price never takes part
    if not len(live):
        return out
    c = cost[live]
    choice, used = _respond(c, band.share, 0.0)
    if used > BAND_FULL:
        guessed = _checked_guess(c, band, iterations) if c.size * (iterations + 8) <= BATCH_ELEMENTS else None
        choice = guessed if guessed is not None else _bisect(c, band.share, iterations)
    out[live] = choice
    return out


def _respond(cost: np.ndarray, share: np.ndarray, mu: float) -> tuple[np.ndarray, float]:
    priced = cost + mu * share[None, :]
    c = np.argmin(priced, axis=1)
    c = np.where(priced[np.arange(len(c)), c] < 0, c, -1)
    return c, float(share[c[c >= 0]].sum())


def _bisect(cost: np.ndarray, share: np.ndarray, iterations: int) -> np.ndarray:
    """The reference's bisection, step for step."""
    lo, hi = 0.0, 1.0
    while _respond(cost, share, hi)[1] > BAND_FULL:
        hi *= 2
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if _respond(cost, share, mid)[1] > BAND_FULL:
            lo = mid
        else:
            hi = mid
    return _respond(cost, share, hi)[0]


def _checked_guess(cost: np.ndarray, band: Band, iterations: int) -> np.ndarray | None:
    """The bisection's result from the price μ* where the shares first fit, if one batched evaluation of every
    price the bisection would try confirms each of its steps; None otherwise."""
    mu_star = _first_fit(cost, band)
    if mu_star is None:
        return None
    prices, over = [], []
    hi = 1.0
    while hi < mu_star:  # the reference doubles the price while the band is over-used
        prices.append(hi)
        over.append(True)
        hi *= 2
    prices.append(hi)
    over.append(False)
    final, lo = len(prices) - 1, 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        prices.append(mid)
        over.append(mid < mu_star)
        if mid < mu_star:
            lo = mid
        else:
            hi, final = mid, len(prices) - 1
    share = band.share
    priced = cost[None, :, :] + np.array(prices)[:, None, None] * share[None, None, :]
    pick = priced.argmin(axis=2)
    on = priced.min(axis=2) < 0
    used = (share[pick] * on).sum(axis=1)  # another order of summation than the reference's: near the
    unsure = np.abs(used - BAND_FULL) <= 1e-12 * (len(cost) + 1) * np.maximum(used, 1.0)  # limit, sum its way
    for t in np.flatnonzero(unsure):
        used[t] = float(share[pick[t][on[t]]].sum())
    if (used > BAND_FULL).tolist() != over:
        return None
    return np.where(on[final], pick[final], -1)


def _first_fit(cost: np.ndarray, band: Band) -> float | None:
    """μ* = the lowest price at which the devices' best responses fit in the band, from each device's price
    intervals per level (closed form: level j beats level k above μ = (c_j − c_k)/(s_k − s_j))."""
    c = np.where(np.isfinite(cost), cost, _BIG)
    cross = (c[:, :, None] - c[:, None, :]) * band.inverse_gap
    enter = np.maximum((cross + band.above).max(axis=2), 0.0)
    leave = np.minimum((cross + band.below).min(axis=2), -c / band.share)
    taken = enter < leave
    share = np.broadcast_to(band.share, c.shape)
    entering = taken & (enter > 0)
    used0 = float(share[taken & ~entering].sum())
    mu = np.concatenate([enter[entering], leave[taken]])
    order = np.argsort(mu, kind="stable")
    mu, used = mu[order], used0 + np.cumsum(np.concatenate([share[entering], -share[taken]])[order])
    last_at_mu = np.append(mu[1:] != mu[:-1], True)
    fits = np.flatnonzero(last_at_mu & (used <= BAND_FULL))
    if not len(fits):
        return None
    mu_star = float(mu[fits[0]])
    return mu_star if mu_star < 1e300 else None
