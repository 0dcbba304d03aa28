"""The sim PHY's frame loss agrees with the real GNU Radio OFDM modem it was calibrated on.

The sim link decides loss from the PER curve of the bench (`PerCurve.for_bench(load_bench(loopback.yaml))`, the
committed `hw_configs/calibration/loopback.yaml`). For every modulation that file covers, the SNRs where the
curve's PER is 0.8, 0.5 and 0.15 are read from the file itself (`PerCurve.min_snr_db`, the exact inverse of
the piecewise-linear table), N frames cross the real LoopbackModem at each, and the measured PER must be within
10 percentage points of the curve and of the sim link's own loss draw (SimUplinkTransmitter over a zmq pair).

Determinism: each (modulation, frame size) gets a fresh modem with a fixed noise seed and fixed frame bytes, so
the noise every packet sees does not depend on which tests run or on timing (two runs gave identical counts).
The budget is tight at one point: the committed curve (200 frames a point, 1 dB steps, linear interpolation) sits
below the modem at the 0.8 points (N = 2000 frames: BPSK +1, QPSK +6, 8PSK +7 points; 0.5 points +1..+5) because
the real waterfall is steeper than the straight line between two 1-dB points. On top of that come the test's
binomial noise (sigma 1.8-2.5 points at N = 400) and the channel's: channel_model draws noise from a pool of 8192
samples that it refills at every SNR change, so each point's noise power is off by up to +-0.05 dB (~1 point of
PER on the 8PSK waterfall). With these seeds the worst point is 8PSK's 0.5 point at +8.8; other seeds put 8PSK's
0.8 or 0.5 point 10-12 points off. A re-calibration with 0.25-0.5 dB steps and 400+ frames a point is the fix.

Short frames: the curve is measured at 1000 bytes and scaled as 1 - (1 - PER) ** (bytes / 1000). At 300 bytes the
sim agrees on the lower waterfall but is optimistic on the upper part (the strict xfail below records by how much).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

pytest.importorskip("gnuradio")

import zmq  # noqa: E402

from config import REPO_ROOT, load_bench  # noqa: E402
from phy.channel import DeviceGeometry, PerCurve, SimChannel, TxSetting  # noqa: E402
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter  # noqa: E402

pytestmark = pytest.mark.gnuradio

BENCH_FILE = REPO_ROOT / "hw_configs" / "loopback.yaml"
TARGET_PERS = (0.8, 0.5, 0.15)
FRAMES_PER_POINT = {1000: 400, 300: 300}  # frames per SNR point, by frame size (runtime: ~30-70 s on 2 cores)
SIM_DRAW_FRAMES = 4000  # the sim link is cheap: its draw's own binomial noise stays below 1 point
TOLERANCE = 0.10


@cache
def _curve() -> PerCurve:
    """The object the sim link of the loopback bench uses."""
    return PerCurve.for_bench(load_bench(BENCH_FILE))


def _modulations() -> list[str]:
    return _curve().modulations


def _waterfall_snrs_db(modulation: str, frame_bytes: int, targets: tuple[float, ...] = TARGET_PERS) -> list[float]:
    """SNRs where the sim's PER for frames of frame_bytes crosses each target (from the file, not hard-coded)."""
    snrs = [_curve().min_snr_db(modulation, frame_bytes, p) for p in targets]
    assert all(math.isfinite(s) for s in snrs), (modulation, frame_bytes, snrs)
    return snrs


@cache
def _modem_per(modulation: str, frame_bytes: int) -> tuple[tuple[float, float], ...]:
    """((snr_db, measured PER), ...) at the waterfall SNRs, from a fresh seeded modem."""
    from phy.gr_loopback import LoopbackModem

    seed = 1 + sorted(_modulations()).index(modulation) + 10 * frame_bytes
    rng = np.random.default_rng(seed)
    out = []
    with LoopbackModem(30.0, noise_seed=seed) as modem:
        for snr_db in _waterfall_snrs_db(modulation, frame_bytes):
            frames = [
                rng.integers(0, 256, frame_bytes, dtype=np.uint8).tobytes()
                for _ in range(FRAMES_PER_POINT[frame_bytes])
            ]
            got = modem.run_packets(frames, modulation, snr_db)
            intact = {p.index for p in got if p.crc_ok and 0 <= p.index < len(frames) and p.data == frames[p.index]}
            out.append((snr_db, 1.0 - len(intact) / len(frames)))
    return tuple(out)


def _sim_link_per(snr_db: float, modulation: str, frame_bytes: int, n_frames: int = SIM_DRAW_FRAMES) -> float:
    """PER drawn by the sim link itself (SimUplinkTransmitter -> SimUplinkReceiver), at exactly snr_db."""
    bench = load_bench(BENCH_FILE)
    channel = SimChannel(bench.channel.model_copy(update={"fading": "none"}), seed=3)
    geometry = DeviceGeometry(device_id=0, distance_m=10.0)
    bandwidth_hz = 250e3
    power_dbm = snr_db + channel.path_loss_db(geometry.distance_m) + channel.noise_dbm(bandwidth_hz)
    setting = TxSetting(tx_power_dbm=power_dbm, bandwidth_hz=bandwidth_hz, modulation=modulation)
    ctx = zmq.Context()
    address = f"inproc://phy-agreement-{modulation}-{frame_bytes}"
    rx = SimUplinkReceiver(bind_address=address, context=ctx)
    tx = SimUplinkTransmitter(
        bs_data_address=address, geometry=geometry, channel=channel, per_curve=_curve(), seed=5, context=ctx
    )
    try:
        report = tx.send([bytes(frame_bytes)] * n_frames, setting, round_idx=0)
        assert tx.last_true_snr_db == pytest.approx(snr_db, abs=1e-9)
        assert report.frames_sent == n_frames and tx.last_frames_undeliverable == 0
        delivered = 0
        for _ in range(100):
            if delivered >= n_frames - tx.last_frames_lost:
                break
            delivered += len(rx.recv(0.5))
        assert delivered == n_frames - tx.last_frames_lost  # the receiver sees exactly what the draw kept
    finally:
        tx.close()
        rx.close()
        ctx.term()
    return 1.0 - delivered / n_frames


def _report(modulation: str, frame_bytes: int) -> list[tuple[float, float, float, float]]:
    """(snr_db, modem PER, sim curve PER, sim link PER) per waterfall point."""
    rows = []
    for snr_db, gr_per in _modem_per(modulation, frame_bytes):
        rows.append(
            (
                snr_db,
                gr_per,
                _curve().per(snr_db, modulation, frame_bytes),
                _sim_link_per(snr_db, modulation, frame_bytes),
            )
        )
    for snr_db, gr_per, sim_per, link_per in rows:
        print(
            f"{modulation} {frame_bytes} B {snr_db:6.2f} dB: gr {gr_per:.3f} sim {sim_per:.3f} link {link_per:.3f} "
            f"(N={FRAMES_PER_POINT[frame_bytes]})"
        )
    return rows


def test_calibration_file_covers_the_sim_modulations():
    assert {"bpsk", "qpsk", "8psk"} <= set(_modulations())
    for mod in _modulations():
        snrs = _waterfall_snrs_db(mod, 1000)
        assert snrs == sorted(snrs)  # higher SNR, lower PER
        assert [_curve().per(s, mod, 1000) for s in snrs] == pytest.approx(list(TARGET_PERS), abs=1e-9)


@pytest.mark.parametrize("modulation", _modulations())
def test_per_of_1000_byte_frames_agrees_with_the_sim(modulation):
    for snr_db, gr_per, sim_per, link_per in _report(modulation, 1000):
        sigma = math.sqrt(max(sim_per * (1 - sim_per), 1e-4) / SIM_DRAW_FRAMES)
        assert abs(link_per - sim_per) <= 4 * sigma, (modulation, snr_db, link_per, sim_per)  # the link uses the curve
        assert abs(gr_per - sim_per) <= TOLERANCE, (modulation, snr_db, gr_per, sim_per)
        assert abs(gr_per - link_per) <= TOLERANCE, (modulation, snr_db, gr_per, link_per)


@pytest.mark.parametrize("modulation", _modulations())
def test_per_of_300_byte_frames_agrees_on_the_lower_waterfall(modulation):
    """Where the scaled curve says 15 % for 300-byte frames, the modem agrees within 10 points."""
    rows = _report(modulation, 300)
    snr_db, gr_per, sim_per, link_per = rows[-1]  # the 0.15 point
    assert sim_per == pytest.approx(0.15, abs=1e-9)
    assert abs(gr_per - sim_per) <= TOLERANCE, (modulation, snr_db, gr_per, sim_per)
    assert abs(gr_per - link_per) <= TOLERANCE, (modulation, snr_db, gr_per, link_per)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "known gap: for 300-byte frames the sim is optimistic on the upper waterfall; at its PER 0.8 / 0.5 points the "
        "modem's PER was higher by 12/21 points (BPSK), 16/12 (QPSK), 16/12 (8PSK), i.e. ~0.4-0.5 dB. "
        "Causes: the 1000-byte "
        "curve goes straight from 1.0 to ~0.85 over 1 dB (1-dB steps, linear interpolation), so the size-scaled curve "
        "has no information there; and short 8PSK/BPSK frames fail more often than independent bit errors predict. "
        "Remove this mark once a finer calibration (or a per-size curve) closes it."
    ),
)
def test_per_of_300_byte_frames_agrees_on_the_upper_waterfall():
    worst = []
    for mod in _modulations():
        for (snr_db, gr_per), target in zip(_modem_per(mod, 300), TARGET_PERS):
            if target >= 0.5:
                worst.append((abs(gr_per - _curve().per(snr_db, mod, 300)), mod, snr_db))
    assert max(worst)[0] <= TOLERANCE, max(worst)
