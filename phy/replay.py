"""replay link: the channel of a recorded run (its link trace, proto.link_trace) drives a new one.

    edge: frames + [modulation, tx_power_dbm, bandwidth_hz] --zmq--> BS: ReplayUplinkReceiver --> frames, SNR
                                                                        (looks each one up in the trace)

Per frame (device, round, ARQ attempt, seq), at the BS:

* **recorded**: the trace holds this transmission at the same setting (modulation, power, bandwidth): it is
  delivered with the SNR the recording's receiver measured if it was ``ok``, dropped if it was ``lost``. A replay
  of the same run therefore sees every frame do what it did.
* **not recorded** (a policy that plans otherwise sends at other settings, other frames, more attempts or more
  rounds): the trace's
  channel still decides. The reference is that device's round in the trace (its nearest recorded round if this one
  has no received frame): its median measured SNR, moved by the change in transmit power and in noise bandwidth,
  ``snr = snr_ref + (p - p_ref) - 10 log10(b / b_ref)``; loss is drawn from the bench's PER curve at that SNR with
  a generator seeded by (seed, device, round, attempt, seq). A device the trace never heard loses every frame.

The edges' reports are replayed too (`recorded_report`): compute time, training wall time and compute energy are
the recording's for that device and round (their energy_j is the recorded compute energy plus this run's
transmit energy), so a controller sees the recorded devices, not this machine. Airtime and transmit energy follow
this run's frames and plan. Frames reach the BS at once: there is no airtime to wait for.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from phy.channel import PerCurve, TxSetting
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter
from phy.uplink import RxFrame
from proto.air import FrameSidecar, decode_sidecar
from proto.control import Report
from proto.framing import Frame, FrameError
from proto.link_trace import ReportRow, read_trace
from proto.numerology import check_modulation
from trust.keys import KeyPair

log = logging.getLogger(__name__)

_REPLAY_STREAM = 0x4E9A  # separates the replay's loss draws from every other stream of the seed


_Setting = tuple[str | None, float | None, float | None]  # modulation, tx_power_dbm, bandwidth_hz


def _same_setting(recorded: _Setting, sidecar: FrameSidecar) -> bool:
    """Was the frame sent as the recorded one was? (A row without a setting matches any.)"""
    modulation, power_dbm, bandwidth_hz = recorded
    return (
        (modulation is None or modulation == sidecar.modulation)
        and (power_dbm is None or (sidecar.tx_power_dbm is not None and abs(power_dbm - sidecar.tx_power_dbm) < 1e-6))
        and (
            bandwidth_hz is None
            or (sidecar.bandwidth_hz is not None and math.isclose(bandwidth_hz, sidecar.bandwidth_hz, rel_tol=1e-9))
        )
    )


@dataclass(frozen=True)
class _Reference:
    """A device's recorded channel in one round: what frames it did not record are judged against."""

    snr_db: float
    tx_power_dbm: float
    bandwidth_hz: float


@dataclass
class ReplayTrace:
    """A recorded trace, indexed for lookups: frame outcomes, each device's channel per round, the reports."""

    # (device, round, attempt, seq) -> (SNR or None if lost, the setting it was sent at)
    outcomes: dict[tuple[int, int, int, int], tuple[float | None, _Setting]] = field(default_factory=dict)
    references: dict[int, dict[int, _Reference]] = field(default_factory=dict)  # device -> round -> reference
    reports: dict[tuple[int, int], ReportRow] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ReplayTrace:
        """Read a trace (a proto.link_trace.TraceError names a bad line); a later row of the same transmission
        wins (a resumed recording ran its cut-off round again)."""
        trace = cls()
        snrs: dict[tuple[int, int], list[float]] = {}
        settings: dict[tuple[int, int], tuple[float, float]] = {}
        for row in read_trace(path):
            if isinstance(row, ReportRow):
                trace.reports[(row.device, row.round)] = row
                continue
            if row.outcome not in ("ok", "lost"):
                continue  # duplicates, rejected and unexpected frames say nothing about the channel
            key = (row.device, row.round, row.attempt, row.seq)
            snr_db = row.snr_db if row.outcome == "ok" and row.snr_db is not None else None
            trace.outcomes[key] = (snr_db, (row.modulation, row.tx_power_dbm, row.bandwidth_hz))
            if row.outcome == "ok" and row.snr_db is not None:
                snrs.setdefault((row.device, row.round), []).append(row.snr_db)
            if row.tx_power_dbm is not None and row.bandwidth_hz is not None:
                settings[(row.device, row.round)] = (row.tx_power_dbm, row.bandwidth_hz)
        for (device, round_idx), values in snrs.items():
            if (device, round_idx) in settings:
                power, bandwidth = settings[(device, round_idx)]
                ref = _Reference(statistics.median(values), power, bandwidth)
                trace.references.setdefault(device, {})[round_idx] = ref
        return trace

    def reference(self, device_id: int, round_idx: int) -> _Reference | None:
        """The device's recorded channel in this round, else in its nearest recorded round (earlier on a tie)."""
        rounds = self.references.get(device_id)
        if not rounds:
            return None
        nearest = min(rounds, key=lambda r: (abs(r - round_idx), r))
        return rounds[nearest]


class ReplayUplinkTransmitter(SimUplinkTransmitter):
    """Edge side: every frame goes to the BS with the setting it was sent at; the BS's trace decides its fate."""

    def _sidecar(self, true_snr_db: float, setting: TxSetting, *, lost: bool, est_err_db: float) -> FrameSidecar:
        return FrameSidecar(
            modulation=check_modulation(setting.modulation),
            tx_power_dbm=setting.tx_power_dbm,
            bandwidth_hz=setting.bandwidth_hz,
        )


class ReplayUplinkReceiver(SimUplinkReceiver):
    """BS side: frames from the edges, each delivered or dropped as the trace says (see the module docstring)."""

    def __init__(
        self,
        *,
        bind_address: str,
        trace: ReplayTrace,
        per_curve: PerCurve,
        seed: int = 0,
        context: zmq.Context | None = None,
        key: KeyPair | None = None,
    ) -> None:
        super().__init__(bind_address=bind_address, context=context, key=key)
        self.trace = trace
        self.per_curve = per_curve
        self.seed = seed
        self.counts: Counter[str] = Counter()  # recorded_ok, recorded_lost, modelled_ok, modelled_lost, unheard

    def _parse(self, parts: list[bytes], count: int) -> RxFrame | None:
        rx = super()._parse(parts, count)
        if rx is None:
            return None
        sidecar = decode_sidecar(parts[0])  # valid: super()._parse decoded it
        try:
            frame = Frame.from_bytes(rx.data)
        except FrameError:
            return rx  # garbage: the round logic counts it as a bad frame
        snr_db = self._fate(frame, sidecar, len(rx.data))
        return None if snr_db is None else RxFrame(rx.data, snr_db, rx.rx_time)

    def _fate(self, frame: Frame, sidecar: FrameSidecar, frame_bytes: int) -> float | None:
        """The SNR the frame arrives with, or None when the trace's channel loses it."""
        key = (frame.device_id, frame.round_idx, frame.attempt, frame.seq)
        recorded = self.trace.outcomes.get(key)
        if recorded is not None and _same_setting(recorded[1], sidecar):
            snr_db = recorded[0]
            self.counts["recorded_ok" if snr_db is not None else "recorded_lost"] += 1
            return snr_db
        ref = self.trace.reference(frame.device_id, frame.round_idx)
        if ref is None or sidecar.modulation is None or sidecar.tx_power_dbm is None or not sidecar.bandwidth_hz:
            self.counts["unheard"] += 1
            return None
        snr_db = (
            ref.snr_db
            + (sidecar.tx_power_dbm - ref.tx_power_dbm)
            - 10 * math.log10(sidecar.bandwidth_hz / ref.bandwidth_hz)
        )
        per = self.per_curve.per(snr_db, sidecar.modulation, frame_bytes)
        rng = np.random.default_rng([self.seed, _REPLAY_STREAM, *key])
        lost = bool(rng.random() < per)
        self.counts["modelled_lost" if lost else "modelled_ok"] += 1
        return None if lost else snr_db

    def recorded_report(self, report: Report) -> Report:
        """The report with the recording's compute time and energy for this device and round (if it has them)."""
        row = self.trace.reports.get((report.device_id, report.round))
        if row is None:
            return report
        measured = report.measurements
        transmit_j = measured.transmit_energy_j or 0.0
        compute_j = row.compute_energy_j if row.compute_energy_j is not None else measured.compute_energy_j
        update = {
            "compute_s": row.compute_s,
            "train_wall_s": row.train_wall_s,
            "compute_energy_j": compute_j,
            "energy_j": None if compute_j is None else compute_j + transmit_j,
            "energy_source": f"{row.energy_source or 'unknown'}+replay",
            "true_snr_db": None,  # a replay knows what was measured, not the truth behind it
        }
        kept = {k: v for k, v in update.items() if v is not None or k == "true_snr_db"}
        return report.model_copy(update={"measurements": measured.model_copy(update=kept)})
