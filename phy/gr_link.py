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

import zmq

from phy.channel import TxSetting
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter
from phy.uplink import RxFrame
from proto.air import FrameSidecar, decode_sidecar
from proto.numerology import MAX_PACKET_BYTES, check_modulation
from trust.keys import KeyPair

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
    ):
        from phy.gr_loopback import LoopbackModem  # GNU Radio only where the modem runs: the BS

        super().__init__(bind_address=bind_address, context=context, key=key)
        self.modem = LoopbackModem(snr_offset_db=snr_offset_db, noise_seed=noise_seed)
        self.packets_in = 0
        self.packets_decoded = 0

    def _parse(self, parts: list[bytes]) -> RxFrame | None:
        frame = super()._parse(parts)
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
            self.packets_in += len(frames)
            self.packets_decoded += len(decoded)
            out += [RxFrame(p.data, p.snr_db, time.time()) for p in decoded]
        return out

    def close(self) -> None:
        super().close()
        self.modem.close()
