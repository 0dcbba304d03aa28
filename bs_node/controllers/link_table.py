"""Per (device, link) what the channel gives this round: retransmissions per frame, delivery bounds, delivery.

A link is a (modulation, power, share) setting; its SNR at each of the J fade nodes decides the PER, and the PER
the airtime (expected transmissions per frame) and the delivery of an n-frame update. `CostModel.predict`
computes all of it for every device and link with an `exp` per frame count and node. Here:
- a node above the PER table's span has PER exactly 0 and one below it the table's floor, so the curve (an
  interpolation, a log1p and an expm1 per node) runs only on the nodes inside the span;
- `delivery_cap` bounds the delivery of every frame count from above without an exp, so the caller can drop
  options before their delivery is computed; `delivery` then computes it, with CostModel.predict's operations,
  only for the (link, frame count) pairs asked for.
"""

from __future__ import annotations

import numpy as np

from bs_node.controllers.costs import CostModel, OptionGrid

_SUCCESS = np.array([0.95, 0.5])  # per-attempt success steps of the delivery cap
_SLACK = 1 + 1e-6  # covers the rounding of the exact delivery (log1p, exp, mean) against the cap


class LinkTable:
    """Retransmissions per frame for every (device, link); delivery bounds and exact delivery on demand."""

    def __init__(
        self,
        costs: CostModel,
        grid: OptionGrid,
        noise_dbm: np.ndarray,
        span_db: tuple[np.ndarray, np.ndarray],
        counts: np.ndarray,
        gain_db: np.ndarray,
        fading_db: np.ndarray,
    ):
        K, J = fading_db.shape
        lo_db, hi_db = span_db
        rows = np.arange(K)
        power_gain = grid.link_power_dbm[None, :] + gain_db[:, None]  # the sums CostModel.predict forms
        low = fading_db[rows, fading_db.argmin(axis=1)]
        high = fading_db[rows, fading_db.argmax(axis=1)]
        self.above = (power_gain + low[:, None]) - noise_dbm[None, :] > hi_db[None, :]
        self.below = (power_gain + high[:, None]) - noise_dbm[None, :] < lo_db[None, :]
        floor = np.empty((len(grid.modulations), J))
        mixed_k, mixed_l, per = [], [], []
        for q, name in enumerate(grid.modulations):  # a modulation's links are one block of columns
            lo, hi = costs.per_table_span_db(name)
            floor[q] = costs.per(np.full((1, J), lo - 1.0), name)[0]
            block = np.flatnonzero(grid.link_modulation == q)
            mk, mb = np.nonzero(~(self.above[:, block] | self.below[:, block]))
            ml = block[mb]
            snr = (power_gain[mk, ml][:, None] + fading_db[mk]) - noise_dbm[ml][:, None]
            node_per = np.where(snr > hi, 0.0, floor[q])
            inside = (snr >= lo) & (snr <= hi)
            node_per[inside] = costs.per(snr[inside], name)
            mixed_k.append(mk)
            mixed_l.append(ml)
            per.append(node_per)
        self.mixed_k, self.mixed_l = np.concatenate(mixed_k), np.concatenate(mixed_l)
        self.per = np.concatenate(per)
        mk, ml = self.mixed_k, self.mixed_l
        self.attempts = costs.bench.arq.max_attempts
        self.counts = counts
        floor_tx = (1 / (1 - np.minimum(floor, 0.99))).mean(axis=1)
        self.txpf = np.where(self.below, floor_tx[grid.link_modulation][None, :], 1.0)
        self.txpf[mk, ml] = row_mean(1 / (1 - np.minimum(self.per, 0.99)))
        self.mixed_row = np.full(self.txpf.shape, -1)
        self.mixed_row[mk, ml] = np.arange(len(mk))
        self.link_modulation = grid.link_modulation
        # below the span every node has the floor PER: one delivery per (frame count, modulation)
        self.floor_delivery = _exact_delivery(floor, self.attempts, counts)
        self._steps: tuple[np.ndarray, np.ndarray] | None = None

    def delivery_cap_at(self, count_slot: int) -> np.ndarray:
        """(devices, links): `delivery_cap` of every (device, link) for one frame count."""
        out = np.where(self.below, self.floor_delivery[count_slot][self.link_modulation][None, :], 1.0)
        if self._steps is None:
            self._steps = self._success_steps()
        sure, likely = self._steps
        n, J = self.counts[count_slot], self.per.shape[1]
        out[self.mixed_k, self.mixed_l] = (
            (sure + (likely - sure) * _SUCCESS[0] ** n + (J - likely) * _SUCCESS[1] ** n) / J * _SLACK
        )
        return out

    def delivery_cap(self, k: np.ndarray, link: np.ndarray, count_slots: np.ndarray) -> np.ndarray:
        """(pairs, len(count_slots)): at least the delivery `delivery` computes, found without an exp.

        A node's per-attempt success 1 − PER^A below θ delivers n frames with at most θ^n: the nodes are
        counted by whether their success may reach 0.95 (bound 1), 0.5 (bound 0.95^n) or neither (0.5^n)."""
        if self._steps is None:
            self._steps = self._success_steps()
        n = self.counts[count_slots][None, :]
        out = np.ones((len(k), len(count_slots)))
        below = self.below[k, link]
        out[below] = self.floor_delivery[count_slots][:, self.link_modulation[link[below]]].T
        row = self.mixed_row[k, link]
        mixed = row >= 0
        sure, likely = self._steps[0][row[mixed]][:, None], self._steps[1][row[mixed]][:, None]
        J = self.per.shape[1]
        out[mixed] = (sure + (likely - sure) * _SUCCESS[0] ** n + (J - likely) * _SUCCESS[1] ** n) / J * _SLACK
        return out

    def _success_steps(self) -> tuple[np.ndarray, np.ndarray]:
        """Per link between the table's ends: how many nodes may have a success of at least 0.95, and 0.5."""
        edges = (1 - _SUCCESS) ** (1 / self.attempts) * (1 + 1e-9)  # PER above the edge: success below θ
        counts = []
        for edge in edges:  # column by column: a row sum over 8 nodes costs more in loop overhead
            counts.append(sum((self.per[:, j] <= edge).astype(float) for j in range(self.per.shape[1])))
        return counts[0], counts[1]

    def delivery(self, k: np.ndarray, link: np.ndarray, asked: np.ndarray) -> np.ndarray:
        """(pairs, counts): ρ of each (device, link) pair for the frame counts asked for (asked: same shape, bool),
        exactly as CostModel.predict computes it; 1 where not asked."""
        out = np.ones(asked.shape)
        below = self.below[k, link]
        out[below] = self.floor_delivery[:, self.link_modulation[link[below]]].T
        row = self.mixed_row[k, link]
        mixed = np.flatnonzero((row >= 0) & asked.any(axis=1))
        with np.errstate(divide="ignore"):  # a frame that never gets through: log 0 = -inf, exp(-inf) = 0
            log_frame_ok = np.log1p(-(self.per[row[mixed]] ** self.attempts))
        # one exp over every asked (link, count); a link without loss (log 0 = 0 at every node) gets exactly 1,
        # as CostModel.predict sets it
        at, c = np.nonzero(asked[mixed])
        out[mixed[at], c] = _mean_exp(self.counts[c][:, None] * log_frame_ok[at])
        return out


def _exact_delivery(per: np.ndarray, attempts: int, counts: np.ndarray) -> np.ndarray:
    """(counts, links): the mean over the nodes of (1 − PER^A)^n, by CostModel.predict's operations."""
    with np.errstate(divide="ignore"):
        log_frame_ok = np.log1p(-(per**attempts))
    lossy = (log_frame_ok < 0).any(axis=1)
    out = np.ones((len(counts), len(per)))
    for c, n in enumerate(counts):
        out[c, lossy] = _mean_exp(n * log_frame_ok[lossy])
    return out


def _mean_exp(x: np.ndarray) -> np.ndarray:
    """exp(x).mean(axis=1) to the bit. Below −746 exp is exactly 0 (under the smallest subnormal): clipping there
    changes no value and keeps np.exp off its slow underflow path."""
    return row_mean(np.exp(np.maximum(x, -746.0)))


def _pairwise_mean_of_8(a: np.ndarray) -> np.ndarray:
    c = [a[:, i] for i in range(8)]
    return (((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]))) / 8


def _numpy_sums_8_pairwise() -> bool:
    """Whether this numpy reduces a row of 8 as ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7)) (numpy 1.26 does)."""
    probe = np.arange(512.0).reshape(64, 8)
    probe = (probe * 0.6180339887) % 1.0 * 10.0 ** -(probe % 9)
    return bool(np.array_equal(_pairwise_mean_of_8(probe), probe.mean(axis=1)))


_ROWS_OF_8_PAIRWISE = _numpy_sums_8_pairwise()


def row_mean(a: np.ndarray) -> np.ndarray:
    """a.mean(axis=1) to the bit; for the J = 8 fade nodes as column sums (numpy's own per-row reduction of 8
    numbers costs more in loop overhead than in additions)."""
    if a.shape[1] == 8 and _ROWS_OF_8_PAIRWISE:
        return _pairwise_mean_of_8(a)
    return a.mean(axis=1)
