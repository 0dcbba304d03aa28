"""PER vs SNR through the real GNU Radio OFDM modem beside the sim curve, and the per-packet SNR estimator's error.

    .venv/bin/python benchmarks/phy_calibration.py [--packets 400] [--snrs auto|7,7.5,8|6:10:0.5]
        [--modulations bpsk,qpsk,8psk] [--frame-bytes 1000,300] [--curve hw_configs/calibration/loopback.yaml]
        [--seed 0] [--out results.json|results.csv] [--quick]

(a) PER: --packets random frames per (modulation, frame size, SNR) cross phy.gr_loopback.LoopbackModem
    (OfdmTransmitter -> channel_model AWGN at the time-domain SNR -> OfdmReceiver); a frame counts as delivered
    when it comes back CRC-ok and byte-identical. Beside it: the PER the sim link would draw from the calibration
    curve (PerCurve.from_file of --curve, the table load_bench puts in the loopback bench for PerCurve.for_bench),
    scaled to the frame size; the difference in percentage points with the modem's 2-sigma binomial interval;
    and `loss_dB`, how many dB more SNR the sim curve needs to lose as many frames as the modem did (positive:
    the sim is optimistic at this point).
(b) SNR estimate: error = the receiver's per-packet estimate - the configured SNR over CRC-ok packets (the ones
    whose SNR a BS records), raw and after the calibrated offset of the curve's estimator file
    (calibration.per_sweep.load_estimator_calibration). Adding a constant offset moves the mean only: the
    per-packet std is one column. The summary pools the points where at least half the packets got through, as
    calibration/per_sweep.py does, and shows the sim's modelled estimator sigma (bench channel.snr_est_sigma_db).

--snrs auto (default): per modulation and frame size, 0.5 dB steps from just below the curve's PER 0.99 point to
just above its PER 0.01 point, plus 20 and 30 dB for the estimator. --quick: 20 packets of 1000 bytes at the
curve's PER 0.8 / 0.5 / 0.15 points and 30 dB (a smoke run; the numbers are noise).
One modem with a fixed noise seed runs the whole grid, so a run is reproducible. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402

from calibration.per_sweep import estimator_path, load_estimator_calibration  # noqa: E402
from phy.channel import PerCurve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CURVE = ROOT / "hw_configs" / "calibration" / "loopback.yaml"
DEFAULT_BENCH = ROOT / "hw_configs" / "loopback.yaml"
ESTIMATOR_SNRS_DB = (20.0, 30.0)
QUICK_TARGET_PERS = (0.8, 0.5, 0.15)
MIN_OK_FRACTION = 0.5  # estimator summary: as calibration/per_sweep.py


@dataclass
class Point:
    modulation: str
    frame_bytes: int
    snr_db: float
    sent: int
    ok: int
    detected: int
    per_gr: float
    per_sim: float
    diff_pts: float  # (per_gr - per_sim) * 100
    two_sigma_pts: float  # 2 binomial sigmas of per_gr, at the sim's PER
    loss_db: float | None  # SNR the curve needs for per_gr, below configured: positive = sim optimistic
    est_n: int  # CRC-ok packets with an estimate
    raw_err_mean_db: float | None
    err_std_db: float | None
    offset_db: float
    cal_err_mean_db: float | None


def parse_snrs(text: str) -> list[float] | None:
    """'auto' -> None; '7,7.5,8' -> list; '6:10:0.5' -> 6, 6.5, ..., 10 (inclusive)."""
    text = text.strip()
    if text == "auto":
        return None
    if ":" in text:
        parts = [float(x) for x in text.split(":")]
        if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
            raise ValueError(f"--snrs range must be start:stop:step with step > 0 and stop >= start, got {text!r}")
        n = int(math.floor((parts[1] - parts[0]) / parts[2] + 1e-9)) + 1
        return [round(parts[0] + i * parts[2], 6) for i in range(n)]
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values:
        raise ValueError("--snrs is empty")
    return sorted(values)


def auto_snrs(curve: PerCurve, modulation: str, frame_bytes: int, quick: bool) -> list[float]:
    """The waterfall of the (size-scaled) curve in 0.5 dB steps, plus high SNRs for the estimator."""
    if quick:
        return [curve.min_snr_db(modulation, frame_bytes, p) for p in QUICK_TARGET_PERS] + [30.0]
    top, bottom = curve.min_snr_db(modulation, frame_bytes, 0.99), curve.min_snr_db(modulation, frame_bytes, 0.01)
    if not (math.isfinite(top) and math.isfinite(bottom)):
        raise ValueError(f"curve for {modulation} has no waterfall between PER 0.99 and 0.01; pass --snrs")
    lo, hi = math.floor(top * 2) / 2 - 0.5, math.ceil(bottom * 2) / 2 + 0.5
    grid = list(np.arange(lo, hi + 1e-9, 0.5))
    return [float(s) for s in grid] + [s for s in ESTIMATOR_SNRS_DB if s > hi]


def measure_point(
    modem: Any,
    rng: np.random.Generator,
    curve: PerCurve,
    modulation: str,
    frame_bytes: int,
    snr_db: float,
    packets: int,
    offset_db: float,
) -> Point:
    frames = [rng.integers(0, 256, frame_bytes, dtype=np.uint8).tobytes() for _ in range(packets)]
    got = modem.run_packets(frames, modulation, snr_db)
    ok = [p for p in got if p.crc_ok and 0 <= p.index < packets and p.data == frames[p.index]]
    n_ok = len({p.index for p in ok})
    per_gr = 1.0 - n_ok / packets
    per_sim = curve.per(snr_db, modulation, frame_bytes)
    sigma = math.sqrt(max(per_sim * (1.0 - per_sim), 0.25 / packets) / packets)
    loss_db = None
    if 0.0 < per_gr < 1.0:
        need = curve.min_snr_db(modulation, frame_bytes, per_gr)
        if math.isfinite(need):
            loss_db = snr_db - need
    err = np.array([p.snr_raw_db for p in ok], dtype=float) - snr_db
    err = err[np.isfinite(err)]
    raw_mean = float(err.mean()) if err.size else None
    return Point(
        modulation,
        frame_bytes,
        float(snr_db),
        packets,
        n_ok,
        len(got),
        per_gr,
        per_sim,
        100.0 * (per_gr - per_sim),
        200.0 * sigma,
        loss_db,
        int(err.size),
        raw_mean,
        float(err.std()) if err.size > 1 else None,
        offset_db,
        None if raw_mean is None else raw_mean + offset_db,
    )


def run(
    curve: PerCurve,
    modulations: Sequence[str],
    frame_sizes: Sequence[int],
    snrs_db: list[float] | None,
    packets: int,
    offsets_db: dict[str, float],
    *,
    seed: int = 0,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Point]:
    from phy.gr_loopback import LoopbackModem  # GNU Radio only when measuring

    show = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    plan = [
        (size, mod, snr)
        for size in frame_sizes
        for mod in modulations
        for snr in (snrs_db if snrs_db is not None else auto_snrs(curve, mod, size, quick))
    ]
    rng = np.random.default_rng(seed)
    points: list[Point] = []
    t0 = time.monotonic()
    with LoopbackModem(30.0, noise_seed=seed) as modem:
        for i, (size, mod, snr) in enumerate(plan, 1):
            pt = measure_point(modem, rng, curve, mod, size, snr, packets, offsets_db.get(mod, 0.0))
            points.append(pt)
            elapsed = time.monotonic() - t0
            eta = elapsed / i * (len(plan) - i)
            show(
                f"[{i:3d}/{len(plan)} {elapsed:6.1f} s, ETA {eta:5.0f} s] {mod:5s} {size:5d} B {snr:6.2f} dB: "
                f"PER gr {pt.per_gr:.3f} sim {pt.per_sim:.3f} ({pt.ok}/{pt.sent} ok, {pt.detected} detected)"
            )
    return points


def _f(value: float | None, fmt: str, width: int) -> str:
    """value formatted as fmt ('+.2f') right-aligned in width, or '-' for None."""
    return f"{format(value, fmt):>{width}s}" if value is not None else f"{'-':>{width}s}"


def per_table(points: Sequence[Point]) -> str:
    hdr = (
        f"{'mod':5s} {'bytes':>5s} {'SNR dB':>6s} {'N':>5s} | {'PER gr':>6s} {'PER sim':>7s} {'diff pts':>8s} "
        f"{'±2σ':>5s} {'loss dB':>7s}"
    )
    lines = [hdr, "-" * len(hdr)]
    for p in points:
        lines.append(
            f"{p.modulation:5s} {p.frame_bytes:5d} {p.snr_db:6.2f} {p.sent:5d} | {p.per_gr:6.3f} "
            f"{p.per_sim:7.3f} {p.diff_pts:+8.1f} {p.two_sigma_pts:5.1f} {_f(p.loss_db, '+.2f', 7)}"
        )
    return "\n".join(lines)


def estimator_table(points: Sequence[Point]) -> str:
    hdr = (
        f"{'mod':5s} {'bytes':>5s} {'SNR dB':>6s} {'n ok':>5s} | {'raw mean':>8s} {'std':>5s} {'offset':>6s} "
        f"{'cal mean':>8s}"
    )
    lines = [hdr, "-" * len(hdr)]
    for p in points:
        if p.est_n == 0:
            continue
        lines.append(
            f"{p.modulation:5s} {p.frame_bytes:5d} {p.snr_db:6.2f} {p.est_n:5d} | "
            f"{_f(p.raw_err_mean_db, '+.2f', 8)} {_f(p.err_std_db, '.2f', 5)} {p.offset_db:+6.3f} "
            f"{_f(p.cal_err_mean_db, '+.2f', 8)}"
        )
    return "\n".join(lines)


def summarize(points: Sequence[Point]) -> dict[str, dict[str, Any]]:
    """Per (modulation, bytes): worst PER difference on the waterfall, pooled estimator error."""
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys((p.modulation, p.frame_bytes) for p in points):
        pts = [p for p in points if (p.modulation, p.frame_bytes) == key]
        fall = [p for p in pts if 0.01 <= p.per_sim <= 0.99 or 0.01 <= p.per_gr <= 0.99]
        worst = max(fall, key=lambda p: abs(p.diff_pts), default=None)
        good = [p for p in pts if p.ok >= max(2, MIN_OK_FRACTION * p.sent) and p.est_n > 1]
        # pooled per-packet error: recombine each point's mean and std (population moments)
        n = sum(p.est_n for p in good)
        mean = sum(p.est_n * p.raw_err_mean_db for p in good) / n if n else None
        var = sum(p.est_n * (p.err_std_db**2 + (p.raw_err_mean_db - mean) ** 2) for p in good) / n if n else None
        out[f"{key[0]}@{key[1]}"] = {
            "modulation": key[0],
            "frame_bytes": key[1],
            "waterfall_points": len(fall),
            "max_abs_diff_pts": abs(worst.diff_pts) if worst else None,
            "worst_snr_db": worst.snr_db if worst else None,
            "mean_diff_pts": float(np.mean([p.diff_pts for p in fall])) if fall else None,
            "estimator_packets": n,
            "raw_err_mean_db": mean,
            "cal_err_mean_db": None if mean is None else mean + pts[0].offset_db,
            "err_std_db": None if var is None else math.sqrt(var),
            "offset_db": pts[0].offset_db,
        }
    return out


def summary_table(summary: dict[str, dict[str, Any]], sim_sigma_db: float | None) -> str:
    hdr = (
        f"{'mod':5s} {'bytes':>5s} | {'max |diff| pts':>14s} {'at dB':>6s} {'mean diff':>9s} | {'n ok':>6s} "
        f"{'raw mean':>8s} {'cal mean':>8s} {'std':>5s}"
    )
    lines = [hdr, "-" * len(hdr)]
    for s in summary.values():
        lines.append(
            f"{s['modulation']:5s} {s['frame_bytes']:5d} | {_f(s['max_abs_diff_pts'], '.1f', 14)} "
            f"{_f(s['worst_snr_db'], '.2f', 6)} {_f(s['mean_diff_pts'], '+.1f', 9)} | "
            f"{s['estimator_packets']:6d} {_f(s['raw_err_mean_db'], '+.2f', 8)} "
            f"{_f(s['cal_err_mean_db'], '+.2f', 8)} {_f(s['err_std_db'], '.2f', 5)}"
        )
    if sim_sigma_db is not None:
        lines.append(
            f"the sim link models the estimator error as N(0, {sim_sigma_db:g} dB) (bench channel.snr_est_sigma_db)"
        )
    return "\n".join(lines)


def write_out(path: Path, settings: dict[str, Any], points: Sequence[Point], summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            names = list(asdict(points[0])) if points else [k for k in Point.__dataclass_fields__]
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for p in points:
                w.writerow(asdict(p))
    else:
        path.write_text(
            json.dumps({"settings": settings, "points": [asdict(p) for p in points], "summary": summary}, indent=2)
            + "\n"
        )


def _sim_sigma_db(bench: Path) -> float | None:
    """The bench's modelled estimator sigma; None where the bench does not load."""
    from config import ConfigError, load_bench

    try:
        return load_bench(bench).channel.snr_est_sigma_db
    except ConfigError:
        return None


def main(argv: Sequence[str] | None = None) -> list[Point]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, help="packets per point (default 400, quick 20)")
    ap.add_argument("--snrs", default="auto", help="auto | comma list | start:stop:step (dB), all modulations")
    ap.add_argument("--modulations", help="comma-separated (default: every modulation of the curve)")
    ap.add_argument("--frame-bytes", help="comma-separated frame sizes (default 1000,300; quick 1000)")
    ap.add_argument("--curve", type=Path, default=DEFAULT_CURVE, help="PerCurve file the sim uses")
    ap.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help="bench file (for the sim's estimator sigma)")
    ap.add_argument("--seed", type=int, default=0, help="noise and frame seed")
    ap.add_argument("--out", type=Path, help="write the points and summary as .json or .csv")
    ap.add_argument("--quick", action="store_true", help="20 packets at 4 SNRs, 1000 B: checks the pipeline only")
    args = ap.parse_args(argv)

    curve = PerCurve.from_file(args.curve)
    mods = [m.strip() for m in args.modulations.split(",") if m.strip()] if args.modulations else curve.modulations
    unknown = [m for m in mods if m not in curve.modulations]
    if unknown:
        ap.error(f"{args.curve} has no curve for {unknown} (has {curve.modulations})")
    sizes_text = args.frame_bytes or ("1000" if args.quick else "1000,300")
    sizes = [int(s) for s in sizes_text.split(",") if s.strip()]
    if not sizes or any(s < 0 for s in sizes):
        ap.error("--frame-bytes needs sizes >= 0")
    packets = args.packets or (20 if args.quick else 400)
    if packets < 1:
        ap.error("--packets must be >= 1")
    try:
        snrs = parse_snrs(args.snrs)
    except ValueError as exc:
        ap.error(str(exc))
    offsets: dict[str, float] = {}
    if estimator_path(args.curve).exists():
        offsets = {
            m: float(v) for m, v in load_estimator_calibration(args.curve)["snr_offset_db"].items() if v is not None
        }
    else:
        print(f"no estimator calibration next to {args.curve}: offsets taken as 0 dB", file=sys.stderr)
    settings = {
        "curve": str(args.curve),
        "modulations": mods,
        "frame_bytes": sizes,
        "packets": packets,
        "snrs": args.snrs,
        "seed": args.seed,
        "quick": args.quick,
        "offsets_db": offsets,
    }
    print(f"settings: {settings}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    points = run(curve, mods, sizes, snrs, packets, offsets, seed=args.seed, quick=args.quick)
    wall_s = time.monotonic() - t0
    summary = summarize(points)
    if args.out:
        write_out(args.out, dict(settings, wall_s=wall_s), points, summary)

    print(
        f"\nOFDM loopback (phy.gr_loopback, AWGN, time-domain SNR) vs the sim curve {args.curve.name}; "
        f"{packets} packets a point, seed {args.seed}; {wall_s:.0f} s on {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        "\n(a) PER: diff pts = (gr - sim) x 100; loss dB = SNR - the SNR at which the sim curve loses as many "
        "(+ = sim optimistic)"
    )
    print(per_table(points))
    print("\n(b) SNR estimate error = estimate - configured SNR (CRC-ok packets); cal = raw + offset")
    print(estimator_table(points))
    print(
        f"\nsummary (waterfall: points with PER in [0.01, 0.99]; estimator: points with >= "
        f"{MIN_OK_FRACTION:.0%} of packets ok, pooled per-packet)"
    )
    print(summary_table(summary, _sim_sigma_db(args.bench)))
    return points


if __name__ == "__main__":
    main()
    raise SystemExit(0)
