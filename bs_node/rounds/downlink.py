"""The downlink over the PHY, the BS's side: the adapter view with its ARQ, and the uplink's acks (docs/DESIGN.md
"Downlink over the PHY").

Each round the participants' views are broadcast once per module (rank, depth): the view's frames (proto.framing,
sender BS_DEVICE_ID) in bursts of `downlink.burst_frames` over the whole band at the BS's power and modulation,
to every device planned with that module. After the attempt's last burst each edge answers `view_status` with the
frames it holds; the BS sends the missing ones again to that device alone while it has had fewer than
`arq.max_attempts` attempts. What the downlink cost (airtime, the BS's transmit energy, bursts, frames each device
missed) goes into the round's record. The uplink ARQ's acks go the same way, one burst to the device each
(`send_ack`), their airtime and energy in the same totals.

No sockets: the runner hands in a `send` callable (RoundTransport.send_downlink).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bs_node.measurements import DeviceRound
from config import BenchConfig
from fedlora.energy import transmit_energy_j
from phy.channel import TxSetting
from phy.uplink import DownlinkBurst, TxReport
from proto.control import Ack, ViewStatus, encode
from proto.framing import BS_DEVICE_ID, Frame, fragment

log = logging.getLogger("bs")

Module = tuple[int, int]  # (rank, depth)
SendDownlink = Callable[[DownlinkBurst], TxReport]  # RoundTransport.send_downlink


@dataclass
class DeviceDownlink:
    """One participant's view this round: attempts made for it, frames it missed, whether it holds the view."""

    module: Module
    attempts: int = 0
    frames_sent: int = 0  # frame transmissions meant for it (every attempt)
    received: set[int] = field(default_factory=set)  # the seqs it reported holding
    complete: bool = False
    answered: set[int] = field(default_factory=set)  # attempts it sent a view_status for
    started_s: float | None = None  # the BS's clock when the first burst of its view went out
    wait_s: float | None = None  # from then to the status that it holds the whole view

    @property
    def frames_lost(self) -> int:
        """Transmissions meant for it that it did not report (a frame is only sent again when reported missing)."""
        return max(0, self.frames_sent - len(self.received))


@dataclass
class DownlinkTotals:
    """What the round's downlink cost, for the round record."""

    airtime_s: float = 0.0
    energy_j: float = 0.0  # the BS's transmit energy: (P / PA efficiency + radio on) x airtime
    bursts: int = 0
    acks: int = 0  # uplink ARQ acks sent over the air (their bursts count in bursts, airtime and energy)
    frames_sent: int = 0
    bytes_sent: int = 0


class Downlink:
    """The round's views on the air and each participant's downlink ARQ."""

    def __init__(self, bench: BenchConfig, send: SendDownlink, clock: Callable[[], float] = time.monotonic) -> None:
        self.bench, self.send, self.clock = bench, send, clock
        dl = bench.downlink
        self.setting = TxSetting(dl.tx_power_dbm, bench.radio.total_bandwidth_hz, dl.modulation)
        self.round_idx = -1
        self.frames: dict[Module, list[Frame]] = {}
        self.hashes: dict[Module, str] = {}  # hex SHA-256 of each view: the edge checks what it reassembled
        self.devices: dict[int, DeviceDownlink] = {}
        self.totals = DownlinkTotals()

    def start_round(self, round_idx: int, views: Mapping[Module, bytes], modules: Mapping[int, Module]) -> None:
        """Fragment each view (its frames and hash go in the plans: `announce`); nothing is sent yet."""
        self.round_idx = round_idx
        payload = self.bench.radio.frame_payload_bytes
        self.frames = {m: fragment(view, BS_DEVICE_ID, round_idx, payload) for m, view in views.items()}
        self.hashes = {m: hashlib.sha256(view).hexdigest() for m, view in views.items()}
        self.devices = {d: DeviceDownlink(m) for d, m in modules.items() if m in self.frames}
        self.totals = DownlinkTotals()

    def announce(self, module: Module) -> dict[str, object]:
        """The plan fields that tell an edge its view comes over the air."""
        return {"view_frames": len(self.frames[module]), "view_sha256": self.hashes[module]}

    def broadcast(self, exclude: set[int]) -> None:
        """Attempt 1: every module's view to the devices planned with it but those excluded (no plan went out)."""
        for d in exclude:
            self.devices.pop(d, None)
        for module, frames in sorted(self.frames.items()):
            targets = [d for d, dev in sorted(self.devices.items()) if dev.module == module]
            if targets:
                self._send(frames, targets)

    def on_status(self, device_id: int, msg: ViewStatus) -> None:
        """An edge's frames after an attempt: done, or the missing ones again while attempts are left."""
        dev = self.devices.get(device_id)
        if dev is None or msg.round != self.round_idx or dev.complete:
            return
        if msg.attempt in dev.answered and not msg.timed_out:
            return  # the same status again
        frames = self.frames[dev.module]
        if msg.total != len(frames):
            log.warning("downlink: device %d reports %d frames of a %d-frame view", device_id, msg.total, len(frames))
            return
        dev.answered.add(msg.attempt)
        dev.received |= {s for s in msg.received if s < len(frames)}
        missing = [f for f in frames if f.seq not in dev.received]
        if not missing:
            dev.complete = True
            dev.wait_s = None if dev.started_s is None else self.clock() - dev.started_s
            return
        if dev.attempts >= self.bench.arq.max_attempts:
            log.info(
                "downlink: device %d still misses %d view frames after %d attempts",
                device_id,
                len(missing),
                dev.attempts,
            )
            return
        self._send(missing, [device_id])

    def annotate(self, row: DeviceRound) -> None:
        """The device's downlink in its record row (a device that got no view keeps None)."""
        dev = self.devices.get(row.device_id)
        if dev is not None:
            row.downlink_attempts = dev.attempts
            row.downlink_frames_lost = dev.frames_lost
            row.view_received = dev.complete
            row.downlink_wait_s = dev.wait_s

    def send_ack(self, device_id: int, ack: Ack) -> None:
        """An uplink ARQ ack over the air: the message in frames addressed to the device (sender field = its id,
        attempt = the acknowledged attempt), one burst."""
        payload = self.bench.radio.frame_payload_bytes
        frames = [
            replace(f, attempt=ack.attempt).to_bytes() for f in fragment(encode(ack), device_id, ack.round, payload)
        ]
        self._account(self.send(DownlinkBurst(frames, [device_id], ack.round, self.setting, final=True, kind="ack")))
        self.totals.acks += 1

    def _account(self, report: TxReport) -> None:
        self.totals.bursts += 1
        self.totals.frames_sent += report.frames_sent
        self.totals.bytes_sent += report.bytes_sent
        self.totals.airtime_s += report.airtime_s
        radio = self.bench.radio
        self.totals.energy_j = transmit_energy_j(
            self.setting.tx_power_dbm, self.totals.airtime_s, radio.pa_efficiency, radio.radio_on_power_w
        )

    def _send(self, frames: Sequence[Frame], targets: list[int]) -> None:
        now = self.clock()
        for d in targets:
            dev = self.devices[d]
            dev.attempts += 1
            dev.frames_sent += len(frames)
            dev.started_s = now if dev.started_s is None else dev.started_s
        attempt = self.devices[targets[0]].attempts
        per_burst = self.bench.downlink.burst_frames
        for start in range(0, len(frames), per_burst):
            chunk = [replace(f, attempt=attempt).to_bytes() for f in frames[start : start + per_burst]]
            final = start + per_burst >= len(frames)
            self._account(self.send(DownlinkBurst(chunk, targets, self.round_idx, self.setting, final)))
