"""PER vs SNR and the per-packet SNR estimator's error, measured on the GNU Radio OFDM loopback.

    python -m calibration.per_sweep --out hw_configs/calibration/loopback.yaml

writes two files:

* ``loopback.yaml``: ``{ref_frame_bytes, curves: {mod: [[snr_db, per], ...]}}``, exactly the schema
  ``phy.channel.PerCurve.from_file`` loads (PER made non-increasing in SNR with
  np.minimum.accumulate, since PerCurve rejects rising tables). The estimator numbers are
  repeated in its comment header for humans.
* ``loopback.estimator.yaml`` (next to it): ``snr_offset_db`` and ``snr_sigma_db`` per modulation
  plus every raw point. PerCurve.from_file rejects unknown top-level keys, so they cannot live
  in the curve file; ``load_estimator_calibration`` reads them back.

SNR is the time-domain SNR of phy.gr_loopback (signal power over noise power in the sampled
bandwidth). ``snr_offset_db`` is what to add to the receiver's raw estimate so that its mean
equals the configured SNR (OfdmReceiver(snr_offset_db=...)); ``snr_sigma_db`` is the standard
deviation of (configured - raw - offset) over single packets. Both use CRC-ok packets from the
points where at least ``min_ok_fraction`` of the packets got through (below that the decisions,
and so the EVM, are unreliable and the survivors are a biased sample).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proto.numerology import MODULATION_NAMES

DEFAULT_MODULATIONS = MODULATION_NAMES  # the ones a plan may use (PerCurve accepts only these)
DEFAULT_SNRS_DB = tuple(float(s) for s in range(0, 27))


def _progress_printer(stream: Any = sys.stderr) -> Callable[[str], None]:
    def show(line: str) -> None:
        print(line, file=stream, flush=True)

    return show


def sweep(
    modulations: Sequence[str] = DEFAULT_MODULATIONS,
    snrs_db: Iterable[float] = DEFAULT_SNRS_DB,
    frames_per_point: int = 200,
    frame_bytes: int = 1000,
    *,
    seed: int = 0,
    min_ok_fraction: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure PER and SNR-estimate error per (modulation, SNR) on one running loopback flowgraph.

    Returns {"ref_frame_bytes", "curves" (monotone PER tables), "snr_offset_db", "snr_sigma_db",
    "points" (raw measurements per modulation)}.
    """
    from phy.gr_loopback import LoopbackModem  # GNU Radio only needed when actually measuring

    snrs = sorted(float(s) for s in snrs_db)
    if not snrs or frames_per_point < 1 or frame_bytes < 0:
        raise ValueError("need at least one SNR, frames_per_point >= 1 and frame_bytes >= 0")
    show = progress or _progress_printer()
    rng = np.random.default_rng(seed)
    total_points = len(snrs) * len(modulations)
    done = 0
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "ref_frame_bytes": int(frame_bytes),
        "curves": {},
        "snr_offset_db": {},
        "snr_sigma_db": {},
        "points": {},
    }
    with LoopbackModem(snrs[0], snr_offset_db=0.0, noise_seed=seed) as modem:
        for mod in modulations:
            points = []
            errors: list[np.ndarray] = []
            for snr in snrs:
                frames = [rng.integers(0, 256, frame_bytes, dtype=np.uint8).tobytes() for _ in range(frames_per_point)]
                got = modem.run_packets(frames, mod, snr)
                ok = [p for p in got if p.crc_ok and 0 <= p.index < len(frames) and p.data == frames[p.index]]
                n_ok = len({p.index for p in ok})
                per = 1.0 - n_ok / frames_per_point
                est = np.array([p.snr_raw_db for p in ok], dtype=float)
                point = {
                    "snr_db": snr,
                    "sent": frames_per_point,
                    "ok": n_ok,
                    "detected": len(got),
                    "per": per,
                    "est_mean_db": float(est.mean()) if est.size else None,
                    "est_std_db": float(est.std()) if est.size > 1 else None,
                }
                points.append(point)
                if n_ok >= max(2, min_ok_fraction * frames_per_point):
                    errors.append(snr - est)
                done += 1
                est_txt = f"est {point['est_mean_db']:6.2f} dB" if est.size else "est    -    "
                show(
                    f"[{done:3d}/{total_points}] {mod:5s} {snr:5.1f} dB: PER {per:5.3f} "
                    f"({n_ok}/{frames_per_point} ok, {len(got)} detected), {est_txt}, {time.monotonic() - t0:6.1f} s"
                )
            per_seq = np.minimum.accumulate(np.array([p["per"] for p in points]))
            result["curves"][mod] = [[p["snr_db"], round(float(v), 6)] for p, v in zip(points, per_seq)]
            if errors:
                err = np.concatenate(errors)
                offset = float(err.mean())
                result["snr_offset_db"][mod] = round(offset, 3)
                result["snr_sigma_db"][mod] = round(float(np.std(err - offset)), 3)
            else:
                result["snr_offset_db"][mod] = None
                result["snr_sigma_db"][mod] = None
            result["points"][mod] = points
    return result


def write_calibration(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write the PerCurve file and its estimator sibling; returns both paths."""
    import yaml

    from phy.channel import PerCurve

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curve = PerCurve.from_points(
        {m: [tuple(p) for p in pts] for m, pts in result["curves"].items()}, ref_frame_bytes=result["ref_frame_bytes"]
    )  # validates before anything is written
    est_path = estimator_path(out)
    header = [
        "# PER vs time-domain SNR of the GNU Radio OFDM loopback (calibration/per_sweep.py).",
        f"# {result['ref_frame_bytes']}-byte packets; PER smoothed to be non-increasing (np.minimum.accumulate).",
        f"# SNR estimator (add offset to the raw estimate; sigma = per-packet std): see {est_path.name}",
    ]
    for mod in result["curves"]:
        header.append(
            f"#   {mod}: snr_offset_db {result['snr_offset_db'].get(mod)}, "
            f"snr_sigma_db {result['snr_sigma_db'].get(mod)}"
        )
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(curve.to_dict(), sort_keys=False))
    est_doc = {
        "snr_offset_db": result["snr_offset_db"],
        "snr_sigma_db": result["snr_sigma_db"],
        "ref_frame_bytes": result["ref_frame_bytes"],
        "points": result["points"],
    }
    est_path.write_text(
        "# Per-packet SNR estimator calibration of the OFDM receiver (calibration/per_sweep.py)\n"
        + yaml.safe_dump(est_doc, sort_keys=False)
    )
    PerCurve.from_file(out)  # the file must load
    return out, est_path


def estimator_path(curve_path: str | Path) -> Path:
    p = Path(curve_path)
    return p.with_name(p.stem + ".estimator" + (p.suffix or ".yaml"))


def load_estimator_calibration(curve_path: str | Path) -> dict[str, dict[str, float | None]]:
    """{"snr_offset_db": {mod: dB}, "snr_sigma_db": {mod: dB}} from the sibling of a calibration file."""
    import yaml

    doc = yaml.safe_load(estimator_path(curve_path).read_text())
    return {"snr_offset_db": dict(doc["snr_offset_db"]), "snr_sigma_db": dict(doc["snr_sigma_db"])}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="PerCurve YAML to write (estimator numbers go next to it)")
    ap.add_argument("--modulations", default=",".join(DEFAULT_MODULATIONS))
    ap.add_argument("--snr-min", type=float, default=DEFAULT_SNRS_DB[0])
    ap.add_argument("--snr-max", type=float, default=DEFAULT_SNRS_DB[-1])
    ap.add_argument("--snr-step", type=float, default=1.0)
    ap.add_argument("--frames", type=int, default=200, help="frames per (modulation, SNR) point")
    ap.add_argument("--frame-bytes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.snr_step <= 0 or args.snr_max < args.snr_min:
        ap.error("need snr-step > 0 and snr-max >= snr-min")
    n = int(math.floor((args.snr_max - args.snr_min) / args.snr_step + 1e-9)) + 1
    snrs = [round(args.snr_min + i * args.snr_step, 6) for i in range(n)]
    mods = [m.strip() for m in args.modulations.split(",") if m.strip()]
    print(
        f"sweeping {mods} over {snrs[0]:g}..{snrs[-1]:g} dB ({len(snrs)} points), {args.frames} frames of "
        f"{args.frame_bytes} bytes per point",
        file=sys.stderr,
        flush=True,
    )
    result = sweep(mods, snrs, args.frames, args.frame_bytes, seed=args.seed)
    curve_file, est_file = write_calibration(result, args.out)
    for mod in mods:
        print(f"{mod}: snr_offset_db {result['snr_offset_db'][mod]}, snr_sigma_db {result['snr_sigma_db'][mod]}")
    print(f"wrote {curve_file} and {est_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
