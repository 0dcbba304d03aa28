"""gr-zmq-iq link: edges and BS in separate processes, IQ samples over zmq through the air (phy/air.py).

    edge: frames --> OfdmTransmitter (rate = its bandwidth share) --> [burst IQ] --zmq--> air
    air:  gain, carrier offset, resample + shift into the device's FDMA subband, sum, noise --zmq--> BS
    BS:   [medium IQ] --> MediumSource --+--> SubbandChannelizer(dev 0) --> OfdmReceiver --> PDUs
                                         +--> SubbandChannelizer(dev 1) --> OfdmReceiver --> PDUs  ...

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
(pitfall 6), and a PUSH sink blocks the flowgraph while its peer is away. Here a sender never blocks on a
missing peer, a malformed message is logged and skipped, and idle time costs nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import zmq

from phy import fdma, ofdm
from phy.air import WIRE_VERSION
from phy.channel import ChannelConfig, DeviceGeometry, TxSetting
from phy.uplink import RxFrame, TxReport, UplinkReceiver, UplinkTransmitter, checked_frames

log = logging.getLogger(__name__)


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
    ) -> None:
        self.geometry = geometry
        self.air_address = air_address
        self.clock_speed = clock_speed
        self.reply_slack_s = reply_slack_s
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, 5000)  # a missing air must not block the edge forever
        self._sock.connect(air_address)
        self._burst_ids = itertools.count(1)
        self._closed = False
        self.last_error: str | None = None

    def estimate_airtime_s(self, frame_sizes: Sequence[int], setting: TxSetting) -> float:
        return ofdm.burst_airtime_s(frame_sizes, setting.modulation, setting.bandwidth_hz)

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
        report = TxReport(
            frames_sent=len(frames), bytes_sent=sum(len(f) for f in frames), airtime_s=len(burst) / setting.bandwidth_hz
        )
        burst_id = next(self._burst_ids)
        meta = {
            "v": WIRE_VERSION,
            "device_id": self.geometry.device_id,
            "round": round_idx,
            "burst_id": burst_id,
            "tx_power_dbm": setting.tx_power_dbm,
            "bandwidth_hz": setting.bandwidth_hz,
            "modulation": setting.modulation,
        }
        try:
            self._sock.send_multipart([b"burst", json.dumps(meta).encode(), burst], copy=False)
        except zmq.Again:
            self.last_error = f"the air at {self.air_address} did not take the burst"
            log.warning(
                "zmq-iq device %d round %d: %s; %d frame(s) lost",
                self.geometry.device_id,
                round_idx,
                self.last_error,
                len(frames),
            )
            return report
        self._wait_done(burst_id, report.airtime_s / self.clock_speed + self.reply_slack_s, round_idx)
        log.info(
            "zmq-iq device %d round %d burst %d: %d frames, %.2f s of airtime, modulated in %.2f s, on the air "
            "%.2f s later",
            self.geometry.device_id,
            round_idx,
            burst_id,
            len(frames),
            report.airtime_s,
            t_modulated - t0,
            time.monotonic() - t_modulated,
        )
        return report

    def _wait_done(self, burst_id: int, timeout_s: float, round_idx: int) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._sock.poll(remaining_ms, zmq.POLLIN):
                self.last_error = f"no answer from the air at {self.air_address} within {timeout_s:.0f} s"
                break
            parts = self._sock.recv_multipart()
            try:
                kind, body = parts[0], json.loads(parts[1]) if len(parts) == 2 else None
            except ValueError:
                kind, body = b"", None
            if not isinstance(body, dict):
                log.warning(
                    "zmq-iq device %d: malformed answer from the air skipped: %r",
                    self.geometry.device_id,
                    [p[:64] for p in parts],
                )
                continue
            if kind == b"done" and body.get("burst_id") == burst_id:
                return
            if kind == b"error":
                self.last_error = f"the air refused the burst: {body.get('error')}"
                break
            # an answer to an earlier burst that timed out: skip it
        log.warning(
            "zmq-iq device %d round %d: %s (its frames count as lost)",
            self.geometry.device_id,
            round_idx,
            self.last_error,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)


class FrameInbox:
    """Decoded frames handed over from GNU Radio threads; a pipe makes the BS's zmq.Poller wake for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: list[RxFrame] = []
        self.fd, self._wake_w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake_w, False)
        self.packets: dict[int, int] = {}
        self.crc_failures = 0
        # receivers whose subband is in the current plan; the others keep an old subband that may now be part of
        # another device's, so what they decode is dropped (None: all)
        self.active: set[int] | None = None

    def deliver(self, device_id: int, data: bytes, meta: dict) -> None:
        """From a receiver thread: one decoded packet (CRC failures are counted, not delivered)."""
        if self.active is not None and device_id not in self.active:
            return
        self.packets[device_id] = self.packets.get(device_id, 0) + 1
        if not meta.get("crc_ok", False):
            self.crc_failures += 1
            return
        snr = meta.get("snr_db")
        frame = RxFrame(data, float(snr) if isinstance(snr, (int, float)) and math.isfinite(snr) else None, time.time())
        with self._lock:
            self._frames.append(frame)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # pipe full: the poller is awake anyway
            pass

    def take(self, timeout_s: float) -> list[RxFrame]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                while os.read(self.fd, 4096):
                    pass
            except BlockingIOError:
                pass
            with self._lock:
                out, self._frames = self._frames, []
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(0.01, remaining))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._wake_w)


def _make_blocks():
    """The BS's GNU Radio blocks, built on first use (edges never import GNU Radio's receiver side)."""
    import pmt
    from gnuradio import gr

    from phy.ofdm_rx import pdu_to_result

    class MediumSource(gr.sync_block):
        """The medium from the air (zmq PULL, ``[header {"index"}, complex64]``) as a sample stream.

        Tracks the medium index of what it has emitted, so the receiver knows when a burst the air reported has
        been consumed. Idle time on the air is skipped, so gaps in the index are normal; a malformed message is
        logged and dropped. Work waits at most 50 ms for a message, then returns, so the flowgraph can stop.
        """

        def __init__(self, socket: zmq.Socket) -> None:
            gr.sync_block.__init__(self, "zmq_iq_medium_source", None, [np.complex64])
            self.socket = socket
            self.index = 0  # medium index just after the last sample emitted
            self.malformed = 0
            self._pending: np.ndarray | None = None
            self._pending_index = 0
            self._running = True

        def stop(self) -> bool:
            self._running = False
            return True

        def work(self, input_items, output_items):  # noqa: ANN001 (gr signature)
            out = output_items[0]
            while self._pending is None and self._running:
                if not self.socket.poll(50, zmq.POLLIN):
                    return 0
                try:
                    parts = self.socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                self._pending_index, self._pending = self._parse(parts)
            if self._pending is None:
                return 0
            n = min(len(out), len(self._pending))
            out[:n] = self._pending[:n]
            self._pending = self._pending[n:] if n < len(self._pending) else None
            self._pending_index += n
            self.index = self._pending_index
            return n

        def _parse(self, parts: list[bytes]) -> tuple[int, np.ndarray | None]:
            try:
                if len(parts) != 2:
                    raise ValueError(f"{len(parts)} parts, expected [header, IQ]")
                header = json.loads(parts[0])
                index = header.get("index") if isinstance(header, dict) else None
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(f"header {header!r} has no medium index")
                if not parts[1] or len(parts[1]) % 8:
                    raise ValueError(f"{len(parts[1])} bytes is not a whole number of complex64 samples")
                iq = np.frombuffer(parts[1], dtype=np.complex64)
                if not np.isfinite(iq.view(np.float32)).all():
                    raise ValueError("IQ holds NaN or Inf")
                return index, iq
            except ValueError as exc:
                self.malformed += 1
                log.warning("zmq-iq receiver: medium message skipped: %s", exc)
                return 0, None

    class FrameCollector(gr.basic_block):
        """Message sink for one receiver's PDUs (one per port, pitfall 8); wakes the BS's poller through a pipe."""

        def __init__(self, device_id: int, sink: FrameInbox) -> None:
            gr.basic_block.__init__(self, f"zmq_iq_collector_{device_id}", None, None)
            self.device_id = device_id
            self.sink = sink
            self.message_port_register_in(pmt.intern("in"))
            self.set_msg_handler(pmt.intern("in"), self._handle)

        def _handle(self, msg: pmt.pmt_t) -> None:
            data, meta = pdu_to_result(msg)
            self.sink.deliver(self.device_id, data, meta)

    return MediumSource, FrameCollector


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
    ) -> None:
        """distances_m, channel, seed, max_cfo_hz, clock_speed, hangover_s: what the air applies (announced
        with every plan: the air has no configuration of its own beyond its addresses)."""
        from gnuradio import gr

        from phy.ofdm_rx import OfdmReceiver

        MediumSource, FrameCollector = _make_blocks()
        if device_count < 1:
            raise ValueError(f"device_count must be >= 1, got {device_count}")
        self.total_bandwidth_hz = float(total_bandwidth_hz)
        self.device_count = device_count
        self.physics = {
            "total_bandwidth_hz": self.total_bandwidth_hz,
            "seed": seed,
            "channel": dataclasses.asdict(channel or ChannelConfig()),
            "distances_m": [float(d) for d in distances_m],
            "max_cfo_hz": max_cfo_hz,
            "clock_speed": clock_speed,
            "hangover_s": hangover_s,
            "attenuation_db": attenuation_db,
        }
        self.address = air_address  # what the BS advertises as its data address: the edges send to the air
        ctx = context or zmq.Context.instance()
        self._air = ctx.socket(zmq.DEALER)
        self._air.setsockopt(zmq.LINGER, 0)
        self._air.connect(air_address)
        self._medium = ctx.socket(zmq.PULL)
        self._medium.setsockopt(zmq.LINGER, 0)
        self._medium.setsockopt(zmq.RCVHWM, 64)
        self._medium.setsockopt(zmq.MAXMSGSIZE, 1 << 26)
        self._medium.connect(medium_address)
        self.inbox = FrameInbox()
        self.burst_ends: dict[int, int] = {}  # device -> medium index where its last reported burst ended

        self.plan = fdma.equal_subbands(self.total_bandwidth_hz, device_count)
        self.tb = gr.top_block("zmq_iq_bs")
        self.source = MediumSource(self._medium)
        self.channelizers = []
        self.receivers = []
        self.collectors = []
        for k in range(device_count):
            channelizer = fdma.SubbandChannelizer(self.plan[k], self.total_bandwidth_hz, attenuation_db=attenuation_db)
            receiver = OfdmReceiver(snr_offset_db)
            collector = FrameCollector(k, self.inbox)
            self.tb.connect(self.source, channelizer, receiver)
            self.tb.msg_connect(receiver, "out", collector, "in")
            self.channelizers.append(channelizer)
            self.receivers.append(receiver)
            self.collectors.append(collector)
        self._closed = False
        self.tb.start()

    # ----------------------------------------------------------------------------------------- plan
    def start_round(self, round_idx: int, widths_hz: Mapping[int, float]) -> None:
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
            return
        for k, subband in plan.items():
            if subband != self.channelizers[k].subband:
                self.channelizers[k].retune(subband)
        self.inbox.active = set(plan)
        self.plan = plan
        msg = {"round": round_idx, **self.physics, "subbands": [s.to_dict() for s in plan.values()]}
        try:
            self._air.send_multipart([b"plan", json.dumps(msg).encode()], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("zmq-iq receiver: the air at %s did not take the round %d plan", self.address, round_idx)
        self._read_air()

    # ----------------------------------------------------------------------------------------- frames
    @property
    def poll_socket(self) -> int:  # type: ignore[override]  # zmq.Poller takes a file descriptor as well
        return self.inbox.fd

    def recv(self, timeout_s: float) -> list[RxFrame]:
        if self._closed:
            return []
        self._read_air()
        return self.inbox.take(timeout_s)

    def drain_until_quiet(self, quiet_s: float, max_wait_s: float) -> list[RxFrame]:
        """Frames up to every burst end the air has reported, then until none came for quiet_s."""
        deadline = time.monotonic() + max_wait_s
        self._read_air()
        target = max(self.burst_ends.values(), default=0)
        while time.monotonic() < deadline and not self._consumed(target):
            time.sleep(0.01)
            self._read_air()
        out: list[RxFrame] = []
        while True:
            remaining = deadline - time.monotonic()
            got = self.recv(min(quiet_s, max(0.0, remaining)))
            out += got
            if not got or remaining <= 0:
                return out

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
                body = json.loads(parts[1]) if len(parts) == 2 else None
            except ValueError:
                body = None
            if not isinstance(body, dict):
                log.warning("zmq-iq receiver: malformed message from the air skipped: %r", [p[:64] for p in parts])
            elif parts[0] == b"burst_done":
                end, device_id = body.get("medium_end"), body.get("device_id")
                if isinstance(end, int) and isinstance(device_id, int):
                    self.burst_ends[device_id] = max(end, self.burst_ends.get(device_id, 0))
            elif parts[0] == b"error":
                log.warning("zmq-iq receiver: the air refused a message: %s", body.get("error"))

    def stats(self) -> dict:
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
