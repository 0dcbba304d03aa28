"""gr-zmq-iq link: edges and BS in separate processes, IQ samples over zmq through the air (phy/air.py).

    edge: frames --> OfdmTransmitter (rate = its bandwidth share) --> [burst IQ] --zmq--> air
    air:  gain, carrier offset, resample + shift into the device's FDMA subband, sum, noise --zmq--> BS
    BS:   [medium IQ] --> MediumSource --+--> SubbandChannelizer(dev 0) --> OfdmReceiver --> PDUs
                                         +--> SubbandChannelizer(dev 1) --> OfdmReceiver --> PDUs  ...

This module is the BS side (ZmqIqReceiver); the edge side is phy.gr_zmq_iq_tx, the inbox the subband receivers
deliver to is phy.subband_inbox, and every message on these sockets is typed in proto.air.

Whether a frame survives and the SNR the BS records come from the OFDM receiver of the device's subband
(its per-packet estimate from the equalized soft symbols, plus the bench's ``snr_offset_db``). Airtime is the
burst's samples / the share's sample rate. The subband plan (phy.fdma) is the BS's: ``start_round`` announces
each round's widths to the air and retunes the channelizers; the edge only needs its width.

Timing. ``send()`` returns when the air reports the burst's last sample on the medium. The air tells the BS
first (``burst_done``, with the medium index where the burst ended), so ``drain_until_quiet`` -- which the BS
calls before it answers an ARQ ack request -- waits until the receivers have consumed the medium up to every
burst end the air reported, then for the last packets to come out.

Why pyzmq messages and not gr-zeromq's stream blocks on these hops: every message carries metadata the other
side needs (the edge's device, round, width and power; the medium index of a chunk), gr-zeromq's stream
blocks carry none (only GNU Radio tags in an internal header), hold the tail of a message until the next one
(docs/pitfalls.md §6), and a PUSH sink blocks the flowgraph while its peer is away. Here a sender never blocks
on a missing peer, a malformed message is logged and skipped, and idle time costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zmq
from gnuradio import gr
from pydantic import ValidationError

from config import ChannelConfig
from phy import fdma
from phy.air_chunks import burst_messages
from phy.ofdm_rx import OfdmReceiver
from phy.subband_inbox import FrameInbox, frame_collector
from phy.uplink import DownlinkBurst, RxFrame, TxReport, UplinkReceiver, checked_frames
from proto.air import (
    IQ_SAMPLE_BYTES,
    MAX_MEDIUM_SAMPLES,
    MEDIUM_QUEUE_CHUNKS,
    AirMessageError,
    AirRefusal,
    BurstOnMedium,
    DownlinkHeader,
    RoundPlan,
    SubbandSpec,
    chunk_count,
    decode_medium,
    decode_reply,
)
from trust.curve import make_client
from trust.keys import KeyPair

log = logging.getLogger(__name__)


IDLE_RETURN_S = 5.0  # MediumSource.work returns with nothing after this long without a message


class MediumSource(gr.sync_block):
    """The medium from the air (zmq PULL, [proto.air.MediumChunk, complex64]) as a sample stream.

    Tracks the medium index of what it has emitted, so the receiver knows when a burst the air reported has
    been consumed. Idle time on the air is skipped, so gaps in the index are normal; a malformed message is
    logged and dropped. Work waits for a message in 50 ms polls, so ``stop()`` (which ``ZmqIqReceiver.close``
    calls before stopping the flowgraph) ends it promptly; it returns empty-handed only after ``IDLE_RETURN_S``
    of silence, so a flowgraph stopped without it still stops. Returning empty-handed sooner costs latency: GNU
    Radio's scheduler then lets a source sleep up to ~250 ms (docs/pitfalls.md §11).
    """

    def __init__(self, socket: zmq.Socket) -> None:
        gr.sync_block.__init__(self, "zmq_iq_medium_source", None, [np.complex64])
        self.socket = socket
        self.index = 0  # medium index just after the last sample emitted
        self.malformed = 0
        self.calls = 0  # work() calls that emitted samples
        self.first_at: float | None = None  # time.monotonic() when the first sample went out
        self._pending: np.ndarray | None = None
        self._pending_index = 0
        self._running = True

    def stop(self) -> bool:
        self._running = False
        return True

    def work(self, input_items: Sequence[np.ndarray], output_items: Sequence[np.ndarray]) -> int:
        out = output_items[0]
        silent_since = None
        while self._pending is None and self._running:
            if not self.socket.poll(50, zmq.POLLIN):
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since >= IDLE_RETURN_S:
                    return 0
                continue
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            self._pending_index, self._pending = self._parse(parts)
        if self._pending is None:
            return 0
        n = min(len(out), len(self._pending))
        out[:n] = self._pending[:n]
        self.calls += 1
        if self.first_at is None:
            self.first_at = time.monotonic()
        self._pending = self._pending[n:] if n < len(self._pending) else None
        self._pending_index += n
        self.index = self._pending_index
        return n

    def _parse(self, parts: list[bytes]) -> tuple[int, np.ndarray | None]:
        try:
            header, raw = decode_medium(parts)
            iq = np.frombuffer(raw, dtype=np.complex64)
            if not np.isfinite(iq.view(np.float32)).all():
                raise AirMessageError("medium", "IQ holds NaN or Inf")
            return header.index, iq
        except AirMessageError as exc:
            self.malformed += 1
            log.warning("zmq-iq receiver: medium message skipped: %s", exc)
            return 0, None


class ZmqIqReceiver(UplinkReceiver):
    """BS side: the medium from the air, one channelizer + OFDM receiver per device subband."""

    def __init__(
        self,
        *,
        air_address: str,
        medium_address: str,
        total_bandwidth_hz: float,
        device_count: int,
        distances_m: Sequence[float],
        channel: ChannelConfig | None = None,
        seed: int = 0,
        snr_offset_db: float = 0.0,
        max_cfo_hz: float = 0.0,
        clock_speed: float = 1.0,
        hangover_s: float = 0.02,
        attenuation_db: float = fdma.DEFAULT_ATTENUATION_DB,
        context: zmq.Context | None = None,
        key: KeyPair | None = None,
    ) -> None:
        """distances_m, channel, seed, max_cfo_hz, clock_speed, hangover_s: what the air applies (announced
        with every plan: the air has no configuration of its own beyond its addresses). key: the BS's key pair
        on a sealed bench (the air serves CURVE under it: docs/security.md)."""
        if device_count < 1:
            raise ValueError(f"device_count must be >= 1, got {device_count}")
        self.total_bandwidth_hz = float(total_bandwidth_hz)
        self.device_count = device_count
        self.physics: dict[str, Any] = {  # the fields of every RoundPlan besides round and subbands
            "total_bandwidth_hz": self.total_bandwidth_hz,
            "seed": seed,
            "channel": _channel_fields(channel or ChannelConfig()),
            "distances_m": [float(d) for d in distances_m],
            "max_cfo_hz": float(max_cfo_hz),
            "clock_speed": float(clock_speed),
            "hangover_s": float(hangover_s),
            "attenuation_db": float(attenuation_db),
        }
        self.address = air_address  # what the BS advertises as its data address: the edges send to the air
        ctx = context or zmq.Context.instance()
        self._air = ctx.socket(zmq.DEALER)
        self._air.setsockopt(zmq.LINGER, 0)
        if key is not None:
            make_client(self._air, key, key.public)
        self._air.connect(air_address)
        self._medium = ctx.socket(zmq.PULL)
        self._medium.setsockopt(zmq.LINGER, 0)
        self._medium.setsockopt(zmq.RCVHWM, MEDIUM_QUEUE_CHUNKS)
        self._medium.setsockopt(zmq.MAXMSGSIZE, MAX_MEDIUM_SAMPLES * IQ_SAMPLE_BYTES)
        if key is not None:
            make_client(self._medium, key, key.public)
        self._medium.connect(medium_address)
        self.inbox = FrameInbox()
        self.burst_ends: dict[int, int] = {}  # device -> medium index where its last reported burst ended
        self._downlink_bursts = 0

        self.plan = fdma.equal_subbands(self.total_bandwidth_hz, device_count)
        self.tb = gr.top_block("zmq_iq_bs")
        self.source = MediumSource(self._medium)
        self.source.set_min_output_buffer(0, fdma.CHANNELIZER_BUFFER_ITEMS)  # whole chunks (docs/pitfalls.md §12)
        self.channelizers: list[Any] = []
        self.receivers: list[OfdmReceiver] = []
        self.collectors: list[Any] = []
        for k in range(device_count):
            channelizer = fdma.SubbandChannelizer(self.plan[k], self.total_bandwidth_hz, attenuation_db=attenuation_db)
            receiver = OfdmReceiver(snr_offset_db)
            collector = frame_collector(k, self.inbox)
            self.tb.connect(self.source, channelizer, receiver)
            self.tb.msg_connect(receiver, "out", collector, "in")
            self.channelizers.append(channelizer)
            self.receivers.append(receiver)
            self.collectors.append(collector)
        self._closed = False
        self.tb.start()

    # ----------------------------------------------------------------------------------------- plan
    def start_round(self, round_idx: int, widths_hz: Mapping[int, float]) -> dict[int, float]:
        """The round's subbands (device -> planned bandwidth_hz of the participants): retune, tell the air."""
        widths = {int(k): float(v) for k, v in widths_hz.items() if 0 <= int(k) < self.device_count}
        try:
            plan = fdma.plan_subbands(self.total_bandwidth_hz, widths)
        except ValueError as exc:  # a controller's plan that does not fit the band must not stop the BS
            log.error(
                "zmq-iq receiver: round %d: no subband plan (%s); the air keeps the last one and refuses "
                "bursts that do not fit it",
                round_idx,
                exc,
            )
            return {}
        for k, subband in plan.items():
            if subband != self.channelizers[k].subband:
                self.channelizers[k].retune(subband)
        self.inbox.active = set(plan)
        self.plan = plan
        subbands = [
            SubbandSpec(device_id=k, center_hz=s.center_hz, bandwidth_hz=s.bandwidth_hz) for k, s in plan.items()
        ]
        msg = RoundPlan(round=round_idx, subbands=subbands, **self.physics)
        try:
            self._air.send_multipart([msg.encode()], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("zmq-iq receiver: the air at %s did not take the round %d plan", self.address, round_idx)
        self._read_air()
        return {}  # the edges need no carrier: the air places each burst in its subband

    # ----------------------------------------------------------------------------------------- downlink
    def send_downlink(self, burst: DownlinkBurst) -> TxReport:
        """One downlink burst through the air (phy.air_downlink), modulated here at the whole band's rate."""
        from phy.ofdm_tx import modulate

        frames = checked_frames(burst.frames)
        iq = modulate(frames, burst.setting.modulation)
        self._downlink_bursts += 1
        try:
            header = DownlinkHeader(
                round=burst.round_idx,
                burst_id=self._downlink_bursts,
                devices=sorted(set(burst.device_ids)),
                tx_power_dbm=burst.setting.tx_power_dbm,
                modulation=burst.setting.modulation,  # type: ignore[arg-type]  # a TxSetting's modulation is checked
                kind=burst.kind,  # type: ignore[arg-type]  # "view" or "ack": pydantic checks it
                packets=len(frames),
                final=burst.final,
                samples=len(iq),
                chunks=chunk_count(len(iq)),
            )
            for message in burst_messages(header, iq):  # chunks: the air takes no larger message
                self._air.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("zmq-iq: the air at %s did not take downlink burst %d", self.address, self._downlink_bursts)
        except ValidationError as exc:  # as the air would refuse it: the edges find its frames missing
            log.error("zmq-iq: downlink burst %d of %d samples not sent: %s", self._downlink_bursts, len(iq), exc)
        self._read_air()
        return TxReport(len(frames), sum(len(f) for f in frames), airtime_s=len(iq) / self.total_bandwidth_hz)

    # ----------------------------------------------------------------------------------------- frames
    @property
    def poll_socket(self) -> int:
        return self.inbox.fd

    def recv(self, timeout_s: float) -> list[RxFrame]:
        if self._closed:
            return []
        self._read_air()
        return self.inbox.take(timeout_s)

    def drain_until_quiet(self, quiet_s: float, max_wait_s: float) -> Iterator[RxFrame]:
        """Frames up to every burst end the air has reported, then until none came for quiet_s (a generator, one
        batch at a time, as UplinkReceiver's)."""
        deadline = time.monotonic() + max_wait_s
        self._read_air()
        target = max(self.burst_ends.values(), default=0)
        while time.monotonic() < deadline and not self._consumed(target):
            time.sleep(0.01)
            self._read_air()
        while True:
            remaining = deadline - time.monotonic()
            got = self.recv(min(quiet_s, max(0.0, remaining)))
            yield from got
            if not got or remaining <= 0:
                return

    def _consumed(self, medium_index: int) -> bool:
        """Has every receiver taken in the medium up to medium_index (plus the receiver's flush margin)?"""
        if self.source.index < medium_index:
            return False
        written = self.source.nitems_written(0)
        for channelizer, receiver in zip(self.channelizers, self.receivers):
            if channelizer.rotator.nitems_read(0) < written:
                return False
            if receiver.samples_in() < channelizer.samples_out() - 64:
                return False
        return True

    def _read_air(self) -> None:
        while True:
            try:
                parts = self._air.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode_reply(parts)
            except AirMessageError as exc:
                log.warning("zmq-iq receiver: malformed message from the air skipped: %s", exc)
                continue
            if isinstance(reply, BurstOnMedium):
                self.burst_ends[reply.device_id] = max(reply.medium_end, self.burst_ends.get(reply.device_id, 0))
            elif isinstance(reply, AirRefusal):
                log.warning("zmq-iq receiver: the air refused a message: %s", reply.error)

    def stats(self) -> dict[str, Any]:
        return {
            "packets": dict(self.inbox.packets),
            "crc_failures": self.inbox.crc_failures,
            "medium_index": self.source.index,
            "malformed_medium": self.source.malformed,
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.source.stop()
            self.tb.stop()
            self.tb.wait()
            self._air.close(linger=0)
            self._medium.close(linger=0)
            self.inbox.close()


def _channel_fields(channel: ChannelConfig) -> dict[str, float | str]:
    """The channel's physics as RoundPlan carries them (numbers as floats: the plan's JSON is strict). The air
    applies SNR, not loss: a true PER curve for the sim link stays out of the plan."""
    physics = channel.model_dump(exclude={"true_per_curve", "true_per_curve_table"})
    return {k: v if isinstance(v, str) else float(v) for k, v in physics.items()}
