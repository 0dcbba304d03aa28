"""Bounded selective-repeat ARQ, both sides, independent of the PHY and of sockets.

Edge side: `send_with_arq`. The ack path is a callback so the same logic works over any control channel
(and in tests with a fake). Bounded by attempts and by airtime, because every retransmission costs airtime
that the round's schedule has to pay for.

BS side: `AckTimers`. Data and control travel on different paths, so a burst's `burst_end` can overtake its
last frames; the BS answers a burst once every frame of it arrived, or when its guard interval has passed,
with every sequence number it holds for that device and round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from phy.channel import TxSetting
from phy.uplink import UplinkTransmitter
from proto.framing import Frame

log = logging.getLogger(__name__)

# request_ack(attempt, seqs_sent_this_attempt) -> seqs the receiver holds so far, or None (no answer)
AckFn = Callable[[int, list[int]], set[int] | None]
# received(device_id, round_idx) -> seqs the BS holds of that device's update
ReceivedFn = Callable[[int, int], set[int]]
# encode(frame, attempt) -> the bytes put on the air (trust.sealing.FrameSealer.seal seals them)
FrameEncoder = Callable[[Frame, int], bytes]


def plain_encoder(frame: Frame, attempt: int) -> bytes:
    """A bench with `security.mode: none`: the attempt in the header, the fragment in the clear."""
    return replace(frame, attempt=attempt).to_bytes()


@dataclass
class ArqResult:
    delivered: bool
    attempts: int
    frames_sent: int
    frames_lost: int  # transmissions not acknowledged (all of an attempt whose ack never came)
    bytes_sent: int
    airtime_s: float
    stop_reason: str = ""  # "delivered" | "max_attempts" | "airtime_budget" | "no_ack"


def send_with_arq(
    tx: UplinkTransmitter,
    frames: Sequence[Frame],
    setting: TxSetting,
    *,
    round_idx: int,
    request_ack: AckFn,
    max_attempts: int,
    airtime_budget_s: float | None,
    encode: FrameEncoder = plain_encoder,
) -> ArqResult:
    """Send frames, then resend only the unacknowledged ones.

    Attempt 1 always sends everything (the budget only gates retransmissions).
    Stops when all seqs are acked, after max_attempts, when request_ack returns
    None, or when the next attempt's estimated airtime would push the total
    past airtime_budget_s. Each attempt's frames are encoded anew by `encode(frame, attempt)` (the attempt is in
    the header; a sealer seals each attempt under its own nonce). The estimate is tx.estimate_airtime_s() when the
    PHY knows it, else the mean airtime per frame so far times the frames left.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if airtime_budget_s is not None and airtime_budget_s < 0:
        raise ValueError(f"airtime_budget_s must be >= 0 or None, got {airtime_budget_s}")
    by_seq: dict[int, Frame] = {}
    for f in frames:
        if f.round_idx != round_idx:
            raise ValueError(f"frame seq {f.seq} has round_idx {f.round_idx}, sending for round {round_idx}")
        if f.seq in by_seq:
            raise ValueError(f"duplicate seq {f.seq} in frames")
        by_seq[f.seq] = f
    result = ArqResult(delivered=False, attempts=0, frames_sent=0, frames_lost=0, bytes_sent=0, airtime_s=0.0)
    missing = list(by_seq)  # keeps the caller's order
    while missing:
        if result.attempts >= max_attempts:
            result.stop_reason = "max_attempts"
            break
        payload = [encode(by_seq[s], result.attempts + 1) for s in missing]
        if result.attempts > 0 and airtime_budget_s is not None:
            estimate_s = tx.estimate_airtime_s([len(p) for p in payload], setting)
            if estimate_s is None:
                estimate_s = result.airtime_s / max(1, result.frames_sent) * len(payload)
            if result.airtime_s + estimate_s > airtime_budget_s:
                log.info(
                    "ARQ round %d: stopping before attempt %d, %.4f s + %.4f s would exceed budget %.4f s",
                    round_idx,
                    result.attempts + 1,
                    result.airtime_s,
                    estimate_s,
                    airtime_budget_s,
                )
                result.stop_reason = "airtime_budget"
                break
        seqs = list(missing)
        report = tx.send(payload, setting, round_idx=round_idx)
        result.attempts += 1
        result.frames_sent += report.frames_sent
        result.bytes_sent += report.bytes_sent
        result.airtime_s += report.airtime_s
        acked = request_ack(result.attempts, seqs)
        if acked is None:
            result.frames_lost += len(seqs)
            result.stop_reason = "no_ack"
            log.warning("ARQ round %d: no ack after attempt %d, giving up", round_idx, result.attempts)
            break
        acked = set(acked)
        result.frames_lost += sum(1 for s in seqs if s not in acked)
        missing = [s for s in by_seq if s not in acked]
        log.debug(
            "ARQ round %d attempt %d: %d/%d frames missing", round_idx, result.attempts, len(missing), len(by_seq)
        )
    result.delivered = not missing
    if result.delivered:
        result.stop_reason = "delivered"
    return result


@dataclass(frozen=True)
class AckTimer:
    """One burst the BS owes an answer: as soon as all of `seqs` arrived, at `due_s` at the latest."""

    device_id: int
    round_idx: int
    attempt: int
    seqs: frozenset[int]
    due_s: float


class AckTimers:
    """The BS's pending ARQ answers, on the caller's clock (seconds, monotonic)."""

    def __init__(self, guard_s: float) -> None:
        if guard_s < 0:
            raise ValueError(f"guard_s must be >= 0, got {guard_s}")
        self.guard_s = guard_s
        self._timers: list[AckTimer] = []

    def __len__(self) -> int:
        return len(self._timers)

    def burst_ended(self, device_id: int, round_idx: int, attempt: int, seqs: Iterable[int], now_s: float) -> None:
        """An edge finished an attempt: answer it once these frames are in, or guard_s from now."""
        self._timers.append(AckTimer(device_id, round_idx, attempt, frozenset(seqs), now_s + self.guard_s))

    def next_due_s(self) -> float | None:
        """When the earliest answer falls due (the caller polls no longer than that), or None."""
        return min((t.due_s for t in self._timers), default=None)

    def overdue_with_gaps(self, now_s: float, received: ReceivedFn) -> bool:
        """An answer is due while frames of its burst are missing: the caller should drain the PHY first
        (a receiver may lag the air)."""
        return any(t.due_s <= now_s and not t.seqs <= received(t.device_id, t.round_idx) for t in self._timers)

    def take_answerable(self, now_s: float, received: ReceivedFn) -> list[tuple[AckTimer, set[int]]]:
        """Remove and return the timers to answer now (complete or due), each with the seqs held for it."""
        answer, keep = [], []
        for t in self._timers:
            have = received(t.device_id, t.round_idx)
            if t.due_s <= now_s or t.seqs <= have:
                answer.append((t, have))
            else:
                keep.append(t)
        self._timers = keep
        return answer

    def discard_round(self, round_idx: int) -> None:
        """The round closed: its bursts get no answer any more."""
        self._timers = [t for t in self._timers if t.round_idx != round_idx]
