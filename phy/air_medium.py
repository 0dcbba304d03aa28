"""The air's medium: each burst turned into medium samples once, on arrival; the clock that sums them with noise.

Everything the air does to a burst (gain, carrier offset, polyphase resampling, mixing into its subband) is known
when the burst arrives, so it is done once per burst, in C loops (scipy, numpy), and the clock then only adds the
bursts' slices to fresh noise. CPU therefore scales with what is transmitted, not with the medium rate.

Clock: while active, the medium advances at ``clock_speed`` x the medium rate in samples per wall-clock second
(1 = real time), at most ``LEAD_S`` ahead. While no burst is queued, the medium stops (after ``hangover_s`` of
noise that flushes the receivers, docs/pitfalls.md §5): idle time is skipped, so the medium index counts only
samples put on the medium and the BS sees one continuous stream. If the BS does not take a chunk (its queue is
full) the clock waits: nothing is dropped, the BS decodes everything, only later.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from phy import fdma

CHUNK_S = 0.01  # medium samples per message: 10 ms
LEAD_S = 0.05  # how far the medium may run ahead of the wall clock


class RateError(ValueError):
    """A subband width whose ratio to the medium rate the resampler cannot realise."""


def air_filter_taps(up: int, bandwidth_hz: float, attenuation_db: float) -> np.ndarray:
    """Low-pass for resampling a subband signal by up/down: flat to PASS_EDGE x b, stop from STOP_EDGE x b."""
    from scipy import signal as sps

    fs = up * bandwidth_hz
    width = (fdma.STOP_EDGE - fdma.PASS_EDGE) * bandwidth_hz
    numtaps, beta = sps.kaiserord(attenuation_db, width / (fs / 2))
    numtaps |= 1  # odd: integer group delay
    cutoff = (fdma.PASS_EDGE + fdma.STOP_EDGE) / 2 * bandwidth_hz
    return sps.firwin(numtaps, cutoff, window=("kaiser", beta), fs=fs)


def to_medium(
    iq: np.ndarray,
    subband: fdma.Subband,
    total_bandwidth_hz: float,
    *,
    amplitude: float,
    cfo_hz: float,
    start_index: int,
    attenuation_db: float = 70.0,
) -> np.ndarray:
    """A burst at the subband rate -> medium samples: scaled, resampled to the medium rate, shifted into place.

    Resampling by up/down: zero-stuff by up, low-pass (FFT overlap-add: ~5x faster than a polyphase loop for
    these lengths), keep every down-th sample, without the filter's delay. The shift uses the absolute medium
    index, so the phase of every link's carrier runs continuously.
    """
    from scipy import signal as sps

    ratio = Fraction(total_bandwidth_hz / subband.bandwidth_hz).limit_denominator(1000)
    if abs(float(ratio) - total_bandwidth_hz / subband.bandwidth_hz) > 1e-6 * float(ratio):
        raise RateError(
            f"total/subband bandwidth ratio {total_bandwidth_hz / subband.bandwidth_hz} is not a "
            f"ratio of integers up to 1000"
        )
    up, down = ratio.numerator, ratio.denominator
    x = iq.astype(np.complex64, copy=False)
    if up == 1 and down == 1:
        y = x * np.float32(amplitude)
    else:
        taps = air_filter_taps(up, subband.bandwidth_hz, attenuation_db).astype(np.float32)
        stuffed = np.zeros(len(x) * up, dtype=np.complex64)
        stuffed[::up] = x * np.float32(amplitude * up)
        delay = (len(taps) - 1) // 2
        y = sps.oaconvolve(stuffed, taps)[delay : delay + len(stuffed) : down].astype(np.complex64, copy=False)
    return mix(y, 2 * math.pi * (subband.center_hz + cfo_hz) / total_bandwidth_hz, start_index)


def mix(y: np.ndarray, phase_inc: float, start_index: int, block: int = 4096) -> np.ndarray:
    """y * exp(j phase_inc n), n = start_index + position (complex64; one table of block phasors)."""
    n_blocks = -(-len(y) // block)
    table = np.exp(1j * phase_inc * np.arange(block)).astype(np.complex64)
    starts = np.exp(
        1j * np.mod(phase_inc * (start_index + block * np.arange(n_blocks, dtype=np.float64)), 2 * math.pi)
    ).astype(np.complex64)
    padded = np.zeros(n_blocks * block, dtype=np.complex64)
    padded[: len(y)] = y
    padded = padded.reshape(n_blocks, block)
    padded *= table[None, :]
    padded *= starts[:, None]
    return padded.reshape(-1)[: len(y)]


@dataclass
class Burst:
    """One edge burst, already converted to medium samples at its place in the band."""

    identity: bytes  # the edge's zmq identity: its `done` goes there
    device_id: int
    round_idx: int
    burst_id: int
    samples: np.ndarray  # complex64 at the medium rate, gain/offset/subband applied
    start: int  # medium index of the first sample
    snr_db: float

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


class Medium:
    """Queued bursts per device, the medium index and its clock; what goes out is up to the caller's send()."""

    def __init__(self, noise_seed: int = 0) -> None:
        self.queues: dict[int, deque[Burst]] = {}
        self.index = 0  # medium samples sent so far
        self.hangover_end = 0
        self.rate_hz = 0.0  # from the BS's plan; 0 until the first
        self.clock_speed = 1.0
        self.hangover_s = 0.02
        self.rng = np.random.default_rng([noise_seed, 0xA1A])
        self._clock: tuple[float, int] | None = None  # (wall time, medium index) when the medium became active
        self._pending_chunk: tuple[int, np.ndarray] | None = None  # built but not yet taken by the BS
        self.samples_sent = 0
        self.busy_s = 0.0  # CPU time spent building and sending chunks

    def active(self) -> bool:
        return any(self.queues.values()) or self.index < self.hangover_end or self._pending_chunk is not None

    def next_start(self, device_id: int) -> int:
        """Where a new burst of this device goes: after what is built and after its own queued bursts."""
        built = self.index + (len(self._pending_chunk[1]) if self._pending_chunk else 0)
        return max([built] + [b.end for b in self.queues.get(device_id, ())])

    def add(self, burst: Burst) -> None:
        self.queues.setdefault(burst.device_id, deque()).append(burst)

    def advance(self, send: Callable[[int, np.ndarray], bool], on_burst_end: Callable[[Burst], None]) -> None:
        """Put medium samples out up to the clock (real time x clock_speed, LEAD_S ahead).

        send(first index, chunk) is False when the BS did not take the chunk: the clock then waits for it.
        on_burst_end(burst) runs once the burst's last sample has been sent.
        """
        if not self.active():
            self._clock = None
            return
        now = time.monotonic()
        if self._clock is None:
            self._clock = (now, self.index)
        t0, i0 = self._clock
        target = i0 + int((now - t0 + LEAD_S) * self.rate_hz * self.clock_speed)
        busy0 = time.process_time()
        while self.index < target and self.active():
            if self._pending_chunk is None:
                size = max(256, int(self.rate_hz * CHUNK_S))
                self._pending_chunk = (self.index, self._build_chunk(self.index, min(size, target - self.index)))
            start, chunk = self._pending_chunk
            if not send(start, chunk):  # the BS is behind (or not there yet): the clock waits for it
                self._clock = (now, self.index)
                break
            self._pending_chunk = None
            self.index += len(chunk)
            self.samples_sent += len(chunk)
            self._finish_bursts(on_burst_end)
        self.busy_s += time.process_time() - busy0

    def _build_chunk(self, start: int, n: int) -> np.ndarray:
        noise = self.rng.standard_normal((n, 2), dtype=np.float32)
        noise *= np.float32(math.sqrt(0.5))
        chunk = noise.view(np.complex64).reshape(n)
        for queue in self.queues.values():
            for b in queue:
                lo, hi = max(start, b.start), min(start + n, b.end)
                if lo < hi:
                    chunk[lo - start : hi - start] += b.samples[lo - b.start : hi - b.start]
        return chunk

    def _finish_bursts(self, on_burst_end: Callable[[Burst], None]) -> None:
        for queue in self.queues.values():
            while queue and queue[0].end <= self.index:
                b = queue.popleft()
                self.hangover_end = max(self.hangover_end, b.end + int(self.hangover_s * self.rate_hz))
                on_burst_end(b)
