"""gr-zmq-iq, edge side: modulate a burst at the share's sample rate, hand it to the air, wait until it is on the air.

The burst goes to the air as [proto.air.BurstHeader], then its complex64 IQ in chunk messages of at most
proto.air.CHUNK_SAMPLES (phy.air_chunks.burst_messages: the air takes no larger message); send() returns when the air
answers ``done`` (the burst's last sample is on the medium), or with ``last_error`` set when the air refused it or
did not answer.
The rest of the link is in phy.gr_zmq_iq.

That wait lasts the burst's airtime, and longer when the air lags (other edges' bursts, a BS whose receivers fall
behind: phy.air_medium's clock stalls), while the BS drops an edge it has not heard from for its silence timeout
(bs_node.transport, 30 s by default). ``set_keepalive`` gives send() the edge's heartbeat, which it calls every
``every_s`` while it waits, from its own thread (the control socket is not thread-safe, so no helper thread).

Downlink (bench downlink.over_phy): the same socket tells the air where this device listens (``listen``, once, on
connecting) and receives the BS's downlink bursts through this device's channel (``dl``); ``take_downlink`` hands
them out (those that came while send() waited are kept for it, at most MAX_KEPT_DOWNLINK).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq
from pydantic import ValidationError

from phy.air_chunks import burst_messages
from phy.channel import DeviceGeometry, TxSetting
from phy.uplink import TxReport, UplinkTransmitter, checked_frames
from proto import numerology
from proto.air import (
    DOWNLINK_NOISE_SAMPLES,
    IQ_SAMPLE_BYTES,
    MAX_BURST_CHUNKS,
    MAX_DOWNLINK_SAMPLES,
    MAX_HEADER_BYTES,
    AirMessageError,
    AirRefusal,
    BurstDone,
    BurstHeader,
    DownlinkFrames,
    Listen,
    chunk_count,
    decode_reply,
)
from trust.curve import make_client
from trust.keys import KeyPair

log = logging.getLogger("phy.gr_zmq_iq")
MAX_KEPT_DOWNLINK = 64  # downlink bursts kept while nobody takes them; beyond that the oldest are dropped


class ZmqIqTransmitter(UplinkTransmitter):
    """Edge side: modulate a burst at the share's sample rate, hand it to the air, wait until it is on the air."""

    def __init__(
        self,
        *,
        air_address: str,
        geometry: DeviceGeometry,
        context: zmq.Context | None = None,
        clock_speed: float = 1.0,
        reply_slack_s: float = 30.0,
        key: KeyPair | None = None,
    ) -> None:
        """key: this device's key pair on a sealed bench (the air admits only roster keys: docs/security.md)."""
        self.geometry = geometry
        self.air_address = air_address
        self.clock_speed = clock_speed
        self.reply_slack_s = reply_slack_s
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, 5000)  # a missing air must not block the edge forever
        self._sock.setsockopt(zmq.SNDHWM, MAX_BURST_CHUNKS + 16)  # a whole burst queues here while the air reads
        # what may come back: small replies, and downlink bursts of bounded size (a larger message is dropped)
        self._sock.setsockopt(
            zmq.MAXMSGSIZE, (MAX_DOWNLINK_SAMPLES + DOWNLINK_NOISE_SAMPLES) * IQ_SAMPLE_BYTES + MAX_HEADER_BYTES
        )
        if key is not None:
            assert key.bs_public is not None  # a device key file carries it (trust.keys.load_key)
            make_client(self._sock, key, key.bs_public)
        self._sock.connect(air_address)
        self._downlink: deque[DownlinkFrames] = deque(maxlen=MAX_KEPT_DOWNLINK)
        try:
            self._sock.send_multipart([Listen(device_id=geometry.device_id).encode()], zmq.NOBLOCK)
        except zmq.Again:  # not connected yet: zmq queues for a connecting peer, so this is a full queue
            log.warning("zmq-iq device %d: could not tell the air where it listens", geometry.device_id)
        self._burst_ids = itertools.count(1)
        self._closed = False
        self.last_error: str | None = None
        self._keepalive: Callable[[], None] | None = None
        self._keepalive_s = 2.0

    def set_keepalive(self, keepalive: Callable[[], None] | None, every_s: float) -> None:
        """Call keepalive (the edge's heartbeat to the BS) every every_s while send() waits for the air; None: not."""
        if not every_s > 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self._keepalive, self._keepalive_s = keepalive, every_s

    def _keep_alive(self) -> None:
        if self._keepalive is None:
            return
        try:
            self._keepalive()
        except Exception:  # a heartbeat that cannot go out must not lose the burst
            log.warning("zmq-iq device %d: keep-alive failed", self.geometry.device_id, exc_info=True)

    def send(self, frames: Sequence[bytes], setting: TxSetting, *, round_idx: int) -> TxReport:
        from phy.ofdm_tx import modulate  # GNU Radio where the modem runs

        if self._closed:
            raise RuntimeError("ZmqIqTransmitter is closed")
        frames = checked_frames(frames)
        self.last_error = None
        if not frames:
            return TxReport(frames_sent=0, bytes_sent=0, airtime_s=0.0)
        t0 = time.monotonic()
        burst = modulate(frames, setting.modulation)
        t_modulated = time.monotonic()
        self._keep_alive()  # modulating a long burst takes a while too
        report = TxReport(
            frames_sent=len(frames), bytes_sent=sum(len(f) for f in frames), airtime_s=len(burst) / setting.bandwidth_hz
        )
        try:
            header = BurstHeader(
                device_id=self.geometry.device_id,
                round=round_idx,
                burst_id=next(self._burst_ids),
                tx_power_dbm=setting.tx_power_dbm,
                bandwidth_hz=setting.bandwidth_hz,
                modulation=numerology.check_modulation(setting.modulation),
                samples=len(burst),
                chunks=chunk_count(len(burst)),
            )
            for message in burst_messages(header, burst):
                self._sock.send_multipart(message, copy=False)
        except (zmq.Again, ValidationError) as exc:
            reason = "did not take" if isinstance(exc, zmq.Again) else f"cannot take ({exc.errors()[0]['msg']}):"
            self.last_error = f"the air at {self.air_address} {reason} the burst of {len(burst)} samples"
            log.warning(
                "zmq-iq device %d round %d: %s; %d frame(s) lost",
                self.geometry.device_id,
                round_idx,
                self.last_error,
                len(frames),
            )
            return report
        self._wait_done(header.burst_id, report.airtime_s / self.clock_speed + self.reply_slack_s, round_idx)
        log.info(
            "zmq-iq device %d round %d burst %d: %d frames, %.2f s of airtime, modulated in %.2f s, on the air "
            "%.2f s later",
            self.geometry.device_id,
            round_idx,
            header.burst_id,
            len(frames),
            report.airtime_s,
            t_modulated - t0,
            time.monotonic() - t_modulated,
        )
        return report

    def _wait_done(self, burst_id: int, timeout_s: float, round_idx: int) -> None:
        deadline = time.monotonic() + timeout_s
        next_keepalive = time.monotonic() + self._keepalive_s
        while True:
            now = time.monotonic()
            if self._keepalive is not None and now >= next_keepalive:
                self._keep_alive()
                next_keepalive = now + self._keepalive_s
            remaining_ms = int((deadline - now) * 1000)
            wait_ms = remaining_ms if self._keepalive is None else min(remaining_ms, int((next_keepalive - now) * 1000))
            if remaining_ms <= 0:
                self.last_error = f"no answer from the air at {self.air_address} within {timeout_s:.0f} s"
                break
            if not self._sock.poll(max(1, wait_ms), zmq.POLLIN):
                continue
            parts = self._sock.recv_multipart()
            try:
                reply = decode_reply(parts)
            except AirMessageError as exc:
                log.warning("zmq-iq device %d: malformed answer from the air skipped: %s", self.geometry.device_id, exc)
                continue
            if isinstance(reply, DownlinkFrames):
                self._downlink.append(reply)
                continue
            if isinstance(reply, BurstDone) and reply.burst_id == burst_id:
                return
            if isinstance(reply, AirRefusal) and reply.kind == "listen":
                log.warning("zmq-iq device %d: the air refused its listen: %s", self.geometry.device_id, reply.error)
                continue
            if isinstance(reply, AirRefusal):
                self.last_error = f"the air refused the burst: {reply.error}"
                break
            # an answer to an earlier burst that timed out: skip it
        log.warning(
            "zmq-iq device %d round %d: %s (its frames count as lost)",
            self.geometry.device_id,
            round_idx,
            self.last_error,
        )

    def take_downlink(self, timeout_s: float) -> list[DownlinkFrames]:
        """The downlink bursts the air delivered (waits up to timeout_s for one); other replies are skipped."""
        deadline = time.monotonic() + timeout_s
        while not self._downlink:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._sock.poll(remaining_ms, zmq.POLLIN):
                break
            while self._sock.poll(0, zmq.POLLIN):
                try:
                    reply = decode_reply(self._sock.recv_multipart())
                except AirMessageError as exc:
                    log.warning(
                        "zmq-iq device %d: malformed message from the air skipped: %s", self.geometry.device_id, exc
                    )
                    continue
                if isinstance(reply, DownlinkFrames):
                    self._downlink.append(reply)
                elif isinstance(reply, AirRefusal):
                    log.warning("zmq-iq device %d: the air refused a message: %s", self.geometry.device_id, reply.error)
        out = list(self._downlink)
        self._downlink.clear()
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)
