"""What one round measured, per device: the controller's input and the run record's content."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DeviceRound:
    """One device in one round. Link numbers come from the BS receiver and the edge's ARQ; energy from the edge."""

    device_id: int
    participated: bool
    status: str  # ok | not_selected | timeout | undelivered | bad_update | failed | offline
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
    arq_attempts: int = 0
    snr_db: float | None = None  # mean per-frame SNR measured by the BS receiver
    snr_db_min: float | None = None
    snr_db_max: float | None = None
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
    error: str | None = None


# What an edge reports of its own round, with the type each value must have.
EDGE_REPORTED: dict[str, type] = {
    "update_bytes": int,
    "uplink_bytes": int,
    "frames_sent": int,
    "frames_lost": int,
    "arq_attempts": int,
    "airtime_s": float,
    "compute_s": float,
    "train_wall_s": float,
    "compute_energy_j": float,
    "transmit_energy_j": float,
    "energy_j": float,
    "energy_source": str,
    "train_loss": float,
    "train_examples": int,
    "kept_components": int,
    "total_components": int,
    "residual_norm": float,
}


def apply_report(row: DeviceRound, measurements: dict) -> list[str]:
    """Copy an edge's reported measurements into its row; returns the problems (bad values are skipped)."""
    problems = []
    for name, value in measurements.items():
        want = EDGE_REPORTED.get(name)
        if want is None or value is None:
            continue
        ok = (
            isinstance(value, str)
            if want is str
            else (isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value >= 0)
        )
        if want is int and ok:
            ok = float(value).is_integer()
        if not ok:
            problems.append(f"{name}={value!r}")
            continue
        setattr(row, name, want(value))
    return problems


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    eval_loss: float | None
    wall_s: float
    policy: str
    downlink_bytes: int
    devices: list[DeviceRound] = field(default_factory=list)
    controller: dict = field(default_factory=dict)  # the controller's inputs and internal state for this round
    stale_updates: dict = field(default_factory=dict)  # device -> round of its update reused in this aggregate

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def uplink_bytes(self) -> int:
        return sum(d.uplink_bytes for d in self.devices)

    @property
    def energy_j(self) -> float:
        return sum(d.energy_j for d in self.devices)
