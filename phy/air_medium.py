"""The air's medium: each burst turned into medium samples as the clock reaches it; the clock that sums them with
noise.

Everything the air does to a burst (gain, carrier offset, resampling, mixing into its subband) is known when the
burst arrives; it is done in C loops (scipy's FFTs, numpy) a piece (``PIECE_S``) at a time as the clock reaches it
(``MediumSignal``), and the clock adds the bursts' slices to fresh noise. CPU therefore scales with what is
transmitted, not with the medium rate, and a long burst never holds the air's loop (a whole 16-subband burst of
100 frames took ~1.5 s to convert at once: the medium, 50 ms ahead, ran dry meanwhile).

Clock: while active, the medium advances at ``clock_speed`` x the medium rate in samples per wall-clock second
(1 = real time), at most ``LEAD_S`` ahead. While no burst is queued, the medium stops (after ``hangover_s`` of
noise that flushes the receivers, docs/pitfalls.md §5): idle time is skipped, so the medium index counts only
samples put on the medium and the BS sees one continuous stream. If the BS does not take a chunk (its queue is
full) the clock waits: nothing is dropped, the BS decodes everything, only later.

Stalls (``Medium.stalls``, ``ClockStalls``): every way the medium fell behind its clock while active, by cause.
A consumer stall (``bs_waits``, ``bs_wait_s``) runs from the first chunk the BS did not take (its queue of
``proto.air.MEDIUM_QUEUE_CHUNKS`` chunks full: its receivers lag) to the next one it took; the clock restarts
from there, so that time is lost to real time. A producer stall (``late``, ``late_s``) is an ``advance`` that
finds the medium behind the wall clock, i.e. the ``LEAD_S`` lead used up: the air's own loop did not come round
in time (CPU, or a burst's conversion holding it); ``late_s`` sums how far behind the medium was each time (the
advance then catches up at once). ``idle_gaps`` / ``idle_s``: the medium stopped with no burst queued and started
again later: between rounds that is the edges training, within one burst exchange it is an edge that had not
delivered its next burst in time.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from phy import fdma

CHUNK_S = 0.01  # medium samples per message: 10 ms
LEAD_S = 0.05  # how far the medium may run ahead of the wall clock (a multiple of CHUNK_S)
PIECE_S = 0.05  # a burst's medium samples are computed this much at a time (MediumSignal)
OVERLAP_SAVE_BLOCKS = 16  # FFT size over filter length in the burst resampler (measured: 8-32 are alike)


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


def rate_ratio(total_bandwidth_hz: float, bandwidth_hz: float) -> tuple[int, int]:
    """(up, down): the medium rate over the subband rate as a ratio of integers up to 1000 (else RateError)."""
    ratio = Fraction(total_bandwidth_hz / bandwidth_hz).limit_denominator(1000)
    if abs(float(ratio) - total_bandwidth_hz / bandwidth_hz) > 1e-6 * float(ratio):
        raise RateError(
            f"total/subband bandwidth ratio {total_bandwidth_hz / bandwidth_hz} is not a ratio of integers up to 1000"
        )
    return ratio.numerator, ratio.denominator


@functools.lru_cache(maxsize=64)
def _overlap_save(up: int, bandwidth_hz: float, attenuation_db: float) -> tuple[int, int, int, np.ndarray]:
    """The air's filter for one rate ratio, ready for overlap-save: (taps, FFT size F, valid outputs per block,
    the filter's spectrum at F). F is a multiple of up, so the zero-stuffed input's spectrum is its FFT tiled."""
    import scipy.fft

    taps = air_filter_taps(up, bandwidth_hz, attenuation_db).astype(np.float32)
    size = up * scipy.fft.next_fast_len(-(-OVERLAP_SAVE_BLOCKS * len(taps) // up))
    step = (size - (len(taps) - 1)) // up * up
    spectrum = scipy.fft.fft(taps, size).astype(np.complex64)
    return len(taps), size, step, spectrum


class MediumSignal:
    """A burst at the subband rate as medium samples: scaled, resampled to the medium rate, shifted into place,
    computed on demand (``samples(lo, hi)``), so the air's loop never holds for a whole burst and keeps only the
    burst's own samples.

    Resampling by up/down: zero-stuff by up, low-pass (air_filter_taps), keep every down-th sample, without the
    filter's delay. The low-pass is an overlap-save FFT convolution in blocks: each block's stuffed input has the
    spectrum of its subband samples tiled up times, so one FFT at the subband rate and one inverse FFT at the
    medium rate per block, whatever the filter's length (~10x faster than scipy's oaconvolve of the stuffed burst
    for 16 subbands). The shift uses the absolute medium index, so the phase of every link's carrier runs
    continuously, and any slice equals the same slice of the whole burst.
    """

    def __init__(
        self,
        iq: np.ndarray,
        subband: fdma.Subband,
        total_bandwidth_hz: float,
        *,
        amplitude: float,
        cfo_hz: float,
        start_index: int,
        attenuation_db: float = 70.0,
    ) -> None:
        self.up, self.down = rate_ratio(total_bandwidth_hz, subband.bandwidth_hz)
        self.x = iq.astype(np.complex64, copy=False)
        self.length = -(-len(self.x) * self.up // self.down)  # len(range(0, len(x) * up, down))
        self.phase_inc = 2 * math.pi * (subband.center_hz + cfo_hz) / total_bandwidth_hz
        self.start_index = start_index
        self.amplitude = amplitude
        self.filtered = not (self.up == 1 and self.down == 1)
        self._table = mix_table(self.phase_inc)
        if self.filtered:
            self.n_taps, self.fft_size, self.step, spectrum = _overlap_save(
                self.up, float(subband.bandwidth_hz), float(attenuation_db)
            )
            # the filter's spectrum with the gain in it, as up rows: row u multiplies the u-th copy of the input's
            # spectrum (the zero-stuffed input's spectrum is the input's, tiled up times)
            self.kernel = (spectrum * np.float32(amplitude * self.up)).reshape(self.up, self.fft_size // self.up)
            self.delay = (self.n_taps - 1) // 2
            # the stuffed index where block 0's input starts (a multiple of up, so blocks start on input samples),
            # early enough that block 0's first valid output is at or before the first one kept (the delay)
            self.first_input = (self.delay - (self.n_taps - 1)) // self.up * self.up
        self._piece: tuple[int, np.ndarray] | None = None  # the last computed samples, from position .[0]

    def __len__(self) -> int:
        return self.length

    def samples(self, lo: int, hi: int, *, ahead: int = 0) -> np.ndarray:
        """Positions [lo, hi) of the burst on the medium (0 = its first sample). ahead: compute up to this many
        more in the same pass (kept for the next call: the medium asks chunk by chunk)."""
        lo, hi = max(0, lo), min(self.length, hi)
        if hi <= lo:
            return np.zeros(0, np.complex64)
        if self._piece is not None:
            p0, piece = self._piece
            if p0 <= lo and hi <= p0 + len(piece):
                return piece[lo - p0 : hi - p0]
        end = min(self.length, max(hi, lo + ahead))
        piece = self._compute(lo, end)
        self._piece = (lo, piece)
        return piece[: hi - lo]

    def _compute(self, lo: int, hi: int) -> np.ndarray:
        if not self.filtered:
            y = self.x[lo:hi] * np.float32(self.amplitude)
        else:
            y = self._resample(lo, hi)
        return mix_in_place(y, self.phase_inc, self.start_index + lo, self._table)

    def _resample(self, lo: int, hi: int) -> np.ndarray:
        import scipy.fft

        up, down, step, size = self.up, self.down, self.step, self.fft_size
        # output i is the convolution's sample c = delay + i down; block j holds c in [base + j step, + step)
        base = self.first_input + self.n_taps - 1
        c_lo, c_hi = self.delay + lo * down, self.delay + (hi - 1) * down
        j0, j1 = (c_lo - base) // step, (c_hi - base) // step
        n_blocks = j1 - j0 + 1
        seg, hop = size // up, step // up  # a block's input samples, and the input samples between blocks
        first = self.first_input // up + j0 * hop  # the input sample block j0 starts with (may be < 0)
        need = (n_blocks - 1) * hop + seg
        xs = np.zeros(need, np.complex64)
        a, b = max(0, -first), min(need, len(self.x) - first)
        if a < b:
            xs[a:b] = self.x[first + a : first + b]
        windows = np.lib.stride_tricks.sliding_window_view(xs, seg)[::hop][:n_blocks]
        inputs = scipy.fft.fft(windows, axis=1)
        spectra = np.multiply(inputs[:, None, :], self.kernel[None, :, :]).reshape(n_blocks, size)  # tiled, filtered
        blocks = scipy.fft.ifft(spectra, axis=1, overwrite_x=True)
        conv = blocks[:, self.n_taps - 1 : self.n_taps - 1 + step].reshape(-1)  # c from base + j0 step on (a copy)
        t0 = c_lo - (base + j0 * step)
        y = conv[t0 : t0 + (hi - lo - 1) * down + 1 : down]
        return y if down == 1 else y.copy()  # mixed in place next


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
    """A whole burst at the subband rate -> its medium samples (MediumSignal says how)."""
    signal = MediumSignal(
        iq,
        subband,
        total_bandwidth_hz,
        amplitude=amplitude,
        cfo_hz=cfo_hz,
        start_index=start_index,
        attenuation_db=attenuation_db,
    )
    return signal.samples(0, len(signal))


def warm_up() -> None:
    """Import scipy's signal package and convert a tiny burst: the air's first burst would wait ~1 s for that."""
    to_medium(np.ones(64, np.complex64), fdma.Subband(0, 0.0, 250e3), 1e6, amplitude=1.0, cfo_hz=0.0, start_index=0)


MIX_BLOCK = 4096  # phasors in mix's table


def mix_table(phase_inc: float, block: int = MIX_BLOCK) -> np.ndarray:
    return np.exp(1j * phase_inc * np.arange(block)).astype(np.complex64)


def mix(y: np.ndarray, phase_inc: float, start_index: int, block: int = MIX_BLOCK) -> np.ndarray:
    """y * exp(j phase_inc n), n = start_index + position (complex64; one table of block phasors)."""
    return mix_in_place(np.array(y, dtype=np.complex64), phase_inc, start_index, mix_table(phase_inc, block))


def mix_in_place(y: np.ndarray, phase_inc: float, start_index: int, table: np.ndarray) -> np.ndarray:
    """mix, into y itself (complex64, contiguous), with a table of mix_table(phase_inc)."""
    block = len(table)
    n_blocks, n_full = -(-len(y) // block), len(y) // block
    starts = np.exp(
        1j * np.mod(phase_inc * (start_index + block * np.arange(n_blocks, dtype=np.float64)), 2 * math.pi)
    ).astype(np.complex64)
    if n_full:
        body = y[: n_full * block].reshape(n_full, block)
        body *= table
        body *= starts[:n_full, None]
    if n_full < n_blocks:
        tail = y[n_full * block :]
        tail *= table[: len(tail)]
        tail *= starts[-1]
    return y


@dataclass
class Burst:
    """One edge burst at its place in the band and on the medium."""

    identity: bytes  # the edge's zmq identity: its `done` goes there
    device_id: int
    round_idx: int
    burst_id: int
    samples: MediumSignal | np.ndarray  # at the medium rate, gain/offset/subband applied (complex64)
    start: int  # medium index of the first sample
    snr_db: float

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    def slice(self, lo: int, hi: int, ahead: int = 0) -> np.ndarray:
        """Its samples at medium indices [lo, hi) (within the burst)."""
        if isinstance(self.samples, MediumSignal):
            return self.samples.samples(lo - self.start, hi - self.start, ahead=ahead)
        return self.samples[lo - self.start : hi - self.start]


@dataclass
class ClockStalls:
    """How often and how long the medium's clock fell behind, by cause (the module docstring defines each)."""

    bs_waits: int = 0  # consumer stalls: episodes of the BS not taking chunks
    bs_wait_s: float = 0.0  # wall time of those episodes
    late: int = 0  # producer stalls: advances that found the medium behind the wall clock
    late_s: float = 0.0  # summed deficit at those advances, seconds of medium
    late_max_s: float = 0.0  # the largest single deficit
    idle_gaps: int = 0  # the medium stopped (nothing queued) and restarted
    idle_s: float = 0.0  # wall time it stood still in those gaps


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
        self.stalls = ClockStalls()
        self.started_at: float | None = None  # time.monotonic() when the medium first ran
        self._refused_since: float | None = None  # wall time of the first chunk the BS did not take
        self._idle_since: float | None = None  # wall time the medium stopped

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
            if self._clock is not None:
                self._idle_since = time.monotonic()
            self._clock = None
            return
        now = time.monotonic()
        speed_hz = self.rate_hz * self.clock_speed
        if self._clock is None:
            if self._idle_since is not None:
                self.stalls.idle_gaps += 1
                self.stalls.idle_s += now - self._idle_since
                self._idle_since = None
            self._clock = (now, self.index)
            if self.started_at is None:
                self.started_at = now
        t0, i0 = self._clock
        behind_s = (i0 - self.index) / speed_hz + (now - t0)
        if behind_s > 0 and self._refused_since is None:  # the air's loop came round too late
            self.stalls.late += 1
            self.stalls.late_s += behind_s
            self.stalls.late_max_s = max(self.stalls.late_max_s, behind_s)
        target = i0 + int((now - t0 + LEAD_S) * speed_hz)
        busy0 = time.process_time()
        size = max(256, int(self.rate_hz * CHUNK_S))
        # whole chunks only: one every CHUNK_S, not a sliver every loop (~2 ms), each a message and a BS work() call
        while self.index + size <= target and self.active():
            if self._pending_chunk is None:
                self._pending_chunk = (self.index, self._build_chunk(self.index, size))
            start, chunk = self._pending_chunk
            if not send(start, chunk):  # the BS is behind (or not there yet): the clock waits for it
                self._clock = (now, self.index)
                if self._refused_since is None:
                    self._refused_since = now
                    self.stalls.bs_waits += 1
                break
            if self._refused_since is not None:
                self.stalls.bs_wait_s += time.monotonic() - self._refused_since
                self._refused_since = None
            self._pending_chunk = None
            self.index += len(chunk)
            self.samples_sent += len(chunk)
            self._finish_bursts(on_burst_end)
        self.busy_s += time.process_time() - busy0

    def _build_chunk(self, start: int, n: int) -> np.ndarray:
        piece = max(n, int(self.rate_hz * PIECE_S))
        noise = self.rng.standard_normal((n, 2), dtype=np.float32)
        noise *= np.float32(math.sqrt(0.5))
        chunk = noise.view(np.complex64).reshape(n)
        for queue in self.queues.values():
            for b in queue:
                lo, hi = max(start, b.start), min(start + n, b.end)
                if lo < hi:
                    chunk[lo - start : hi - start] += b.slice(lo, hi, ahead=piece)
        return chunk

    def _finish_bursts(self, on_burst_end: Callable[[Burst], None]) -> None:
        for queue in self.queues.values():
            while queue and queue[0].end <= self.index:
                b = queue.popleft()
                self.hangover_end = max(self.hangover_end, b.end + int(self.hangover_s * self.rate_hz))
                on_burst_end(b)
