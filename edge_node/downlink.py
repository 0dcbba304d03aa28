"""The edge's side of the downlink over the PHY: the adapter view and the ARQ acks come as OFDM bursts.

A plan with `view_frames` says the adapter view comes over the air (bs_node.rounds.downlink). The edge decodes
each downlink burst the air delivers with its own OFDM receiver (phy.downlink_rx), keeps the frames of this
round's view (sender proto.framing.BS_DEVICE_ID) and, after an attempt's last burst, tells the BS which frames it
holds (`view_status`). When no burst came for a while it asks again with `timed_out`. It gives up after
`arq.max_attempts` attempts or the plan's deadline; the round then fails with a reason that says so. The whole
view must hash to the plan's `view_sha256` (the plan came over the authenticated control plane; the air need not
be), else the round fails as well.

The uplink's ARQ acks come the same way (`request_ack`, the control plane's `BsClient.request_ack` over the air):
the edge sends `burst_end` on the control plane and the BS answers with an `ack` message in frames addressed to
this device (sender field = this device's id, attempt = the acknowledged attempt). A lost ack is asked for again
(the same `burst_end`) every third of `arq.ack_timeout_s`; the BS answers each request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np

from config import BenchConfig, ExperimentConfig
from edge_node.client import BsClient
from phy.downlink_rx import DownlinkReceiver
from phy.uplink import UplinkTransmitter
from proto.air import DownlinkFrames
from proto.control import MAX_MESSAGE_BYTES, Ack, BurstEnd, MessageError, Plan, ViewStatus, decode_control
from proto.framing import BS_DEVICE_ID, Frame, FrameError, Reassembler
from proto.numerology import burst_airtime_s

log = logging.getLogger("edge")


class ViewNotReceived(RuntimeError):
    """The plan's view did not arrive whole (or not as announced) over the downlink."""


class EdgeDownlink:
    """One per edge run: the downlink decoder (started on first use), each round's view ARQ, the uplink's acks."""

    def __init__(
        self,
        experiment: ExperimentConfig,
        bench: BenchConfig,
        device_id: int,
        source: UplinkTransmitter,
        *,
        client: BsClient,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.exp, self.bench, self.device_id, self.source = experiment, bench, device_id, source
        self.client, self.stopping = client, stopping
        self.heartbeat = client.heartbeat  # RoundLink's heartbeat: the control plane's (only the acks come by air)
        self.decoder: DownlinkReceiver | None = None  # GNU Radio starts with the first view
        self.last_snr_db: list[float] = []  # the measured SNR of the last view's frames

    def start(self) -> None:
        """Start the downlink decoder (GNU Radio) if it is not running yet."""
        if self.decoder is None:
            self.decoder = DownlinkReceiver(self.bench.snr_offset_db)

    def receive_view(self, plan: Plan) -> tuple[bytes, float | None]:
        """The plan's view, whole and checked against its hash, and the mean SNR (dB) the receiver measured on its
        frames (None: no estimate); ViewNotReceived if it did not come."""
        assert plan.view_frames is not None
        total, r = plan.view_frames, plan.round
        self.start()
        assert self.decoder is not None
        payload = self.bench.radio.frame_payload_bytes
        reassembler = Reassembler()
        reassembler.expect(BS_DEVICE_ID, r, total * payload)
        dl = self.bench.downlink
        # one attempt's wait: the whole view's airtime (other modules' views may go first) plus the ARQ's timeout
        airtime_s = burst_airtime_s([payload + 64] * total, dl.modulation, self.bench.radio.total_bandwidth_hz)
        wait_s = 2 * airtime_s / self.bench.air.clock_speed + self.bench.arq.ack_timeout_s
        end = time.monotonic() + plan.deadline_s
        heard, asked, self.last_snr_db = 0, 0, []
        waiting_since = time.monotonic()
        while not self.stopping() and time.monotonic() < end and asked <= self.bench.arq.max_attempts:
            self.client.heartbeat(f"view {len(reassembler.received_seqs(BS_DEVICE_ID, r))}/{total}", round_idx=r)
            bursts = self.source.take_downlink(min(self.exp.round.heartbeat_s, max(0.0, end - time.monotonic())))
            for burst in bursts:
                if burst.header.round != r or burst.header.kind != "view":
                    continue  # a burst of an earlier round that came late, or an ack
                iq = self._samples(burst)
                if iq is None:
                    continue
                decoded = self.decoder.decode(iq, burst.header.packets)
                for rx in decoded:
                    self._add(reassembler, rx.data, r, rx.snr_db)
                log.info(
                    "edge %d: round %d downlink burst %d: channel SNR %.1f dB, %d packet(s) decoded, %d/%d frames held",
                    self.device_id,
                    r,
                    burst.header.burst_id,
                    getattr(burst.header, "snr_db", float("nan")),
                    len(decoded),
                    len(reassembler.received_seqs(BS_DEVICE_ID, r)),
                    total,
                )
                if burst.header.final:
                    heard += 1
                    asked += 1
                    waiting_since = time.monotonic()
                    if self._status(reassembler, r, heard, total, timed_out=False):
                        snr = self.last_snr_db
                        return self._whole(reassembler, plan), float(np.mean(snr)) if snr else None
                    if heard >= self.bench.arq.max_attempts:
                        end = time.monotonic()  # the BS sends no more attempts
            if time.monotonic() - waiting_since > wait_s:
                asked += 1
                waiting_since = time.monotonic()
                log.info("edge %d: round %d: no downlink burst for %.0f s; asking again", self.device_id, r, wait_s)
                self._status(reassembler, r, heard, total, timed_out=True)
        have = len(reassembler.received_seqs(BS_DEVICE_ID, r))
        raise ViewNotReceived(
            f"adapter view not received over the downlink: {have} of {total} frames after {heard} attempt(s)"
        )

    def _samples(self, burst: DownlinkFrames) -> np.ndarray | None:
        """The burst's IQ, or None (logged) when it holds NaN or Inf: the receiver takes numbers only."""
        iq = np.frombuffer(burst.iq, dtype=np.complex64)
        if np.isfinite(iq.view(np.float32)).all():
            return iq
        log.warning("edge %d: a downlink burst with NaN or Inf samples skipped", self.device_id)
        return None

    def _add(self, reassembler: Reassembler, data: bytes, r: int, snr_db: float | None) -> None:
        try:
            frame = Frame.from_bytes(data)
            if frame.device_id != BS_DEVICE_ID or frame.round_idx != r:
                return  # another round's view (a late burst), or not the BS's
            if reassembler.add(frame) and snr_db is not None:
                self.last_snr_db.append(snr_db)
        except FrameError as exc:
            log.warning("edge %d: downlink frame dropped: %s", self.device_id, exc)

    def _status(self, reassembler: Reassembler, r: int, heard: int, total: int, *, timed_out: bool) -> bool:
        have = sorted(reassembler.received_seqs(BS_DEVICE_ID, r))
        self.client.send(
            ViewStatus(
                device_id=self.device_id, round=r, attempt=heard, received=have, total=total, timed_out=timed_out
            )
        )
        return len(have) == total

    def _whole(self, reassembler: Reassembler, plan: Plan) -> bytes:
        view = reassembler.pop(BS_DEVICE_ID, plan.round)
        if hashlib.sha256(view).hexdigest() != plan.view_sha256:
            raise ViewNotReceived("the view received over the downlink does not match the plan's view_sha256")
        return view

    def request_ack(
        self, round_idx: int, attempt: int, seqs: list[int], total: int, timeout_s: float
    ) -> set[int] | None:
        """The uplink ARQ's feedback with the ack over the air: which frames of this round the BS holds (None: no
        ack within timeout_s, or the BS moved on: a plan, shutdown or welcome came, kept for the node)."""
        request = BurstEnd(device_id=self.device_id, round=round_idx, attempt=attempt, seqs=list(seqs), total=total)
        self.client.send(request)
        start = time.monotonic()
        deadline, next_request = start + timeout_s, start + timeout_s / 3
        reassembler = Reassembler()
        reassembler.expect(self.device_id, round_idx, MAX_MESSAGE_BYTES)
        while not self.stopping() and time.monotonic() < deadline:
            if self.client.moved_on():
                return None
            for burst in self.source.take_downlink(min(0.2, max(0.0, deadline - time.monotonic()))):
                if burst.header.round != round_idx or burst.header.kind != "ack":
                    continue
                ack = self._ack(reassembler, burst, round_idx, attempt)
                if ack is not None:
                    return set(ack.received)
            if time.monotonic() >= next_request:
                log.info(
                    "edge %d: no ack over the air for round %d attempt %d yet: asking again",
                    self.device_id,
                    round_idx,
                    attempt,
                )
                self.client.send(request)
                next_request += timeout_s / 3
        log.warning("edge %d: no ack over the air for round %d attempt %d", self.device_id, round_idx, attempt)
        return None

    def _ack(self, reassembler: Reassembler, burst: DownlinkFrames, round_idx: int, attempt: int) -> Ack | None:
        """The ack for (round_idx, attempt) once its frames are all here (None: not yet, or not this one)."""
        self.start()
        assert self.decoder is not None
        iq = self._samples(burst)
        if iq is None:
            return None
        for rx in self.decoder.decode(iq, burst.header.packets):
            try:
                frame = Frame.from_bytes(rx.data)
                if (frame.device_id, frame.round_idx, frame.attempt) == (self.device_id, round_idx, attempt):
                    reassembler.add(frame)
            except FrameError as exc:
                log.warning("edge %d: downlink frame dropped: %s", self.device_id, exc)
        if not reassembler.is_complete(self.device_id, round_idx):
            return None
        try:
            msg = decode_control(reassembler.pop(self.device_id, round_idx))
        except MessageError as exc:
            log.warning("edge %d: an ack over the air did not decode: %s", self.device_id, exc)
            return None
        if isinstance(msg, Ack) and (msg.round, msg.attempt) == (round_idx, attempt):
            return msg
        return None

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
