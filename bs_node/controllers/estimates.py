"""What the controller knows of each device, learned from measurements only.

Channel gain from the SNR the BS receiver measured at the power and bandwidth that were used; compute
CPU-seconds per module from what the devices reported. Both are smoothed, and both survive a round without
a measurement (the channel estimate keeps its mean and grows less certain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from bs_node.measurements import DeviceRound
from phy.channel import ChannelConfig, SimChannel, TxSetting


@dataclass
class GainEstimate:
    mean_db: float
    var_db2: float
    measured_rounds: int = 0


class ChannelEstimator:
    """Per-device channel power gain (dB): EWMA of g = snr − p + N(bw) with its variance."""

    def __init__(self, channel: ChannelConfig, ewma: float = 0.5, prior_var_db2: float = 100.0,
                 missing_var_growth_db2: float = 4.0):
        self.channel = SimChannel(channel, seed=0)  # for its noise and path-loss formulas only
        self.ewma, self.prior_var, self.growth = ewma, prior_var_db2, missing_var_growth_db2
        self.estimates: dict[int, GainEstimate] = {}

    def prior(self, device_id: int, distance_m: float) -> GainEstimate:
        """Before the first measurement: the nominal path loss at the bench distance, very uncertain."""
        est = self.estimates.get(device_id)
        if est is None:
            est = GainEstimate(-self.channel.path_loss_db(distance_m), self.prior_var)
            self.estimates[device_id] = est
        return est

    def observe(self, row: DeviceRound) -> None:
        est = self.estimates.get(row.device_id)
        if row.snr_db is None or row.bandwidth_hz <= 0:
            if est is not None and row.participated:
                est.var_db2 += self.growth  # planned but no frame measured: less sure of the channel
            return
        setting = TxSetting(tx_power_dbm=row.tx_power_dbm, bandwidth_hz=row.bandwidth_hz,
                            modulation=row.modulation or "qpsk")
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
