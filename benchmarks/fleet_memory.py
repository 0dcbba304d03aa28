"""The BS's memory with many edges, against the bound in docs/security.md, and the gap a resume costs.

    .venv/bin/python benchmarks/fleet_memory.py                  # 4 and 32 edges, tiny model, sim bench
    .venv/bin/python benchmarks/fleet_memory.py --edges 4 16 --rounds 3

For each fleet size K: one `fedlora-run` (sim PHY, the tiny random model, K edges, fixed policy), the BS's resident
memory sampled every 0.2 s (psutil), every round closed or not, and the reassembly bound of docs/security.md,
sum over planned devices of (largest accepted update + 4,016 bytes). Reported side by side with the smallest K as
the baseline: the peak RSS and its ratio, and the growth per edge. The smallest K runs a second time while an
insider (a roster key, so the data port admits it) floods the data port with frames the gate refuses: its peak RSS
beside the quiet run's is what a flood costs. Then, for the smallest K, the BS is SIGKILLed
after round 1 and the run is resumed (`fedlora-run --resume`): the resume gap is the time from the kill to the
resumed run's first closed round, beside the round time before the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launcher.main import entry_point  # noqa: E402

TINY = ["--set", "model.name_or_path=tiny", "--set", "task.test_size=200", "--set", "task.max_train=4000"]


def _run(run_dir: Path, edges: int, rounds: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [*entry_point("fedlora-run"), "--bench", str(REPO / "hw_configs" / "sim.yaml"), "--run-dir", str(run_dir)]
    cmd += [*TINY, "--set", f"devices.count={edges}", "--set", f"round.rounds={rounds}"]
    cmd += ["--set", "training.local_steps=4", "--set", "round.startup_timeout_s=600", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _bs(launcher: subprocess.Popen, timeout_s: float = 120.0) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if any("fedlora-bs" in part for part in p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise RuntimeError("the BS did not start")


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def flood(run_dir: Path, edges: int, stop: threading.Event, sent: list[int]) -> None:
    """An insider (the last device's key, so the data port lets it connect) pushes 4,000-byte frames sealed under
    keys of its own, claiming device 0, as fast as the socket takes them: every one is refused by the gate."""
    import zmq

    from proto.air import FrameSidecar
    from proto.framing import Frame
    from trust.curve import make_client
    from trust.keys import load_key, load_roster
    from trust.sealing import FrameSealer

    while not (run_dir / "endpoints.json").exists() and not stop.is_set():
        time.sleep(0.1)
    data = json.loads((run_dir / "endpoints.json").read_text())["data"]
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 100)
    keys = run_dir / "keys"
    make_client(sock, load_key(keys / f"device-{edges - 1}.secret.json", role="device"), load_roster(keys).bs)
    sock.connect(data)
    sidecar, sealer, seq = FrameSidecar(snr_db=20.0).encode(), FrameSealer(os.urandom(32), 0), 0
    while not stop.is_set():
        for r in (1, 2):
            try:
                sock.send_multipart([sidecar, sealer.seal(Frame(0, r, seq % 65535, 65535, os.urandom(4000)), 1)])
                sent[0] += 1
            except zmq.Again:
                pass
        seq += 1
    sock.close(0)


def fleet(out: Path, edges: int, rounds: int, *, flooded: bool = False) -> dict:
    run_dir = out / (f"fleet-{edges}" + ("-flood" if flooded else ""))
    launcher = _run(run_dir, edges, rounds)
    stop, sent = threading.Event(), [0]
    flooder = threading.Thread(target=flood, args=(run_dir, edges, stop, sent), daemon=True)
    if flooded:
        flooder.start()
    bs = _bs(launcher)
    peak = [0]

    def sample() -> None:
        while launcher.poll() is None:
            try:
                peak[0] = max(peak[0], bs.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    code = launcher.wait()
    stop.set()
    sampler.join(1)
    if flooded:
        flooder.join(5)
    records = _rounds(run_dir)
    closed = len(records)
    update_bytes = max((d["update_bytes"] for r in records for d in r["devices"]), default=0)
    bound = reassembly_bound_bytes(run_dir, records)
    return {
        "edges": edges,
        "exit": code,
        "rounds_closed": closed,
        "wall_s": round(time.monotonic() - t0, 1),
        "bs_peak_rss_mb": round(peak[0] / 2**20, 1),
        "largest_update_bytes": update_bytes,
        "reassembly_bound_mb": round(bound / 2**20, 3),
        "statuses": sorted({d["status"] for r in records for d in r["devices"]}),
        **(
            {"flood_frames_sent": sent[0], "frames_rejected": _summary(run_dir).get("frames_rejected")}
            if flooded
            else {}
        ),
    }


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def reassembly_bound_bytes(run_dir: Path, records: list[dict]) -> int:
    """docs/security.md: sum over the largest round's planned devices of (U_k + one sealed fragment), U_k the
    largest encoding of the planned module the codec accepts."""
    from bs_node.global_model import GlobalModel
    from config import load_experiment
    from proto.framing import MAX_FRAME_PAYLOAD, SEAL_TAG_BYTES

    model = GlobalModel(load_experiment(run_dir / "experiment.yaml"))
    return max(
        (
            sum(model.max_update_bytes(d["rank"], d["depth"]) + MAX_FRAME_PAYLOAD + SEAL_TAG_BYTES for d in planned)
            for planned in ([d for d in r["devices"] if d["participated"]] for r in records)
        ),
        default=0,
    )


def resume_gap(out: Path, edges: int) -> dict:
    run_dir = out / "resume"
    first = _run(run_dir, edges, 4)
    while len(_rounds(run_dir)) < 1:
        time.sleep(0.1)
    round_s = _rounds(run_dir)[0]["wall_s"]
    while not (run_dir / "checkpoint.json").exists():
        time.sleep(0.05)
    _bs(first).send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    first.wait()
    before = len(_rounds(run_dir))
    resumed = subprocess.Popen(
        [*entry_point("fedlora-run"), "--resume", str(run_dir)], cwd=REPO, stdout=subprocess.DEVNULL
    )
    while resumed.poll() is None and len(_rounds(run_dir)) <= before:
        time.sleep(0.05)
    gap_s = time.monotonic() - t_kill
    resumed.wait()
    return {
        "round_s_before": round(round_s, 2),
        "resume_gap_s": round(gap_s, 1),
        "exit": resumed.returncode,
        "rounds": [r["round"] for r in _rounds(run_dir)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/fleet-memory"))
    parser.add_argument("--no-flood", action="store_true", help="skip the smallest fleet's run under a frame flood")
    args = parser.parse_args()
    results = [fleet(args.out, k, args.rounds) for k in sorted(args.edges)]
    base = results[0]
    if not args.no_flood:
        results.append(fleet(args.out, base["edges"], args.rounds, flooded=True))
    for r in results:
        r["rss_ratio_vs_baseline"] = round(r["bs_peak_rss_mb"] / base["bs_peak_rss_mb"], 3)
        extra = r["edges"] - base["edges"]
        r["rss_mb_per_extra_edge"] = round((r["bs_peak_rss_mb"] - base["bs_peak_rss_mb"]) / extra, 2) if extra else 0.0
        r["flooded"] = "flood_frames_sent" in r
        print(json.dumps(r))
    print(json.dumps({"resume": resume_gap(args.out, base["edges"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
