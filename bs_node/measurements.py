"""What one round measured, per device: the controller's input and the run record's content."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from proto.control import Measurements


@dataclass
class DeviceRound:
    """One device in one round. Link numbers come from the BS receiver and the edge's ARQ; energy from the edge."""

    device_id: int
    participated: bool
    status: str  # ok | not_selected | timeout | dropped | offline | undelivered | bad_update | failed
    rank: int = 0
    depth: int = 0
    tx_power_dbm: float = 0.0
    bandwidth_hz: float = 0.0
    modulation: str = ""
    keep_fraction: float = 1.0
    update_bytes: int = 0  # the encoded update
    uplink_bytes: int = 0  # frame bytes put on the air, retransmissions included
    frames_sent: int = 0
    frames_lost: int = 0  # transmissions the BS did not acknowledge
    frames_received: int = 0  # distinct frames the BS received
    frames_rejected: int = 0  # frames claiming this device that the BS's gate refused (forged, replayed, ...)
    arq_attempts: int = 0
    snr_db: float | None = None  # mean per-frame SNR measured by the BS receiver
    snr_db_min: float | None = None
    snr_db_max: float | None = None
    true_snr_db: float | None = None  # the channel's true SNR (sim PHYs only): ground truth for the estimate snr_db
    airtime_s: float = 0.0
    compute_s: float = 0.0  # CPU-seconds of local training
    train_wall_s: float = 0.0
    compute_energy_j: float = 0.0
    transmit_energy_j: float = 0.0
    energy_j: float = 0.0
    energy_source: str = ""
    train_loss: float | None = None
    train_examples: int = 0
    kept_components: int = 0  # rank components sent (all modules), of total_components
    total_components: int = 0
    residual_norm: float = 0.0  # error-feedback residual the device keeps for later rounds
    # the BS's: the L2 norm of the update it decoded (what was delivered) and whether it was clipped to its bound
    # (fedlora/clipping.py); None/False where no update of this round was decoded
    update_norm: float | None = None
    clipped: bool = False
    error: str | None = None
    # rf PHY only (phy.rf take_radio_counts; None on other PHYs or where the radio block does not report them):
    radio_underruns: int | None = None  # the edge's TX radio this round
    radio_overruns: int | None = None  # the BS's RX radio this round (the same in every row of the round)
    # the view over the PHY (bench downlink.over_phy; None elsewhere): downlink attempts made for this device,
    # frames of them it did not receive, and whether it ended up holding the whole view
    downlink_attempts: int | None = None
    downlink_frames_lost: int | None = None
    view_received: bool | None = None
    downlink_wait_s: float | None = None  # from the first burst of its view to the status that it holds it all
    downlink_snr_db: float | None = None  # the mean SNR the edge's receiver measured on its view's frames


# Measurements that may be negative (dB); every other number an edge reports is a count, a duration or an energy.
SIGNED_MEASUREMENTS = frozenset({"true_snr_db", "downlink_snr_db"})


def apply_report(row: DeviceRound, measurements: Measurements, max_update_bytes: int | None = None) -> list[str]:
    """Copy an edge's reported measurements into its row; returns the problems (values the plan does not allow
    are skipped, the rest of the report still counts).

    proto.control already bounded every number (finite, within its type's range); here the plan's own limits:
    no update larger than the largest encoding of the planned module, no more lost than sent, no more kept
    components than there are."""
    problems = []
    for name, value in measurements:
        if value is None:
            continue
        if isinstance(value, (int, float)) and not (value >= 0 or name in SIGNED_MEASUREMENTS):
            problems.append(f"{name}={value!r}")
            continue
        setattr(row, name, value)
    for name, value, bound in _plan_bounds(measurements, max_update_bytes):
        if value is not None and bound is not None and value > bound:
            problems.append(f"{name}={value!r} > {bound!r}")
            setattr(row, name, DeviceRound.__dataclass_fields__[name].default)
    return problems


def _plan_bounds(m: Measurements, max_update_bytes: int | None) -> list[tuple[str, int | None, int | None]]:
    """(field, reported value, the largest the plan allows) for the fields the plan bounds."""
    return [
        ("update_bytes", m.update_bytes, max_update_bytes),
        ("frames_lost", m.frames_lost, m.frames_sent),
        ("kept_components", m.kept_components, m.total_components),
    ]


def finite_or_none(value: float) -> float | None:
    """An evaluation's number, or None for the NaN of an empty set (no validation data held out)."""
    return value if math.isfinite(value) else None


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    eval_loss: float | None
    wall_s: float
    policy: str
    downlink_bytes: int
    devices: list[DeviceRound] = field(default_factory=list)
    controller: dict[str, Any] = field(default_factory=dict)  # the controller's inputs and state for this round
    stale_updates: dict[int, int] = field(default_factory=dict)  # device -> round of its update reused here
    aggregation: dict[str, Any] = field(default_factory=dict)  # the aggregator, its rule and what it measured
    # on the devices' held-out parts (fedlora/partition.py): what settings are chosen on; accuracy and eval_loss
    # are the test set's, which only reports. None when nothing is held out
    val_accuracy: float | None = None
    val_loss: float | None = None
    frames_rejected: int = 0  # every frame the gate refused this round, whichever device it claimed
    # the view over the PHY (bench downlink.over_phy): airtime_s, energy_j (the BS's), bursts, frames_sent,
    # bytes_sent (bs_node.rounds.downlink.DownlinkTotals); None: the views went with the plans (no airtime)
    downlink: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        """A record as rounds.jsonl holds it (a resumed run reads its earlier rounds back)."""
        rows = [DeviceRound(**row) for row in data.get("devices", [])]
        stale = {int(k): v for k, v in data.get("stale_updates", {}).items()}
        return cls(**{**data, "devices": rows, "stale_updates": stale})

    @property
    def uplink_bytes(self) -> int:
        return sum(d.uplink_bytes for d in self.devices)

    @property
    def energy_j(self) -> float:
        return sum(d.energy_j for d in self.devices)


def run_totals(records: Sequence[RoundRecord]) -> dict[str, float]:
    """The run summary's totals: the edges' uplink bytes and energy; the downlink's bytes, airtime and the BS's
    transmit energy (0 where the views went with the plans: no airtime, no energy)."""
    downlink = [r.downlink for r in records if r.downlink is not None]
    return {
        "total_uplink_bytes": sum(r.uplink_bytes for r in records),
        "total_energy_j": sum(r.energy_j for r in records),
        "total_downlink_bytes": sum(r.downlink_bytes for r in records),
        "total_downlink_airtime_s": sum(d["airtime_s"] for d in downlink),
        "total_bs_energy_j": sum(d["energy_j"] for d in downlink),
    }
