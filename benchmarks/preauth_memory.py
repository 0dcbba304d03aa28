"""What strangers and one insider can make the air hold: its resident memory under keyless handshakes and a
40,000-part message (docs/security.md, "The air before authentication").

    .venv/bin/python benchmarks/preauth_memory.py                     # this checkout's air
    .venv/bin/python benchmarks/preauth_memory.py --repo /tmp/air-before --json before.json   # another checkout's

Starts a real `fedlora-air` (sealed: `--keys DIR` of keys from `fedlora-keys init DIR --devices 2`) on free ports,
then, one phase at a time, samples its RSS (psutil, every 20 ms) before, during and after:

* strangers: `--connections` raw TCP sockets (no key) on the request port, then as many on the medium port; each
  sends a ZMTP 3.0 greeting naming CURVE and a command frame header declaring `--declare-mib` MiB (flags 0x06:
  command | long, 8-byte big-endian size), then streams up to `--stream-mib` MiB of its body; each socket notes
  when the air closed it (EOF or reset) and how much of the body it took first;
* an insider: device 0's key over real CURVE (pyzmq), one message of `--parts` parts of `--part-bytes` bytes to
  the request port, and the air's answer.

Prints a table and writes --json. `--repo` runs the air of another checkout (a `git worktree` of an older commit)
with this one's interpreter, for a before/after comparison on the same machine.

`--target bs` does the same to a real `fedlora-bs` (sim bench, tiny model, keys it provisions for its run, no
edge ever joins): strangers on its control and its data port, then device 0's key sending one control message of
`--control-mib` MiB (a single part) and one `--parts`-part message to each port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


class RssSampler:
    """The air's resident memory, sampled on a thread every 20 ms; `peak_mb()` since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 1e6

    def reset(self) -> None:
        self._peak = self.proc.memory_info().rss

    def peak_mb(self) -> float:
        return max(self._peak, self.proc.memory_info().rss) / 1e6

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self._peak = max(self._peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def start_air(repo: Path, keys: Path, work: Path) -> tuple[subprocess.Popen, dict]:
    endpoints = work / "air.json"
    cmd = [sys.executable, "-m", "phy.air", "--address", "tcp://127.0.0.1:0", "--medium", "tcp://127.0.0.1:0"]
    cmd += ["--endpoints-file", str(endpoints), "--keys", str(keys), "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    air = subprocess.Popen(cmd, cwd=repo, env=env, stdout=open(work / "air.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not endpoints.exists():
        if air.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the air did not start: {(work / 'air.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return air, json.loads(endpoints.read_text())


def start_bs(repo: Path, work: Path) -> tuple[subprocess.Popen, dict, Path]:
    """A sealed BS on free ports that waits for edges (none come): its endpoints and the keys it provisioned."""
    run_dir = work / "run"
    cmd = [
        sys.executable,
        "-m",
        "bs_node.main",
        "--run-dir",
        str(run_dir),
        "--bench",
        str(repo / "hw_configs/sim.yaml"),
    ]
    cmd += ["--control", "tcp://127.0.0.1:0", "--data", "tcp://127.0.0.1:0", "--log-level", "WARNING"]
    for setting in ("model.name_or_path=tiny", "task.test_size=200", "task.max_train=2000", "devices.count=2"):
        cmd += ["--set", setting]
    cmd += ["--set", "round.startup_timeout_s=3600"]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    bs = subprocess.Popen(cmd, cwd=repo, env=env, stdout=open(work / "bs.out", "w"), stderr=subprocess.STDOUT)
    endpoints = run_dir / "endpoints.json"
    deadline = time.monotonic() + 300
    while not endpoints.exists():
        if bs.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the BS did not start: {(work / 'bs.out').read_text()[-2000:]}")
        time.sleep(0.1)
    return bs, json.loads(endpoints.read_text()), run_dir / "keys"


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def stranger(address: str, declare_bytes: int, stream_bytes: int, hold_s: float, out: dict) -> None:
    """One keyless connection: greeting, a command frame header declaring declare_bytes, up to stream_bytes of its
    body; out gets how much the air took and when it closed the connection (None: it never did in hold_s)."""
    t0 = time.monotonic()
    out.update(sent_bytes=0, closed_after_s=None)
    sock = socket.create_connection(_host_port(address), timeout=hold_s)
    try:
        sock.sendall(GREETING + b"\x06" + struct.pack(">Q", declare_bytes))
        block = b"\x00" * (256 * 1024)
        while out["sent_bytes"] < stream_bytes:
            sock.sendall(block)
            out["sent_bytes"] += len(block)
        sock.settimeout(max(0.1, hold_s - (time.monotonic() - t0)))
        while time.monotonic() - t0 < hold_s:
            if not sock.recv(65536):  # the air's greeting comes first; b"" is its close
                out["closed_after_s"] = round(time.monotonic() - t0, 2)
                return
    except (ConnectionResetError, BrokenPipeError):
        out["closed_after_s"] = round(time.monotonic() - t0, 2)
    except TimeoutError:
        pass
    finally:
        sock.close()


def strangers_phase(sampler: RssSampler, address: str, args: argparse.Namespace) -> dict:
    before = sampler.rss_mb()
    sampler.reset()
    results: list[dict] = [{} for _ in range(args.connections)]
    threads = [
        threading.Thread(
            target=stranger,
            args=(address, args.declare_mib * MIB, args.stream_mib * MIB, args.hold_s, results[i]),
        )
        for i in range(args.connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    during = sampler.peak_mb()
    time.sleep(1.0)
    closed = [r["closed_after_s"] for r in results if r.get("closed_after_s") is not None]
    return {
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(during, 1),
        "rss_after_mb": round(sampler.rss_mb(), 1),
        "connections": args.connections,
        "closed_by_air": len(closed),
        "closed_after_s_max": max(closed, default=None),
        "body_sent_mib_max": round(max(r.get("sent_bytes", 0) for r in results) / MIB, 2),
    }


def insider_phase(
    sampler: RssSampler, address: str, keys: Path, parts: list[bytes], *, socket_type: str = "DEALER", hold_s: float
) -> dict:
    """Device 0's key over real CURVE sends one message of these parts; what the peer held, and its answer (the air
    answers a refused request; the BS answers nothing: it logs and counts)."""
    import zmq

    sys.path.insert(0, str(REPO))
    from trust.curve import routing_id
    from trust.keys import load_key, load_roster

    before = sampler.rss_mb()
    sampler.reset()
    ctx = zmq.Context()
    sock = ctx.socket(getattr(zmq, socket_type))
    sock.setsockopt(zmq.LINGER, 0)
    if socket_type == "DEALER":
        sock.setsockopt(zmq.IDENTITY, routing_id(0))
    key = load_key(keys / "device-0.secret.json", role="device")
    sock.curve_secretkey, sock.curve_publickey = key.secret.encode(), key.public.encode()
    sock.curve_serverkey = load_roster(keys).bs.encode()
    sock.connect(address)
    t0 = time.monotonic()
    sock.send_multipart(parts)
    answer = None
    if socket_type == "DEALER" and sock.poll(int(hold_s * 1000)):
        reply = json.loads(sock.recv_multipart()[0])
        answer = reply.get("error") or reply.get("reason") or "?"
    else:
        time.sleep(hold_s)
    answered_s = time.monotonic() - t0
    during = sampler.peak_mb()
    sock.close(0)
    ctx.term()
    time.sleep(1.0)
    return {
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(during, 1),
        "rss_after_mb": round(sampler.rss_mb(), 1),
        "parts": len(parts),
        "part_bytes": len(parts[0]),
        "answered_after_s": round(answered_s, 2) if answer is not None else None,
        "answer": answer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose air runs (default: this one)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--declare-mib", type=int, default=256)
    parser.add_argument("--stream-mib", type=int, default=32, help="body bytes each stranger tries to send")
    parser.add_argument("--hold-s", type=float, default=8.0, help="how long a stranger keeps its connection open")
    parser.add_argument("--parts", type=int, default=40_000)
    parser.add_argument("--part-bytes", type=int, default=8_000)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--target", choices=("air", "bs"), default="air")
    parser.add_argument("--control-mib", type=int, default=300, help="--target bs: the insider's one control part")
    args = parser.parse_args(argv)
    results = measure_bs(args) if args.target == "bs" else measure_air(args)
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure_bs(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        bs, endpoints, keys = start_bs(args.repo.resolve(), Path(tmp))
        sampler = RssSampler(bs.pid)
        many = [b"\x00" * args.part_bytes] * args.parts
        try:
            time.sleep(2.0)
            results = {
                "target": "bs",
                "repo": str(args.repo),
                "commit": _commit(args.repo),
                "rss_idle_mb": round(sampler.rss_mb(), 1),
                "strangers_control": strangers_phase(sampler, endpoints["control"], args),
                "strangers_data": strangers_phase(sampler, endpoints["data"], args),
                "insider_control_one_part": insider_phase(
                    sampler, endpoints["control"], keys, [b"{" * (args.control_mib * MIB)], hold_s=args.hold_s
                ),
                "insider_control_parts": insider_phase(sampler, endpoints["control"], keys, many, hold_s=args.hold_s),
                "insider_data_parts": insider_phase(
                    sampler, endpoints["data"], keys, many, socket_type="PUSH", hold_s=args.hold_s
                ),
            }
            results["alive"] = bs.poll() is None
        finally:
            sampler.close()
            bs.kill()
            bs.wait(timeout=20)
    return results


def measure_air(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = work / "keys"
        subprocess.run([sys.executable, "-m", "trust.main", "init", str(keys), "--devices", "2"], cwd=REPO, check=True)
        air, endpoints = start_air(args.repo.resolve(), keys, work)
        sampler = RssSampler(air.pid)
        try:
            time.sleep(2.0)  # start-up settles
            results = {
                "repo": str(args.repo),
                "commit": _commit(args.repo),
                "rss_idle_mb": round(sampler.rss_mb(), 1),
                "strangers_request": strangers_phase(sampler, endpoints["address"], args),
                "strangers_medium": strangers_phase(sampler, endpoints["medium"], args),
                "insider": insider_phase(
                    sampler, endpoints["address"], keys, [b"\x00" * args.part_bytes] * args.parts, hold_s=args.hold_s
                ),
            }
            results["alive"] = air.poll() is None
        finally:
            sampler.close()
            air.terminate()
            air.wait(timeout=20)
    return results


def _commit(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    return out.stdout.strip()


def _print(results: dict) -> None:
    target = results.get("target", "air")
    print(f"{target} of {results['repo']} ({results['commit']}), idle RSS {results['rss_idle_mb']} MB")
    print(f"{'phase':<26} {'before MB':>10} {'peak MB':>10} {'after MB':>10}  outcome")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if name.startswith("insider"):
            outcome = (
                f"{r['parts']} x {r['part_bytes']} B parts; answered after {r['answered_after_s']} s: {r['answer']}"
            )
        else:
            outcome = (
                f"{r['closed_by_air']}/{r['connections']} closed by the {target} "
                f"(last after {r['closed_after_s_max']} s), "
                f"{r['body_sent_mib_max']} MiB of the body left the stranger first (kernel buffers)"
            )
        print(f"{name:<26} {r['rss_before_mb']:>10} {r['rss_peak_mb']:>10} {r['rss_after_mb']:>10}  {outcome}")
    print(f"{target} alive after: {results.get('alive', results.get('air_alive'))}")


if __name__ == "__main__":
    sys.exit(main())
