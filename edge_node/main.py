"""`fedlora-edge`: start one edge device that joins a BS at an address (one per host or many per host)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from proto.launch import enable_stack_dumps, stop_with_parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-edge", description=__doc__)
    parser.add_argument("--bs", required=True, help="BS control address, e.g. tcp://10.0.0.1:5755")
    parser.add_argument("--device-id", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    parser.add_argument("--key", help="this device's key file (fedlora-keys init); needed when the BS seals frames")
    parser.add_argument(
        "--state-dir", help="keep this edge's error feedback here, to survive a crash (edge-<k>.safetensors)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    stop_with_parent()  # started by fedlora-run: stop when it dies (proto.launch); by hand: never
    enable_stack_dumps()  # kill -USR1 <pid>: where each thread is, in the log
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format=f"%(asctime)s edge{args.device_id} %(levelname)s %(message)s"
    )
    from config import ConfigError
    from edge_node.node import EdgeNode, install_signal_handlers
    from trust.keys import KeyFileError, load_key

    try:
        key = None if args.key is None else load_key(args.key, role="device", device_id=args.device_id)
    except KeyFileError as exc:
        print(f"fedlora-edge: key error: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else None
    node = EdgeNode(args.bs, args.device_id, threads=args.threads, key=key, state_dir=state_dir)
    install_signal_handlers(node)
    try:
        return node.run()
    except ConfigError as exc:  # the BS's welcome carried a config this edge cannot use: one line, no traceback
        print(f"fedlora-edge: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
