"""Frame-level software link for CI and sweeps: the channel is applied at the edge.

The edge decides per frame, from the SimChannel SNR (with the bench's impairments: shadowing, Rician or
correlated fading, interference) and the PerCurve (the bench's true curve, PerCurve.for_sim_link), whether
the frame survives; survivors go to the BS over a zmq PUSH/PULL pair as
[sidecar (proto.air.FrameSidecar: the measured snr_db), frame bytes]. Airtime is virtual: it is
computed (the samples the OFDM transmitter would emit, proto.numerology) and reported, never slept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import zmq

from phy.channel import DeviceGeometry, PerCurve, SimChannel, TxSetting
from phy.uplink import RxFrame, TxReport, UplinkReceiver, UplinkTransmitter, checked_frames
from proto.air import AirMessageError, FrameSidecar, decode_sidecar
from proto.framing import MAX_FRAME_BYTES
from proto.numerology import burst_airtime_s
from trust.curve import make_client, make_server, recv_bounded
from trust.keys import KeyPair

# The data port's bound on what a connected peer can make the BS queue: RCVHWM messages of at most MAX_PART_BYTES
# per part (a sidecar and a frame); a bigger part disconnects the peer (docs/security.md, "Bounded memory").
DATA_RCVHWM = 4096
MAX_PART_BYTES = 2 * MAX_FRAME_BYTES  # a frame (<= 4,038 bytes) or a sidecar (a short JSON), with room

log = logging.getLogger(__name__)

_LOSS_STREAM = 0x51A1  # separates the loss/estimation RNG stream from the fading one


class SimUplinkTransmitter(UplinkTransmitter):
    """Edge side of the sim link. Not thread-safe (zmq sockets are not)."""

    def __init__(
        self,
        *,
        bs_data_address: str,
        geometry: DeviceGeometry,
        channel: SimChannel,
        per_curve: PerCurve,
        seed: int,
        context: zmq.Context | None = None,
        send_timeout_s: float = 5.0,
        sndhwm: int = 10_000,
        key: KeyPair | None = None,
    ) -> None:
        """key: the device's key pair on a sealed bench: the data port then takes only CURVE peers of the roster."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.geometry = geometry
        self.channel = channel
        self.per_curve = per_curve
        self.seed = seed
        self.bs_data_address = bs_data_address
        self._attempts: dict[int, int] = {}
        self.last_true_snr_db: float | None = None  # diagnostics/records only: the BS must not see it
        self.last_frames_lost = 0  # dropped by the channel in the last send()
        self.last_frames_undeliverable = 0  # dropped because the BS socket did not take them
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.PUSH)
        timeout_ms = max(0, int(send_timeout_s * 1000))
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.SNDTIMEO, timeout_ms)  # a gone BS must not block the edge forever
        self._sock.setsockopt(zmq.LINGER, timeout_ms)  # flush queued frames on close, but bounded
        if key is not None:
            assert key.bs_public is not None  # load_key checks a device key file carries it
            make_client(self._sock, key, key.bs_public)
        self._sock.connect(bs_data_address)
        self._closed = False

    def send(self, frames: Sequence[bytes], setting: TxSetting, *, round_idx: int) -> TxReport:
        if self._closed:
            raise RuntimeError("SimUplinkTransmitter is closed")
        frames = checked_frames(frames)
        self.last_frames_lost = 0
        self.last_frames_undeliverable = 0
        if not frames:
            return TxReport(frames_sent=0, bytes_sent=0, airtime_s=0.0)

        # k-th send() of this round -> its own reproducible random stream.
        attempt = self._attempts.get(round_idx, 0) + 1
        self._attempts[round_idx] = attempt
        rng = np.random.default_rng([self.seed, _LOSS_STREAM, self.geometry.device_id, round_idx, attempt])
        true_snr_db = self.channel.snr_db(self.geometry, round_idx, setting)
        self.last_true_snr_db = true_snr_db
        uniforms = rng.random(len(frames))
        est_err_db = rng.standard_normal(len(frames)) * self.channel.cfg.snr_est_sigma_db

        per_by_size: dict[int, float] = {}
        peer_ok = True
        for i, frame in enumerate(frames):
            n = len(frame)
            if n not in per_by_size:
                per_by_size[n] = self.per_curve.per(true_snr_db, setting.modulation, n)
            sidecar_fields = self._sidecar(
                true_snr_db, setting, lost=uniforms[i] < per_by_size[n], est_err_db=float(est_err_db[i])
            )
            if sidecar_fields is None:
                self.last_frames_lost += 1
                continue
            if not peer_ok:
                self.last_frames_undeliverable += 1
                continue
            sidecar = sidecar_fields.encode()
            try:
                self._sock.send_multipart([sidecar, frame])
            except zmq.Again:
                # BS gone or not draining: the rest of this burst is lost, do not wait per frame.
                peer_ok = False
                self.last_frames_undeliverable += 1
        if not peer_ok:
            log.warning(
                "sim uplink device %d round %d: BS at %s did not accept frames within the send timeout; "
                "%d frame(s) counted as sent-but-lost",
                self.geometry.device_id,
                round_idx,
                self.bs_data_address,
                self.last_frames_undeliverable,
            )
        return TxReport(
            frames_sent=len(frames),
            bytes_sent=sum(len(f) for f in frames),
            airtime_s=burst_airtime_s([len(f) for f in frames], setting.modulation, setting.bandwidth_hz),
        )

    def _sidecar(self, true_snr_db: float, setting: TxSetting, *, lost: bool, est_err_db: float) -> FrameSidecar | None:
        """What travels beside a frame, or None when the channel loses it: here the PER draw decides and the
        sidecar carries the receiver's SNR estimate (true SNR + estimation error)."""
        return None if lost else FrameSidecar(snr_db=float(true_snr_db + est_err_db))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


class SimUplinkReceiver(UplinkReceiver):
    """BS side of the sim link: a bound PULL socket. Not thread-safe.

    key: the BS's key pair on a sealed bench: only the roster's devices can connect (CURVE, the process's
    RosterAuthenticator), so the data port's queues are bounded by the roster, not by who reaches the port."""

    def __init__(
        self,
        *,
        bind_address: str,
        context: zmq.Context | None = None,
        rcvhwm: int = DATA_RCVHWM,
        max_batch: int = 1000,
        key: KeyPair | None = None,
    ) -> None:
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_PART_BYTES)  # a peer sending a bigger part is disconnected
        if key is not None:
            make_server(self._sock, key, max_message_bytes=MAX_PART_BYTES)
        if bind_address.startswith("tcp://") and bind_address.endswith(":0"):
            bind_address = bind_address[:-2] + ":*"
        self._sock.bind(bind_address)
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.max_batch = max_batch
        self.malformed_count = 0
        self._closed = False

    @property
    def poll_socket(self) -> zmq.Socket:
        return self._sock

    def recv(self, timeout_s: float) -> list[RxFrame]:
        """Wait up to timeout_s for frames, then return everything already queued.

        Returns as soon as at least one valid frame is in hand (it does not
        keep waiting for more); timeout_s=0 is a non-blocking drain.
        """
        if self._closed:
            return []
        deadline = time.monotonic() + max(0.0, timeout_s)
        out: list[RxFrame] = []
        while True:
            remaining_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(remaining_ms, zmq.POLLIN):
                return out
            for _ in range(self.max_batch):
                try:
                    frames, count = recv_bounded(self._sock, 2, zmq.NOBLOCK)
                except zmq.Again:
                    break
                rx = self._parse([f.bytes for f in frames], count)
                if rx is not None:
                    out.append(rx)
            if out or remaining_ms == 0:
                return out

    def _parse(self, parts: list[bytes], count: int) -> RxFrame | None:
        problem = None
        snr_db: float | None = None
        if count != 2:
            problem = f"expected 2 parts [sidecar, frame], got {count}"
        else:
            try:
                snr_db = decode_sidecar(parts[0]).snr_db
            except AirMessageError as exc:
                problem = str(exc)
        if problem is not None:
            self.malformed_count += 1
            log.warning(
                "sim uplink receiver %s: skipping malformed message: %s; parts=%s",
                self.address,
                problem,
                _preview(parts),
            )
            return None
        return RxFrame(data=bytes(parts[1]), snr_db=snr_db, rx_time=time.time())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)


def _preview(parts: list[bytes], limit: int = 48) -> str:
    shown = [p[:limit] + (b"..." if len(p) > limit else b"") for p in parts[:4]]
    more = f" (+{len(parts) - 4} more)" if len(parts) > 4 else ""
    return f"{shown!r}{more}"
