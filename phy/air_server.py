"""The air's sockets: requests from the edges and the BS (proto.air), replies, and the medium to the BS.

* ``address`` (ROUTER, bound): an edge sends ``burst`` [header] and its complex64 IQ in ``chunk`` messages
  (phy.air_chunks) and gets ``done`` once the burst's last sample is on the medium (that is when its send()
  returns); the BS sends ``plan`` (the round's subbands, phy.fdma, and the physics) and gets ``plan_ok``, and is
  told ``burst_done`` (device, medium index of the burst's end) before the edge's ``done``, so it can finish
  decoding a burst before it acknowledges it. Downlink (phy.air_downlink): an edge says where it listens
  (``listen``); the BS sends ``dl_burst`` [header] and chunks for some devices, and each listening one gets ``dl``
  [header, IQ] through its own channel once the burst's airtime has passed.
* ``medium_address`` (PUSH, bound): the summed medium as [``MediumChunk`` {index}, complex64 IQ], ~10 ms a chunk.

A message the air cannot use is logged with its peer and answered with ``error``; it never stops the air. A burst's
header is checked against the plan before any of its chunks is stored. Each socket refuses parts above the largest
legitimate one, the CURVE handshake's included (docs/security.md, "The air before authentication").

With the run's keys (a sealed bench, docs/security.md) both sockets are CURVE servers under the BS's key pair: the
request socket admits the roster's keys, and takes a plan only from the BS's key and a burst only from the key of
the device it claims to be (and a ``listen`` likewise), a ``dl_burst`` only from the BS's key; the medium admits the
BS's key alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from phy import fdma
from phy.air_chunks import DOWNLINK_SLOT, BurstAssembler
from phy.air_downlink import DownlinkAir, DownlinkError
from phy.air_medium import Burst, Medium, MediumSignal, RateError, warm_up
from phy.air_physics import AirError, Physics
from phy.air_sockets import medium_socket, request_socket
from phy.channel import DeviceGeometry, SimChannel, TxSetting
from proto.air import (
    MAX_REQUEST_FRAMES,
    AirMessageError,
    AirRefusal,
    BurstDone,
    BurstHeader,
    BurstOnMedium,
    ChunkFrames,
    DownlinkFrames,
    DownlinkHeader,
    DownlinkIq,
    Listen,
    MediumChunk,
    PlanAccepted,
    RoundPlan,
    decode_request,
)
from trust.curve import BS_USER, RosterAuthenticator, recv_bounded, sender_of, user_device
from trust.keys import RunKeys

log = logging.getLogger("air")


@dataclass
class _BsState:
    """What the air knows from the BS: its identity, the subband plan and the physics it announced."""

    identity: bytes | None = None
    round_idx: int = -1
    physics: Physics | None = None
    plan: dict[int, fdma.Subband] = field(default_factory=dict)


MAX_QUEUED_BURSTS = 2  # per device, waiting for the medium (the one on the air included)
MAX_MEDIUM_BURST_SAMPLES = 1 << 25  # 32 Mi samples, 256 MiB of complex64: one burst at the medium rate


class Air:
    """The air process's server: sockets, the BS's plan, bursts onto the medium. ``run()`` until ``stop()``."""

    def __init__(
        self,
        *,
        address: str,
        medium_address: str,
        noise_seed: int = 0,
        context: zmq.Context | None = None,
        keys: RunKeys | None = None,
    ) -> None:
        """keys: the run's (None: a bench with security.mode none; any peer may send)."""
        ctx = context or zmq.Context.instance()
        self.secure = keys is not None
        self.authenticator = RosterAuthenticator(ctx, keys.roster) if keys is not None else None
        self.router = request_socket(ctx, address, keys.bs if keys is not None else None)
        self.address = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.medium_push = medium_socket(ctx, medium_address, keys.bs if keys is not None else None)
        self.medium_address = self.medium_push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.medium = Medium(noise_seed)
        warm_up()
        self.bs = _BsState()
        self.downlink = DownlinkAir(noise_seed)
        self.chunks = BurstAssembler()
        self._running = True
        self.stats = {"bursts": 0, "refused": 0, "malformed": 0}

    def stop(self, *_: object) -> None:
        self._running = False

    def close(self) -> None:
        self.router.close(linger=0)
        self.medium_push.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while self._running:
            timeout_ms = 2 if self.medium.active() else 100
            dl_due_s = self.downlink.next_due_s()
            if dl_due_s is not None:
                timeout_ms = max(0, min(timeout_ms, int((dl_due_s - time.monotonic()) * 1000) + 1))
            if dict(poller.poll(timeout_ms)).get(self.router):
                for _ in range(100):
                    try:
                        frames, count = recv_bounded(self.router, 1 + MAX_REQUEST_FRAMES, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._take(frames, count)
            self.medium.advance(self._send_chunk, self._on_burst_end)
            self._deliver_downlink()
        log.info(
            "air stopped: %s, medium_samples %d, busy_s %.2f, clock stalls %s",
            self.stats,
            self.medium.samples_sent,
            self.medium.busy_s,
            dataclasses.asdict(self.medium.stalls),
        )

    def report(self) -> dict[str, object]:
        """What the air did, for a benchmark or a run's logs: requests, medium samples, clock stalls, CPU."""
        return {
            **self.stats,
            **self.chunks.stats,
            "medium_samples": self.medium.samples_sent,
            "busy_s": self.medium.busy_s,
            "cpu_s": time.process_time(),
            "started_at": self.medium.started_at,  # time.monotonic() of the medium's first sample (or None)
            "stalls": dataclasses.asdict(self.medium.stalls),
            "downlink": dict(self.downlink.stats),
        }

    # ----------------------------------------------------------------------------------------- requests
    def _take(self, frames: list[zmq.Frame], count: int) -> None:
        """A message off the socket (`trust.curve.recv_bounded`: of an insider's many-part message only the first
        parts were kept, none copied, and the heap went back to the system). One of too many parts is refused."""
        if count <= 1 + MAX_REQUEST_FRAMES:
            self.on_message([f.bytes for f in frames], sender_of(frames[-1]) if self.secure else None)
            return
        error = AirMessageError("request", f"{count - 1} frames, at most {MAX_REQUEST_FRAMES}")
        self._refuse(frames[0].bytes, error, "")

    def on_message(self, parts: list[bytes], sender: str | None = None) -> None:
        """One message as the ROUTER received it: [peer identity, header, (IQ)]; sender: the User-Id of the key
        it came with (trust.curve; None without CURVE)."""
        identity, kind = parts[0], ""
        try:
            request = decode_request(parts[1:])
            kind = self.chunks.kind_of(identity) if isinstance(request, ChunkFrames) else request.type
            if isinstance(request, ChunkFrames):
                self._on_chunk(identity, request)
            elif isinstance(request, RoundPlan):
                if self.secure and sender != BS_USER:
                    raise AirError(f"plan: only the BS's key may send plans (this one is {sender})")
                self._on_plan(identity, request)
            elif isinstance(request, Listen):
                if self.secure and user_device(sender) != request.device_id:
                    raise AirError(f"listen: the key of {sender} cannot listen as device {request.device_id}")
                self.downlink.listen(request.device_id, identity)
            else:
                self._on_header(identity, request, sender)
        except (AirMessageError, AirError, DownlinkError) as exc:
            if isinstance(exc, AirMessageError) and not kind:
                kind = exc.message_type if exc.message_type in ("burst", "plan", "listen", "dl_burst") else ""
            self._refuse(identity, exc, kind)
        except Exception as exc:  # a bug or an odd input must cost one message, not the air
            self.stats["refused"] += 1
            log.exception("air: message from peer %r failed", identity)
            self._reply(identity, AirRefusal(error=f"air failed on it: {exc}", kind=kind))

    def _refuse(self, identity: bytes, exc: Exception, kind: str) -> None:
        self.stats["malformed" if isinstance(exc, AirMessageError) else "refused"] += 1
        log.warning("air: refused a message from peer %r: %s", identity, exc)
        self._reply(identity, AirRefusal(error=str(exc), kind=kind))

    def _on_header(self, identity: bytes, header: BurstHeader | DownlinkHeader, sender: str | None) -> None:
        """A burst's or dl_burst's header: admitted against the key and the plan, from the header alone, before any
        of its chunks is stored; a refused one's chunks are dropped as they come."""
        try:
            if isinstance(header, DownlinkHeader):
                if self.secure and sender != BS_USER:
                    raise AirError(f"dl_burst: only the BS's key may send downlink bursts (this one is {sender})")
                self._admit_downlink(header)
                self.chunks.start(identity, header, DOWNLINK_SLOT)
            else:
                if self.secure and user_device(sender) != header.device_id:
                    raise AirError(f"burst: the key of {sender} cannot send as device {header.device_id}")
                self._admit_burst(header)
                self.chunks.start(identity, header, header.device_id)
        except (AirError, DownlinkError):
            self.chunks.refuse(identity, header)
            raise

    def _on_chunk(self, identity: bytes, chunk: ChunkFrames) -> None:
        whole = self.chunks.add(identity, chunk)
        if whole is None:
            return
        header, iq = whole
        if isinstance(header, DownlinkHeader):
            self._on_downlink(DownlinkFrames(header, iq.view(np.uint8).data))
        else:
            self._on_burst(identity, header, iq)

    def _on_plan(self, identity: bytes, msg: RoundPlan) -> None:
        physics = Physics.from_plan(msg)
        if self.bs.physics and physics.total_bandwidth_hz != self.medium.rate_hz and self.medium.active():
            raise AirError(f"plan: the band changes from {self.medium.rate_hz:.0f} Hz while bursts are on the air")
        try:
            plan = fdma.plan_subbands(physics.total_bandwidth_hz, {s.device_id: s.bandwidth_hz for s in msg.subbands})
        except ValueError as exc:
            raise AirError(f"plan: field 'subbands': {exc}") from None
        for s in msg.subbands:  # the BS's centres must be the ones the rule gives: both ends apply the same plan
            if abs(plan[s.device_id].center_hz - s.center_hz) > 1.0:
                raise AirError(
                    f"plan: field 'subbands': device {s.device_id} centre {s.center_hz} Hz, the subband rule "
                    f"gives {plan[s.device_id].center_hz} Hz"
                )
        self.bs = _BsState(identity, msg.round, physics, plan)
        self.medium.rate_hz = physics.total_bandwidth_hz
        self.medium.clock_speed = physics.clock_speed
        self.medium.hangover_s = physics.hangover_s
        log.info(
            "air: round %d plan from the BS: %s",
            msg.round,
            ", ".join(
                f"dev {k} {sb.center_hz / 1e3:+.1f} kHz / {sb.bandwidth_hz / 1e3:.1f} kHz"
                for k, sb in sorted(plan.items())
            ),
        )
        self._reply(identity, PlanAccepted(round=msg.round, index=self.medium.index))

    def _admit_burst(self, meta: BurstHeader) -> tuple[fdma.Subband, Physics, TxSetting]:
        """The plan's checks of a burst, from its header alone: device, round, width, length, queue, setting."""
        subband = self.bs.plan.get(meta.device_id)
        physics = self.bs.physics
        if subband is None or physics is None:
            raise AirError(
                f"burst: device {meta.device_id} has no subband in the BS's plan for round {self.bs.round_idx}"
                + ("" if self.bs.identity else " (no plan from the BS yet)")
            )
        if meta.round != self.bs.round_idx:
            raise AirError(f"burst: field 'round': {meta.round}, the BS's plan is for round {self.bs.round_idx}")
        if abs(subband.bandwidth_hz - meta.bandwidth_hz) > 1e-6 * meta.bandwidth_hz:
            raise AirError(
                f"burst: device {meta.device_id} sends {meta.bandwidth_hz:.0f} Hz wide, its subband in round "
                f"{self.bs.round_idx} is {subband.bandwidth_hz:.0f} Hz"
            )
        queued = len(self.medium.queues.get(meta.device_id, ()))
        if queued >= MAX_QUEUED_BURSTS:  # an edge waits for each burst's `done`: more is a misbehaving peer
            raise AirError(f"burst: device {meta.device_id} has {queued} bursts waiting for the air already")
        medium_samples = meta.samples * physics.total_bandwidth_hz / meta.bandwidth_hz
        if medium_samples > MAX_MEDIUM_BURST_SAMPLES:  # resampled to the medium rate, a burst grows by that ratio
            raise AirError(
                f"burst: {meta.samples} samples at {meta.bandwidth_hz:.0f} Hz are {medium_samples:.0f} on the medium, "
                f"more than {MAX_MEDIUM_BURST_SAMPLES} (send the frames in several bursts)"
            )
        try:
            # the channel's SNR does not depend on the modulation; 16qam (no plan uses it) is costed as qpsk
            setting = TxSetting(
                meta.tx_power_dbm, meta.bandwidth_hz, "qpsk" if meta.modulation == "16qam" else meta.modulation
            )
        except ValueError as exc:
            raise AirError(f"burst: {exc}") from None
        return subband, physics, setting

    def _on_burst(self, identity: bytes, meta: BurstHeader, iq: np.ndarray) -> None:
        """A whole burst: admitted again (the plan may have moved on while its chunks came), then its numbers."""
        subband, physics, setting = self._admit_burst(meta)
        if not np.isfinite(iq.view(np.float32)).all():
            raise AirError("burst: IQ holds NaN or Inf")
        if not np.all(np.abs(iq.view(np.float32)) < 1e3):
            raise AirError("burst: IQ is not a unit-power OFDM burst (|sample| >= 1000)")
        channel = SimChannel(physics.channel, seed=physics.seed)
        geometry = DeviceGeometry(meta.device_id, physics.distance_m(meta.device_id))
        snr_db = channel.snr_db(geometry, meta.round, setting)
        start = self.medium.next_start(meta.device_id)
        try:
            samples = MediumSignal(
                iq,
                subband,
                physics.total_bandwidth_hz,
                amplitude=fdma.signal_amplitude(snr_db, meta.bandwidth_hz, physics.total_bandwidth_hz),
                cfo_hz=fdma.carrier_offset_hz(physics.seed, meta.device_id, physics.max_cfo_hz),
                start_index=start,
                attenuation_db=physics.attenuation_db,
            )
        except RateError as exc:
            raise AirError(f"burst: {exc}") from None
        self.medium.add(Burst(identity, meta.device_id, meta.round, meta.burst_id, samples, start, snr_db))
        self.stats["bursts"] += 1
        log.info(
            "air: device %d round %d burst %d: %d samples at %.0f Hz, SNR %.1f dB, on the medium at %d..%d",
            meta.device_id,
            meta.round,
            meta.burst_id,
            len(iq),
            meta.bandwidth_hz,
            snr_db,
            start,
            start + len(samples),
        )

    def _admit_downlink(self, header: DownlinkHeader) -> None:
        if self.bs.physics is None:
            raise AirError("dl_burst: no plan from the BS yet (the downlink needs its band and channel)")
        self.downlink.admit(header.samples)

    def _on_downlink(self, request: DownlinkFrames) -> None:
        physics = self.bs.physics
        if physics is None:
            raise AirError("dl_burst: no plan from the BS yet (the downlink needs its band and channel)")
        self.downlink.submit(request, physics, time.monotonic())

    def _deliver_downlink(self) -> None:
        for identity, header, iq in self.downlink.due(time.monotonic()):
            self._reply(identity, header, iq)

    def _reply(
        self,
        identity: bytes,
        reply: BurstDone | BurstOnMedium | PlanAccepted | AirRefusal | DownlinkIq,
        iq: np.ndarray | None = None,
    ) -> None:
        try:
            parts = [identity, reply.encode()] + ([] if iq is None else [iq.data])
            self.router.send_multipart(parts, zmq.NOBLOCK, copy=iq is None)
        except zmq.ZMQError as exc:  # a peer that left: nothing to tell
            log.info("air: could not answer peer %r: %s", identity, exc)

    # ----------------------------------------------------------------------------------------- medium
    def _send_chunk(self, start: int, chunk: np.ndarray) -> bool:
        try:
            self.medium_push.send_multipart([MediumChunk(index=start).encode(), chunk.data], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _on_burst_end(self, b: Burst) -> None:
        if self.bs.identity is not None:  # first the BS: it must know before the edge's burst_end comes
            self._reply(
                self.bs.identity,
                BurstOnMedium(
                    device_id=b.device_id,
                    round=b.round_idx,
                    burst_id=b.burst_id,
                    medium_end=b.end,
                    snr_db=b.snr_db,
                ),
            )
        self._reply(
            b.identity,
            BurstDone(device_id=b.device_id, round=b.round_idx, burst_id=b.burst_id, medium_end=b.end, snr_db=b.snr_db),
        )
