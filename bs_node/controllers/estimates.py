"""What the controller knows of each device, learned from measurements only.

Channel gain from the SNR the BS receiver measured at the power and bandwidth that were used; compute
CPU-seconds per module from what the devices reported. Both are smoothed, and both survive a round without
a measurement (the channel estimate keeps its mean and grows less certain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from bs_node.measurements import DeviceRound
from config import ChannelConfig
from phy.channel import SimChannel, TxSetting

FADING_NODES = 8  # quantile nodes of the next round's channel (equal weights)
# 10 log10 |h|^2 with |h|^2 ~ Exp(1) (Rayleigh block fading): mean −2.51 dB, standard deviation 5.57 dB
RAYLEIGH_LOG_MEAN_DB = -10 * 0.5772156649 / math.log(10)
RAYLEIGH_LOG_STD_DB = 10 / math.log(10) * math.pi / math.sqrt(6)


def rayleigh_nodes_db(n: int = FADING_NODES) -> np.ndarray:
    """Mid-quantile nodes of 10 log10 Exp(1) minus its mean: the spread of a Rayleigh block fade around the
    dB-average an EWMA of measured gains converges to."""
    u = (np.arange(n) + 0.5) / n
    return 10 * np.log10(-np.log1p(-u)) - RAYLEIGH_LOG_MEAN_DB


def gaussian_nodes_db(std_db: float, n: int = FADING_NODES) -> np.ndarray:
    dist = NormalDist()
    return np.array([std_db * dist.inv_cdf((i + 0.5) / n) for i in range(n)])


_RAYLEIGH_NODES_DB = rayleigh_nodes_db()
_GAUSSIAN_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / FADING_NODES) for i in range(FADING_NODES)])


@dataclass
class GainEstimate:
    mean_db: float
    var_db2: float
    measured_rounds: int = 0


class ChannelEstimator:
    """Per-device channel power gain (dB): EWMA of g = snr − p + N(bw) with its variance."""

    def __init__(
        self,
        channel: ChannelConfig,
        ewma: float = 0.5,
        prior_var_db2: float = 100.0,
        missing_var_growth_db2: float = 4.0,
        min_std_db: float = 1.0,
    ):
        channel = channel.nominal()  # never the sim's impairments: they show only in the measured SNR
        self.channel = SimChannel(channel, seed=0)  # for its noise and path-loss formulas only
        self.rayleigh = channel.fading == "rayleigh"
        self.min_std_db = min_std_db
        self.ewma, self.prior_var, self.growth = ewma, prior_var_db2, missing_var_growth_db2
        self.estimates: dict[int, GainEstimate] = {}

    def prior(self, device_id: int, distance_m: float) -> GainEstimate:
        """Before the first measurement: the nominal path loss at the bench distance, very uncertain."""
        est = self.estimates.get(device_id)
        if est is None:  # nominal path loss is the mean power gain; the EWMA tracks the dB average
            fade_db = RAYLEIGH_LOG_MEAN_DB if self.rayleigh else 0.0
            est = GainEstimate(-self.channel.path_loss_db(distance_m) + fade_db, self.prior_var)
            self.estimates[device_id] = est
        return est

    def observe(self, row: DeviceRound) -> None:
        est = self.estimates.get(row.device_id)
        if row.snr_db is None or row.bandwidth_hz <= 0:
            if est is not None and row.participated:
                est.var_db2 += self.growth  # planned but no frame measured: less sure of the channel
            return
        setting = TxSetting(
            tx_power_dbm=row.tx_power_dbm, bandwidth_hz=row.bandwidth_hz, modulation=row.modulation or "qpsk"
        )
        gain_db = self.channel.gain_db_from_snr(row.snr_db, setting)
        if est is None or est.measured_rounds == 0:
            self.estimates[row.device_id] = GainEstimate(gain_db, 4.0, 1)  # one round: fading spread ~2 dB
            return
        err = gain_db - est.mean_db
        est.mean_db += self.ewma * err
        est.var_db2 = (1 - self.ewma) * (est.var_db2 + self.ewma * err * err)
        est.measured_rounds += 1

    def planning_gain_db(self, device_id: int, distance_m: float, margin_sigmas: float) -> float:
        est = self.estimates.get(device_id) or self.prior(device_id, distance_m)
        return est.mean_db - margin_sigmas * math.sqrt(max(est.var_db2, 0.0))

    def planning_table(
        self, devices: list[tuple[int, float]], margin_sigmas: float
    ) -> tuple[list[GainEstimate], np.ndarray, np.ndarray]:
        """For (device_id, distance_m) pairs at once: their estimates, `planning_gain_db` and `spread_nodes_db`
        (K, J), by the same operations (the solver reads a thousand devices per round)."""
        ests = [self.estimates.get(k) or self.prior(k, distance_m) for k, distance_m in devices]
        mean = np.array([e.mean_db for e in ests])
        std = np.sqrt(np.maximum(np.array([e.var_db2 for e in ests]), 0.0))
        gain = mean - margin_sigmas * std
        rayleigh = (std <= RAYLEIGH_LOG_STD_DB) if self.rayleigh else np.zeros(len(ests), dtype=bool)
        gaussian = np.maximum(std, self.min_std_db)[:, None] * _GAUSSIAN_QUANTILES[None, :]
        return ests, gain, np.where(rayleigh[:, None], _RAYLEIGH_NODES_DB[None, :], gaussian)

    def spread_nodes_db(self, device_id: int, distance_m: float) -> np.ndarray:
        """Equally likely offsets (dB) of the next round's gain around the estimate.

        With a Rayleigh bench the next block is a fresh fade: its exact quantiles, unless the estimate itself is
        even less certain (no measurement yet), then a Gaussian of the estimate's spread. Without a fading
        model: a Gaussian of the measured spread (at least ``min_std_db``)."""
        est = self.estimates.get(device_id) or self.prior(device_id, distance_m)
        std_db = math.sqrt(max(est.var_db2, 0.0))
        if self.rayleigh and std_db <= RAYLEIGH_LOG_STD_DB:
            return rayleigh_nodes_db()
        return gaussian_nodes_db(max(std_db, self.min_std_db))


class ComputeEstimator:
    """CPU-seconds per local step per unit of module cost κ(d) = 1 + d/L, per device (EWMA)."""

    def __init__(self, ewma: float = 0.5, prior_cpu_s_per_step: float = 0.5):
        self.ewma, self.prior = ewma, prior_cpu_s_per_step
        self.per_unit: dict[int, float] = {}
        self.wall_per_cpu: dict[int, float] = {}

    @staticmethod
    def cost(depth: int, num_layers: int) -> float:
        return 1.0 + depth / max(num_layers, 1)

    def observe(self, row: DeviceRound, steps: int, num_layers: int) -> None:
        if row.compute_s <= 0 or steps <= 0 or row.depth <= 0:
            return
        unit = row.compute_s / (steps * self.cost(row.depth, num_layers))
        old = self.per_unit.get(row.device_id)
        self.per_unit[row.device_id] = unit if old is None else old + self.ewma * (unit - old)
        if row.train_wall_s > 0:
            ratio = row.train_wall_s / row.compute_s
            old = self.wall_per_cpu.get(row.device_id)
            self.wall_per_cpu[row.device_id] = ratio if old is None else old + self.ewma * (ratio - old)

    def measured(self, device_id: int) -> bool:
        return device_id in self.per_unit

    def cpu_s(self, device_id: int, steps: int, depth: int, num_layers: int) -> float:
        return self.per_unit.get(device_id, self.prior) * steps * self.cost(depth, num_layers)

    def wall_s(self, device_id: int, steps: int, depth: int, num_layers: int) -> float:
        return self.cpu_s(device_id, steps, depth, num_layers) * self.wall_per_cpu.get(device_id, 1.0)

    def tables(self, device_ids: list[int], steps: int, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, L + 1) `cpu_s` and `wall_s` of every depth 0..L, by the same operations."""
        per_step = np.array([self.per_unit.get(k, self.prior) for k in device_ids]) * steps
        cpu = per_step[:, None] * np.array([self.cost(d, num_layers) for d in range(num_layers + 1)])[None, :]
        return cpu, cpu * np.array([self.wall_per_cpu.get(k, 1.0) for k in device_ids])[:, None]
