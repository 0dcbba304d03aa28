"""gr-loopback link: every uplink frame crosses the real GNU Radio OFDM modem, inside the BS process.

The edge works out its channel as the sim does (path loss, block fading, noise over its bandwidth share:
phy.channel.SimChannel) and sends each frame unharmed, with that SNR and the payload modulation beside it.
The BS pushes the frames through one running LoopbackModem (OfdmTransmitter -> channel_model AWGN at that
SNR -> OfdmReceiver): whether a frame survives is decided by the OFDM receiver's sync, header and CRC, and the
SNR the BS gets is the receiver's own per-packet estimate from the equalized soft symbols (corrected by the
calibrated offset), not the sim's model. Airtime is the modem's samples per packet at the share's sample rate.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from phy.channel import TxSetting
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter
from phy.uplink import RxFrame
from proto.air import FrameSidecar, decode_sidecar
from proto.framing import Frame, FrameError
from proto.numerology import MAX_PACKET_BYTES, check_modulation
from trust.keys import KeyPair

if TYPE_CHECKING:  # pragma: no cover
    from phy.gr_loopback import RxPacket
    from phy.iq_record import SigmfRecording

log = logging.getLogger(__name__)


class GrLoopbackTransmitter(SimUplinkTransmitter):
    """Edge side: no loss draw here (the modem decides at the BS); the sidecar carries the channel."""

    def _sidecar(self, true_snr_db: float, setting: TxSetting, *, lost: bool, est_err_db: float) -> FrameSidecar:
        return FrameSidecar(snr_db=float(true_snr_db), modulation=check_modulation(setting.modulation))


@dataclass
class _AirFrame(RxFrame):
    """A frame as it reaches the air: with the channel SNR to apply and its modulation."""

    modulation: str = "qpsk"


class GrLoopbackReceiver(SimUplinkReceiver):
    """BS side: frames arrive with their channel; the OFDM modem turns them into what a receiver decodes."""

    def __init__(
        self,
        *,
        bind_address: str,
        snr_offset_db: float = 0.0,
        context: zmq.Context | None = None,
        noise_seed: int = 0,
        key: KeyPair | None = None,
        iq_recording: SigmfRecording | None = None,
    ):
        """iq_recording: write the IQ the modem's receiver takes in, one SigMF annotation per frame."""
        from phy.gr_loopback import LoopbackModem  # GNU Radio only where the modem runs: the BS

        super().__init__(bind_address=bind_address, context=context, key=key)
        self.iq = iq_recording
        iq_path = None if iq_recording is None else iq_recording.data_path
        self.modem = LoopbackModem(snr_offset_db=snr_offset_db, noise_seed=noise_seed, iq_data_path=iq_path)
        self.packets_in = 0
        self.packets_decoded = 0

    def _parse(self, parts: list[bytes], count: int) -> RxFrame | None:
        frame = super()._parse(parts, count)
        if frame is None:
            return None
        modulation = decode_sidecar(parts[0]).modulation  # valid: super()._parse decoded it
        if len(frame.data) > MAX_PACKET_BYTES:  # the modem could not carry it: not a frame any edge sends
            self.malformed_count += 1
            log.warning(
                "gr-loopback receiver %s: %d-byte frame skipped (limit %d)",
                self.address,
                len(frame.data),
                MAX_PACKET_BYTES,
            )
            return None
        if modulation is None or frame.snr_db is None:
            self.malformed_count += 1
            log.warning(
                "gr-loopback receiver %s: frame without a channel SNR or with modulation %r skipped",
                self.address,
                modulation,
            )
            return None
        return _AirFrame(frame.data, frame.snr_db, frame.rx_time, modulation)

    def recv(self, timeout_s: float) -> list[RxFrame]:
        air = [f for f in super().recv(timeout_s) if isinstance(f, _AirFrame)]  # what _parse made of them
        out: list[RxFrame] = []
        # consecutive frames of one burst share the channel and modulation: one modem run each
        for (snr_db, modulation), group in itertools.groupby(air, key=lambda f: (f.snr_db, f.modulation)):
            frames = [f.data for f in group]
            try:
                packets = self.modem.run_packets(frames, modulation, snr_db)
            except ValueError as exc:  # a peer's frames the modem refuses: theirs to lose, not the BS's
                self.malformed_count += len(frames)
                log.warning("gr-loopback receiver %s: %d frame(s) skipped: %s", self.address, len(frames), exc)
                continue
            decoded = [p for p in packets if p.crc_ok]
            if self.iq is not None:
                self._annotate(frames, modulation, snr_db, packets)
            self.packets_in += len(frames)
            self.packets_decoded += len(decoded)
            out += [RxFrame(p.data, p.snr_db, time.time()) for p in decoded]
        return out

    def _annotate(self, frames: list[bytes], modulation: str, snr_db: float, packets: list[RxPacket]) -> None:
        """One SigMF annotation per frame the modem carried: which frame, its channel, what the receiver made
        of it."""
        assert self.iq is not None
        by_index = {p.index: p for p in packets}
        for i, ((start, length), data) in enumerate(zip(self.modem.last_spans, frames)):
            try:
                f = Frame.from_bytes(data)
                label = f"device {f.device_id} round {f.round_idx} attempt {f.attempt} seq {f.seq}"
            except FrameError:
                label = "not a frame"
            p = by_index.get(i)
            fate = "lost" if p is None else ("crc failed" if not p.crc_ok else f"ok, measured {p.snr_db:.2f} dB")
            self.iq.annotate(start, length, label, f"{modulation}, channel {snr_db:.2f} dB, {len(data)} B: {fate}")

    def flush_recording(self) -> None:
        """Write the SigMF metadata of what was recorded so far (the BS calls it as a round closes)."""
        if self.iq is not None:
            try:
                self.iq.flush()
            except (OSError, ValueError) as exc:  # a full disk or a schema complaint must not stop the BS
                log.error("gr-loopback receiver: IQ recording metadata not written: %s", exc)

    def close(self) -> None:
        super().close()
        self.modem.close()
        self.flush_recording()
