"""`fedlora-keys`: provision a lab's identities (docs/security.md).

    fedlora-keys init keys/lab --devices 8     # BS key pair, one per device, the public roster
    fedlora-keys show keys/lab                 # the roster: which public key is which device

Copy `device-<k>.secret.json` to edge k's host only, and start it with `fedlora-edge --key FILE`; the BS reads
the directory the bench names (`security.keys_dir`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trust.keys import BS_SECRET_FILE, ROSTER_FILE, KeyFileError, device_secret_file, load_roster, provision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedlora-keys", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="make a BS key pair, one key pair per device and the roster")
    init.add_argument("dir", type=Path)
    init.add_argument("--devices", type=int, required=True, help="device ids 0..N-1")
    init.add_argument("--force", action="store_true", help="replace the keys already in DIR")
    show = sub.add_parser("show", help="print the roster")
    show.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            roster = provision(args.dir, args.devices, force=args.force)
            print(f"{args.dir}/{ROSTER_FILE}: BS and {len(roster.devices)} device keys (public)")
            print(f"{args.dir}/{BS_SECRET_FILE}: the BS's secret key (keep it on the BS host)")
            last = device_secret_file(args.devices - 1)
            print(f"{args.dir}/{device_secret_file(0)} .. {last}: copy each to its edge host only")
        else:
            roster = load_roster(args.dir)
            print(f"bs        {roster.bs}")
            for device_id, key in sorted(roster.devices.items()):
                print(f"device {device_id:<3d}{key}")
    except KeyFileError as exc:
        print(f"fedlora-keys: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
