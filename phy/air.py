"""The air of the gr-zmq-iq PHY: one process between the edges and the BS that does what the channel would.

    edge k --[burst: IQ at its subband rate]--> air: gain (path loss + fading + tx power), carrier offset,
    resample to the medium rate, shift into the device's FDMA subband, sum with the other edges' bursts, add
    thermal noise over the whole band --[medium: IQ at total_bandwidth_hz]--> BS (channelizer + OFDM receivers)

Started as ``fedlora-air --bench hw_configs/zmq_iq.yaml`` (the launcher does, for benches with
``phy: gr-zmq-iq``; ``python -m phy.air`` is the same). The bench only gives the air its addresses: the physics
(band, channel model, distances, seed, carrier offsets, clock) comes with every subband plan from the BS, which
holds the validated bench and experiment, so the two can never disagree. The parts:

* ``phy.air_server``: the sockets (bench ``air.address``: requests and replies; ``air.medium``: the medium to the
  BS), typed in ``proto.air``; a bad peer is answered with an error and never stops the air.
* ``phy.air_medium``: each burst turned into medium samples as the clock reaches it, and the clock that sums them
  with noise.

Why numpy here and not a GNU Radio flowgraph: everything the air does to a burst is known when it arrives, so it
is done once per burst, and while no edge transmits the medium stops altogether: nothing is streamed while the
edges train. A flowgraph would need zero-filled continuous streams into ``add_cc`` (docs/pitfalls.md §9) running
at the full medium rate all the time.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from config import ConfigError, load_bench
from phy.air_server import Air
from proto.air import AirEndpoints
from proto.launch import enable_stack_dumps, stop_with_parent
from trust.keys import KeyFileError, load_run_keys

log = logging.getLogger("air")

DEFAULT_BENCH = Path(__file__).resolve().parents[1] / "hw_configs" / "zmq_iq.yaml"


def write_endpoints(path: str, air: Air) -> None:
    """The bound addresses, atomically: the starter polls for the file and reads it whole."""
    tmp = Path(path + ".tmp")
    tmp.write_bytes(AirEndpoints(address=air.address, medium=air.medium_address).encode())
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-air", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--bench",
        default=str(DEFAULT_BENCH),
        help="bench YAML: only its air.address / air.medium are used (default: hw_configs/zmq_iq.yaml)",
    )
    parser.add_argument("--bench-set", dest="bench_overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", help="bind address for edges and the BS (default: the bench's air.address)")
    parser.add_argument("--medium", help="bind address of the medium to the BS (default: the bench's air.medium)")
    parser.add_argument("--endpoints-file", help="write the bound addresses here as JSON (proto.air.AirEndpoints)")
    parser.add_argument(
        "--stats-file", help="on exit, write what the air did here as JSON (Air.report: clock stalls, CPU seconds)"
    )
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--keys", help="the run's key directory (needed when the bench seals: docs/security.md)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    stop_with_parent()  # started by fedlora-run: stop when it dies (proto.launch); by hand: never
    enable_stack_dumps()  # kill -USR1 <pid>: where each thread is, in the log
    try:
        bench = load_bench(args.bench, args.bench_overrides)
    except ConfigError as exc:
        print(f"fedlora-air: configuration error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s air %(levelname)s %(message)s")
    keys = None
    if bench.security.mode == "sealed":
        if not args.keys:
            print("fedlora-air: the bench seals (security.mode: sealed): pass --keys DIR, the BS's", file=sys.stderr)
            return 2
        try:
            keys = load_run_keys(Path(args.keys))
        except KeyFileError as exc:
            print(f"fedlora-air: key error: {exc}", file=sys.stderr)
            return 2
    air = Air(
        address=args.address or bench.air.address,
        medium_address=args.medium or bench.air.medium,
        noise_seed=args.noise_seed,
        keys=keys,
    )
    if args.endpoints_file:
        write_endpoints(args.endpoints_file, air)
    log.info(
        "air: edges and BS at %s, medium to the BS at %s; waiting for the BS's plan", air.address, air.medium_address
    )
    signal.signal(signal.SIGINT, air.stop)
    signal.signal(signal.SIGTERM, air.stop)
    try:
        air.run()
    finally:
        if args.stats_file:
            tmp = Path(args.stats_file + ".tmp")
            tmp.write_text(json.dumps(air.report()))
            tmp.replace(args.stats_file)
        air.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
