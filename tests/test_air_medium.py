"""The air's medium without sockets: a burst's medium samples computed piece by piece (overlap-save FFTs) equal
the plain zero-stuff + filter + decimate + shift of the whole burst; the clock's stall counters; fresh noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from phy import fdma

pytest.importorskip("scipy")

from phy.air_medium import (  # noqa: E402  (after the scipy check)
    Burst,
    Medium,
    MediumSignal,
    air_filter_taps,
    mix,
    rate_ratio,
    to_medium,
)


def reference(iq, subband, total_hz, *, amplitude, cfo_hz, start_index, attenuation_db=70.0):
    """The air's conversion as it was written first: the whole stuffed burst through scipy's oaconvolve."""
    from scipy import signal as sps

    up, down = rate_ratio(total_hz, subband.bandwidth_hz)
    x = iq.astype(np.complex64)
    if up == 1 and down == 1:
        y = x * np.float32(amplitude)
    else:
        taps = air_filter_taps(up, subband.bandwidth_hz, attenuation_db).astype(np.float32)
        stuffed = np.zeros(len(x) * up, dtype=np.complex64)
        stuffed[::up] = x * np.float32(amplitude * up)
        delay = (len(taps) - 1) // 2
        y = sps.oaconvolve(stuffed, taps)[delay : delay + len(stuffed) : down].astype(np.complex64)
    return mix(y, 2 * math.pi * (subband.center_hz + cfo_hz) / total_hz, start_index)


def burst(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(n) + 1j * rng.standard_normal(n)) / math.sqrt(2)).astype(np.complex64)


@pytest.mark.parametrize(
    "widths, device",
    [
        ({k: 250e3 for k in range(4)}, 1),  # 4/1
        ({k: 62.5e3 for k in range(16)}, 15),  # 16/1
        ({0: 400e3, 1: 200e3, 2: 400e3}, 0),  # 5/2
        ({0: 600e3, 1: 400e3}, 0),  # 5/3
        ({0: 1e6}, 0),  # the whole band: no filter
    ],
)
def test_pieces_equal_the_whole_burst_through_the_plain_filter(widths, device):
    subband = fdma.plan_subbands(1e6, widths)[device]
    x = burst(20_011)
    kwargs = dict(amplitude=0.7, cfo_hz=-123.4, start_index=98_765, attenuation_db=60.0)
    want = reference(x, subband, 1e6, **kwargs)
    whole = to_medium(x, subband, 1e6, **kwargs)
    assert whole.dtype == np.complex64 and len(whole) == len(want)
    scale = np.sqrt(np.mean(np.abs(want) ** 2))
    assert np.max(np.abs(whole - want)) < 1e-5 * scale
    signal = MediumSignal(x, subband, 1e6, **kwargs)
    rng = np.random.default_rng(1)
    cuts = np.unique(np.concatenate([[0, len(signal)], rng.integers(0, len(signal), 40)]))
    pieces = [signal.samples(int(a), int(b), ahead=int(rng.integers(0, 5000))) for a, b in zip(cuts, cuts[1:])]
    assert np.max(np.abs(np.concatenate(pieces) - want)) < 1e-5 * scale
    assert len(signal.samples(-5, 0)) == 0 and len(signal.samples(len(signal), len(signal) + 9)) == 0


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_short_bursts_convert_like_long_ones(n):
    subband = fdma.plan_subbands(1e6, {0: 400e3, 1: 200e3, 2: 400e3})[2]
    x = burst(n, seed=n)
    want = reference(x, subband, 1e6, amplitude=2.0, cfo_hz=50.0, start_index=3)
    got = to_medium(x, subband, 1e6, amplitude=2.0, cfo_hz=50.0, start_index=3)
    assert len(got) == len(want) == math.ceil(n * 5 / 2)
    assert np.allclose(got, want, atol=1e-5 * np.max(np.abs(want)))


def test_the_medium_adds_bursts_to_fresh_noise_and_counts_stalls():
    medium = Medium(noise_seed=3)
    medium.rate_hz, medium.hangover_s = 1e6, 0.001
    subband = fdma.equal_subbands(1e6, 4)[2]
    x = burst(5_000)
    signal = MediumSignal(x, subband, 1e6, amplitude=1.0, cfo_hz=0.0, start_index=0)
    medium.add(Burst(b"edge", 2, 1, 1, signal, 0, 20.0))
    sent: list[tuple[int, np.ndarray]] = []
    refuse = [3]  # the BS takes nothing the first three times: one consumer stall

    def send(start: int, chunk: np.ndarray) -> bool:
        if refuse[0] > 0:
            refuse[0] -= 1
            return False
        sent.append((start, chunk.copy()))
        return True

    ended = []
    while medium.active():
        medium.advance(send, ended.append)
    got = np.concatenate([c for _, c in sent])
    assert [s for s, _ in sent] == list(np.cumsum([0] + [len(c) for _, c in sent[:-1]]))  # contiguous indices
    assert len(ended) == 1 and len(got) >= signal.length + 1000  # the burst, then >= 1 ms of hang-over noise
    noise = got[: signal.length] - to_medium(x, subband, 1e6, amplitude=1.0, cfo_hz=0.0, start_index=0)
    assert np.mean(np.abs(noise) ** 2) == pytest.approx(1.0, rel=0.05)  # unit complex noise under the burst
    # fresh noise, not a reused pool: no stretch of it repeats
    first = noise[:256]
    corr = np.abs(np.correlate(noise[256:].astype(np.complex128), first.astype(np.complex128), "valid"))
    assert corr.max() < 0.4 * np.sum(np.abs(first) ** 2)
    assert medium.stalls.bs_waits == 1 and medium.stalls.bs_wait_s > 0
    assert medium.stalls.idle_gaps == 0 and medium.started_at is not None
