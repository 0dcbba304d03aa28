"""The one uplink interface every PHY implements: sim, gr-loopback, gr-zmq-iq, rf.

Nodes talk only to these classes (link.factory opens the bench's implementation), so the base station and edge
code never branch on which PHY is underneath.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phy.channel import TxSetting
from proto.numerology import MAX_PACKET_BYTES, burst_airtime_s

if TYPE_CHECKING:  # pragma: no cover
    import zmq

    from proto.air import DownlinkFrames
    from proto.control import Report


@dataclass
class TxReport:
    """What one send() put on the air (lost frames included: they still cost airtime)."""

    frames_sent: int
    bytes_sent: int  # frame bytes put on the air
    airtime_s: float


@dataclass
class RxFrame:
    """One packet that passed the PHY; parse data with Frame.from_bytes."""

    data: bytes
    snr_db: float | None  # the receiver's *measured* per-frame SNR (None if the PHY has none)
    rx_time: float  # time.time() at reception


@dataclass(frozen=True)
class DownlinkBurst:
    """One BS burst over the whole band (setting.bandwidth_hz) for some devices, on a PHY with a downlink."""

    frames: Sequence[bytes]
    device_ids: Sequence[int]
    round_idx: int
    setting: TxSetting
    final: bool  # the last burst of this attempt (the edges answer after it)
    kind: str = "view"  # "view": the adapter view's frames; "ack": an uplink ARQ ack for one device


def checked_frames(frames: Sequence[bytes]) -> list[bytes]:
    """The frames as bytes, or a ValueError naming the first one the PHY cannot carry."""
    out = [bytes(f) for f in frames]
    too_big = [len(f) for f in out if len(f) > MAX_PACKET_BYTES]
    if too_big:
        raise ValueError(f"frame of {max(too_big)} bytes exceeds the PHY packet limit {MAX_PACKET_BYTES}")
    return out


class UplinkTransmitter(ABC):
    """Edge side of the data plane."""

    @abstractmethod
    def send(self, frames: Sequence[bytes], setting: TxSetting, *, round_idx: int) -> TxReport:
        """Transmit one burst of frames (best effort; no delivery guarantee)."""

    def set_center_freq_hz(self, center_freq_hz: float | None) -> None:
        """The carrier the round's plan gives this device (rf benches); links without radios have none."""

    def take_radio_counts(self) -> dict[str, int | None]:
        """The radio's underruns and overruns since the last call; None: nothing counts them (no radio)."""
        return {"underruns": None, "overruns": None}

    def take_downlink(self, timeout_s: float) -> list[DownlinkFrames]:
        """The downlink bursts that reached this device (waiting up to timeout_s for one), for a PHY with a
        downlink (gr-zmq-iq: bench downlink.over_phy)."""
        raise NotImplementedError(f"{type(self).__name__} has no downlink PHY (bench downlink.over_phy)")

    def estimate_airtime_s(self, frame_sizes: Sequence[int], setting: TxSetting) -> float | None:
        """Airtime that sending frames of these sizes would take, or None if unknown.

        Lets ARQ check an airtime budget before a retransmission instead of
        extrapolating from earlier attempts. Every link here carries the same OFDM
        packets at the bandwidth share's sample rate; a link whose radios run at
        another rate (rf) says so by overriding this.
        """
        return burst_airtime_s(frame_sizes, setting.modulation, setting.bandwidth_hz)

    def close(self) -> None:
        """Release resources; idempotent."""

    def __enter__(self) -> UplinkTransmitter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class UplinkReceiver(ABC):
    """Base-station side of the data plane."""

    address: str  # what the BS advertises to the edges as its data address (each implementation sets it)

    @abstractmethod
    def recv(self, timeout_s: float) -> list[RxFrame]:
        """Whatever arrived within timeout_s (possibly empty); never raises on garbage input."""

    @property
    def poll_socket(self) -> zmq.Socket[Any] | int | None:
        """What becomes readable when frames are waiting, for zmq.Poller: a zmq socket or a file descriptor
        (the GNU Radio receivers' pipe); None: the caller polls recv() itself."""
        return None

    def start_round(self, round_idx: int, widths_hz: Mapping[int, float]) -> dict[int, float]:
        """The round's bandwidth shares (device -> planned bandwidth_hz of the participants), for PHYs with a subband
        plan; returns each device's carrier (Hz) when the devices must be told it (radios), else nothing."""
        return {}

    def take_radio_counts(self) -> dict[str, int | None]:
        """The radio's underruns and overruns since the last call; None: nothing counts them (no radio)."""
        return {"underruns": None, "overruns": None}

    def send_downlink(self, burst: DownlinkBurst) -> TxReport:
        """Broadcast one burst of frames to its devices as OFDM over the whole band (gr-zmq-iq)."""
        raise NotImplementedError(f"{type(self).__name__} has no downlink PHY (bench downlink.over_phy)")

    def flush_recording(self) -> None:
        """Write out what a recording of the receiver's IQ holds so far (a PHY that records any)."""

    def recorded_report(self, report: Report) -> Report:
        """An edge's report as the BS records it: unchanged, except on a link that replays a recording's devices
        along with its channel (phy.replay)."""
        return report

    def drain_until_quiet(self, quiet_s: float, max_wait_s: float) -> Iterator[RxFrame]:
        """Frames until none arrived for quiet_s (or max_wait_s passed).

        Data and control travel on different paths, so an ARQ ack request can
        overtake the tail of a burst; the BS calls this before answering it.
        A generator, one recv() batch at a time: the caller handles each batch before the next is taken, so a
        peer that never goes quiet costs time (at most max_wait_s), not memory.
        """
        deadline = time.monotonic() + max_wait_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            got = self.recv(min(quiet_s, remaining))
            if not got:
                return
            yield from got

    def close(self) -> None:
        """Release resources; idempotent."""

    def __enter__(self) -> UplinkReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
