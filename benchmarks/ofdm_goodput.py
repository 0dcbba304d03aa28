"""Payload goodput and CPU cost of our OFDM loopback vs the stock digital.ofdm_tx/ofdm_rx, same frames, same box.

    .venv/bin/python benchmarks/ofdm_goodput.py [--frames 1000] [--frame-bytes 1000] [--snr-db 30] [--repeat 3]

Both flowgraphs: transmitter -> channels.channel_model(AWGN at --snr-db, tags blocked) -> receiver, in one
process, with the sender paced (a bounded number of samples in flight, docs/pitfalls.md §7). Goodput counts only
payload bytes of frames that came back CRC-ok and identical, over the wall time from the first packet
posted to the last one received; CPU-seconds are the process's user+system time over the same interval
(all GNU Radio threads plus the Python driver). The stock chain needs 8PSK frames padded so that
(len + 4) % 3 == 0 (docs/pitfalls.md §4); the padding byte is not counted as payload. The stock chain has no burst
padding, so a few extra packets are sent after the measured ones to flush its receiver.

Each measurement runs in its own interpreter; the stock one with GR_CONF_DEFAULT_BUFFER_SIZE=262144,
because its hier blocks give no handle to set per-port buffers and 1000-byte BPSK packets overflow the default
(docs/pitfalls.md §2: "Buffer too small for min_noutput_items", then a hang).

The machine is shared: numbers move by tens of percent between runs; compare the ratios of one run, or use
--repeat N (runs alternate ours/stock; the table shows per-field medians and the worst run's losses).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402


@dataclass
class Result:
    goodput_bytes_s: float
    cpu_s_per_mb: float
    lost: int
    sent: int
    wall_s: float


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _frames(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        out.append(i.to_bytes(4, "big") + body[4:])  # a frame number up front identifies stock results
    return out


def run_ours(frames: Sequence[bytes], modulation: str, snr_db: float) -> Result:
    from phy.gr_loopback import LoopbackModem

    with LoopbackModem(snr_db) as modem:
        modem.run_packets(frames[:5], modulation)  # warm-up (flowgraph threads, numpy caches)
        t0, c0 = time.monotonic(), process_cpu_s()
        got = modem.run_packets(frames, modulation, quiet_s=0.2)
        wall, cpu = time.monotonic() - t0, process_cpu_s() - c0
    ok = {p.index for p in got if p.crc_ok and 0 <= p.index < len(frames) and p.data == frames[p.index]}
    payload = sum(len(frames[i]) for i in ok)
    return Result(payload / wall, cpu / max(payload / 1e6, 1e-9), len(frames) - len(ok), len(frames), wall)


def run_stock(frames: Sequence[bytes], modulation: str, snr_db: float, window_packets: int = 16) -> Result:
    """digital.ofdm_tx/ofdm_rx hier blocks as shipped (defaults: 64/16, 48+4 carriers, BPSK header)."""
    import pmt
    from gnuradio import blocks, channels, digital, gr, pdu

    from phy import ofdm

    bps = ofdm.get_modulation(modulation).bits_per_symbol
    key = "packet_len"
    tb = gr.top_block("stock_ofdm")
    src = pdu.pdu_to_tagged_stream(gr.types.byte_t, key)
    tx = digital.ofdm_tx(bps_header=1, bps_payload=bps, packet_length_tag_key=key, scramble_bits=True)
    # ofdm_tx output is ~sqrt(52) in amplitude (un-normalised IFFT); scale the noise to the same SNR definition.
    chan = channels.channel_model(
        noise_voltage=ofdm.noise_voltage_for_snr(snr_db, signal_power=52.0),
        frequency_offset=0.0,
        epsilon=1.0,
        taps=[1.0],
        noise_seed=0,
        block_tags=True,
    )
    counter = blocks.copy(gr.sizeof_gr_complex)
    rx = digital.ofdm_rx(bps_header=1, bps_payload=bps, packet_length_tag_key=key, scramble_bits=True)
    to_pdu = pdu.tagged_stream_to_pdu(gr.types.byte_t, key)

    lock = threading.Condition()
    received: list[bytes] = []

    class Sink(gr.basic_block):
        def __init__(self) -> None:
            gr.basic_block.__init__(self, "stock_sink", None, None)
            self.message_port_register_in(pmt.intern("in"))
            self.set_msg_handler(pmt.intern("in"), self.handle)

        def handle(self, msg: pmt.pmt_t) -> None:
            vec = pmt.cdr(msg)
            raw = pmt.serialize_str(vec)
            data = raw[8:] if raw[6:8] == b"\x01\x00" else bytes(pmt.u8vector_elements(vec))
            with lock:
                received.append(data)
                lock.notify_all()

    sink = Sink()
    tb.connect(src, tx, chan, counter, rx, to_pdu)
    tb.msg_connect(to_pdu, "pdus", sink, "in")
    tb.start()
    padded = [ofdm.pad_for_stock_8psk(f) if bps == 3 else f for f in frames]
    samples_per = [(-(-(len(f) + 4) * 8 // (48 * bps)) + 3) * 80 for f in padded]
    flush = [bytes(len(padded[0]))] * 4

    def post(data: bytes) -> None:
        src.to_basic_block()._post(
            pmt.intern("pdus"), pmt.cons(pmt.make_dict(), pmt.init_u8vector(len(data), list(data)))
        )

    try:
        for f in padded[:5]:  # warm-up
            post(f)
        time.sleep(0.5)
        with lock:
            received.clear()
        base = counter.nitems_read(0)
        t0, c0 = time.monotonic(), process_cpu_s()
        sent = 0
        posted = 0
        window = window_packets * max(samples_per)
        for f, n in zip(padded, samples_per):
            while posted - (counter.nitems_read(0) - base) > window:
                time.sleep(0.0005)
            post(f)
            posted += n
            sent += 1
        for f in flush:
            post(f)
        deadline = time.monotonic() + 30.0
        last, last_t = -1, time.monotonic()
        while time.monotonic() < deadline:
            with lock:
                lock.wait(0.02)
                n_rx = len(received)
            if n_rx != last:
                last, last_t = n_rx, time.monotonic()
            elif time.monotonic() - last_t > 0.3:
                break
        t_end, c_end = last_t, process_cpu_s()
    finally:
        tb.stop()
        tb.wait()
    want = {f[:4]: f for f in frames}
    ok = set()
    for data in received:
        if bps == 3:
            data = data[: len(frames[0])]
        f = want.get(data[:4])
        if f is not None and data == f:
            ok.add(f[:4])
    payload = sum(len(want[k]) for k in ok)
    wall, cpu = t_end - t0, c_end - c0
    return Result(payload / wall, cpu / max(payload / 1e6, 1e-9), len(frames) - len(ok), len(frames), wall)


def median_result(results: Sequence[Result]) -> Result:
    """Per-field median over repeated runs (the box is shared; single runs swing by tens of percent)."""
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return Result(
        med([r.goodput_bytes_s for r in results]),
        med([r.cpu_s_per_mb for r in results]),
        int(max(r.lost for r in results)),
        results[0].sent,
        med([r.wall_s for r in results]),
    )


STOCK_ENV = {"GR_CONF_DEFAULT_BUFFER_SIZE": "262144"}  # bytes; 1000-byte BPSK packets overflow the 32 KiB default


def _worker(impl: str, mod: str, n_frames: int, frame_bytes: int, snr_db: float) -> Result:
    """One measurement in a fresh interpreter: no leftover flowgraph threads, own buffer defaults."""
    import json
    import subprocess

    env = dict(os.environ, **(STOCK_ENV if impl == "stock" else {}))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        impl,
        "--modulations",
        mod,
        "--frames",
        str(n_frames),
        "--frame-bytes",
        str(frame_bytes),
        "--snr-db",
        str(snr_db),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {mod} worker failed:\n{proc.stderr[-2000:]}")
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--frame-bytes", type=int, default=1000, help=">= 4 (frames carry their number)")
    ap.add_argument("--snr-db", type=float, default=30.0)
    ap.add_argument("--modulations", default="bpsk,qpsk,8psk")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell, alternating ours/stock; medians shown")
    ap.add_argument("--worker", choices=("ours", "stock"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.frame_bytes < 4 or args.frames < 1:
        ap.error("need --frame-bytes >= 4 and --frames >= 1")
    mods = [m.strip() for m in args.modulations.split(",") if m.strip()]
    if args.worker:
        import dataclasses
        import json

        frames = _frames(args.frames, args.frame_bytes, seed=1)
        run = run_ours if args.worker == "ours" else run_stock
        print(json.dumps(dataclasses.asdict(run(frames, mods[0], args.snr_db))))
        return 0
    rows = []
    for mod in mods:
        runs: dict[str, list[Result]] = {"ours": [], "stock": []}
        for _ in range(max(1, args.repeat)):  # alternate, so both see the same background load on average
            for impl in ("ours", "stock"):
                runs[impl].append(_worker(impl, mod, args.frames, args.frame_bytes, args.snr_db))
        ours, stock = median_result(runs["ours"]), median_result(runs["stock"])
        rows.append((mod, ours, stock))
        print(
            f"{mod}: ours {ours.goodput_bytes_s / 1e3:.0f} kB/s, stock {stock.goodput_bytes_s / 1e3:.0f} kB/s",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\n{args.frames} frames x {args.frame_bytes} B per modulation, AWGN {args.snr_db:g} dB, "
        f"median of {max(1, args.repeat)} run(s), {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"
    )
    hdr = (
        f"{'mod':5s} | {'ours kB/s':>9s} {'stock kB/s':>10s} {'ratio':>6s} | {'ours CPU-s/MB':>13s} "
        f"{'stock CPU-s/MB':>14s} {'ratio':>6s} | {'ours lost':>9s} {'stock lost':>10s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for mod, o, s in rows:
        print(
            f"{mod:5s} | {o.goodput_bytes_s / 1e3:9.0f} {s.goodput_bytes_s / 1e3:10.0f} "
            f"{o.goodput_bytes_s / max(s.goodput_bytes_s, 1e-9):6.2f} | {o.cpu_s_per_mb:13.2f} "
            f"{s.cpu_s_per_mb:14.2f} {o.cpu_s_per_mb / max(s.cpu_s_per_mb, 1e-9):6.2f} | "
            f"{o.lost:4d}/{o.sent:<4d} {s.lost:5d}/{s.sent:<4d}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
