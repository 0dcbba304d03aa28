"""The goodput cost of sealed frames on our GNU Radio OFDM loopback: the same update, sealed and plain, side by side.

    .venv/bin/python benchmarks/seal_goodput.py [--update-kb 1000] [--fragment-bytes 1000] [--snr-db 30] [--repeat 3]

One update of --update-kb kB of random bytes is cut into fragments of --fragment-bytes (the bench's
`radio.frame_payload_bytes`) and sent through transmitter -> AWGN channel -> receiver (phy.gr_loopback, the chain a
run uses). The plain arm sends unsealed frames (`security: none`, 22 bytes of header and CRC per frame); the sealed
arm seals each with ChaCha20-Poly1305 under a per-device key (38 bytes) and the receiver opens every frame through
the BS's gate (trust.sealing.FrameGate) before it counts. Goodput is update bytes that came back intact per wall
second, from the first frame sealed to the last one opened; CPU-seconds per MB are the process's user+system time
over the same interval, per MB of update. Each arm runs in its own interpreter; runs alternate plain/sealed so
both see the same background load, and the table shows medians and the sealed/plain ratios of this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402

from benchmarks.ofdm_goodput import Result, median_result, process_cpu_s  # noqa: E402

DEVICE = 3
ROUND = 7


def run_arm(sealed: bool, modulation: str, update_kb: int, fragment_bytes: int, snr_db: float) -> Result:
    from phy.gr_loopback import LoopbackModem
    from proto.framing import Frame, fragment
    from trust.sealing import FrameGate, FrameSealer

    payload = np.random.default_rng(1).integers(0, 256, update_kb * 1000, dtype=np.uint8).tobytes()
    frames = fragment(payload, DEVICE, ROUND, fragment_bytes)
    key = os.urandom(32)
    sealer = FrameSealer(key, DEVICE)
    with LoopbackModem(snr_db) as modem:
        modem.run_packets([f.to_bytes() for f in frames[:5]], modulation)  # warm-up (threads, numpy caches)
        gate = FrameGate(sealed=sealed)
        gate.admit(DEVICE, key)
        gate.begin_round(ROUND)
        t0, c0 = time.monotonic(), process_cpu_s()
        wire = [sealer.seal(f, 1) if sealed else f.to_bytes() for f in frames]
        got = modem.run_packets(wire, modulation, quiet_s=0.2)
        delivered = 0
        for packet in got:
            if not packet.crc_ok or not 0 <= packet.index < len(frames):
                continue
            frame = gate.open(Frame.from_bytes(packet.data))
            if frame.payload == frames[packet.index].payload:
                delivered += len(frame.payload)
        wall, cpu = time.monotonic() - t0, process_cpu_s() - c0
    intact = sum(1 for p in got if p.crc_ok)
    return Result(delivered / wall, cpu / max(delivered / 1e6, 1e-9), len(frames) - intact, len(frames), wall)


def _worker(arm: str, mod: str, args: argparse.Namespace) -> Result:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--modulations", mod]
    cmd += ["--update-kb", str(args.update_kb), "--fragment-bytes", str(args.fragment_bytes)]
    cmd += ["--snr-db", str(args.snr_db)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} {mod} worker failed:\n{proc.stderr[-2000:]}")
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--update-kb", type=int, default=1000, help="update size in kB (1 kB = 1000 bytes)")
    ap.add_argument("--fragment-bytes", type=int, default=1000)
    ap.add_argument("--snr-db", type=float, default=30.0)
    ap.add_argument("--modulations", default="bpsk,qpsk,8psk")
    ap.add_argument("--repeat", type=int, default=3, help="runs per arm, alternating; medians shown")
    ap.add_argument("--worker", choices=("plain", "sealed"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.update_kb < 1 or args.fragment_bytes < 1:
        ap.error("need --update-kb >= 1 and --fragment-bytes >= 1")
    mods = [m.strip() for m in args.modulations.split(",") if m.strip()]
    if args.worker:
        result = run_arm(args.worker == "sealed", mods[0], args.update_kb, args.fragment_bytes, args.snr_db)
        print(json.dumps(dataclasses.asdict(result)))
        return 0
    rows = []
    for mod in mods:
        runs: dict[str, list[Result]] = {"plain": [], "sealed": []}
        for _ in range(max(1, args.repeat)):
            for arm in ("plain", "sealed"):
                runs[arm].append(_worker(arm, mod, args))
        plain, sealed = median_result(runs["plain"]), median_result(runs["sealed"])
        rows.append((mod, plain, sealed))
        print(f"{mod}: plain {plain.goodput_bytes_s / 1e3:.1f} kB/s, sealed {sealed.goodput_bytes_s / 1e3:.1f} kB/s",
              file=sys.stderr, flush=True)  # fmt: skip
    print(
        f"\nan update of {args.update_kb} kB in {args.fragment_bytes}-byte fragments per modulation, AWGN "
        f"{args.snr_db:g} dB, median of {max(1, args.repeat)} run(s), {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    hdr = (
        f"{'mod':5s} | {'plain kB/s':>10s} {'sealed kB/s':>11s} {'ratio':>6s} | {'plain CPU-s/MB':>14s} "
        f"{'sealed CPU-s/MB':>15s} {'ratio':>6s} | {'plain lost':>10s} {'sealed lost':>11s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for mod, p, s in rows:
        print(
            f"{mod:5s} | {p.goodput_bytes_s / 1e3:10.1f} {s.goodput_bytes_s / 1e3:11.1f} "
            f"{s.goodput_bytes_s / max(p.goodput_bytes_s, 1e-9):6.3f} | {p.cpu_s_per_mb:14.2f} "
            f"{s.cpu_s_per_mb:15.2f} {s.cpu_s_per_mb / max(p.cpu_s_per_mb, 1e-9):6.3f} | "
            f"{p.lost:5d}/{p.sent:<4d} {s.lost:6d}/{s.sent:<4d}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
