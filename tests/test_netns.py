"""Several hosts for real: the BS, the air and two edges each in its own network namespace, joined by veth links to
a bridge as hosts to a lab switch, two rounds over gr-zmq-iq with CURVE and sealed frames (tiny model).

Each process is started as a lab would type it on its host (`ip netns exec HOST fedlora-...`), with the addresses
a lab would write: the air binds the bench's air address on its host, the BS is told that address by the bench and
binds its wildcard ports, the edges name the BS's 10.x address in --bs and learn the air's from the BS's welcome.
Nothing here can reach another host over 127.0.0.1. Root only (creating namespaces needs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.main import entry_point
from tests.processes import ENV, REPO, TINY, read_rounds

pytestmark = pytest.mark.integration

SUBNET_BITS = 24
HOSTS = {"bs": "10.77.0.1", "air": "10.77.0.2", "edge0": "10.77.0.11", "edge1": "10.77.0.12"}
CONTROL_PORT, DATA_PORT, AIR_PORT, MEDIUM_PORT = 5755, 5756, 5757, 5758
AIR = [
    "--bench",
    str(REPO / "hw_configs" / "zmq_iq.yaml"),
    "--bench-set",
    f"air.address=tcp://{HOSTS['air']}:{AIR_PORT}",
    "--bench-set",
    f"air.medium=tcp://{HOSTS['air']}:{MEDIUM_PORT}",
]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    """One namespace per host, each with eth0 on a bridge in a switch namespace; all deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` (scripts/install.sh installs it as root)")
    if importlib.util.find_spec("gnuradio") is None:
        pytest.skip("GNU Radio is not importable (the gr-zmq-iq bench needs it on the BS and the edges)")
    tag = f"fl{os.getpid()}"
    switch, made = f"{tag}-sw", []
    added = subprocess.run(["ip", "netns", "add", switch], capture_output=True, text=True)
    if added.returncode != 0 and "Operation not permitted" in added.stderr:  # root in a container without SYS_ADMIN
        pytest.skip(f"needs root with CAP_SYS_ADMIN to create network namespaces ({added.stderr.strip()})")
    assert added.returncode == 0, f"ip netns add {switch}: {added.stderr.strip()}"
    made.append(switch)
    try:
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for host, address in HOSTS.items():
            ns = f"{tag}-{host}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", host, "netns", switch)
            _ip("-n", switch, "link", "set", host, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/{SUBNET_BITS}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {host: f"{tag}-{host}" for host in HOSTS}
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its end of each veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Hosts:
    """The processes started on the lab's hosts, with their output in files; all killed at the end."""

    def __init__(self, lab: dict[str, str], tmp: Path):
        self.lab, self.tmp, self.procs = lab, tmp, dict[str, subprocess.Popen]()

    def start(self, host: str, script: str, *args: str) -> subprocess.Popen:
        with open(self.tmp / f"{host}.out", "w") as out:
            cmd = ["ip", "netns", "exec", self.lab[host], *entry_point(script), *args]
            proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        self.procs[host] = proc
        return proc

    def output(self, host: str) -> str:
        return (self.tmp / f"{host}.out").read_text()

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_bs_air_and_two_edges_on_four_hosts(lab, tmp_path):
    t0 = time.monotonic()
    keys, run_dir = tmp_path / "keys", tmp_path / "run"
    subprocess.run([*entry_point("fedlora-keys"), "init", str(keys), "--devices", "2"], check=True, env=ENV)
    hosts = Hosts(lab, tmp_path)
    try:
        air = hosts.start("air", "fedlora-air", *AIR, "--keys", str(keys))
        bs = hosts.start(
            "bs",
            "fedlora-bs",
            *AIR,
            "--bench-set",
            f"security.keys_dir={keys}",
            "--control",
            f"tcp://0.0.0.0:{CONTROL_PORT}",
            "--data",
            f"tcp://0.0.0.0:{DATA_PORT}",
            "--run-dir",
            str(run_dir),
            "--log-level",
            "INFO",
            *TINY,
            "--set",
            "devices.count=2",
            "--set",
            "round.rounds=2",
            "--set",
            "training.local_steps=2",
            "--bench-set",
            "channel.fading=none",
        )
        edges = [
            hosts.start(
                f"edge{k}",
                "fedlora-edge",
                "--bs",
                f"tcp://{HOSTS['bs']}:{CONTROL_PORT}",
                "--device-id",
                str(k),
                "--key",
                str(keys / f"device-{k}.secret.json"),
                "--state-dir",
                str(tmp_path / f"edge{k}-state"),
            )
            for k in range(2)
        ]
        assert bs.wait(timeout=400) == 0, hosts.output("bs")[-4000:]
        assert [e.wait(timeout=60) for e in edges] == [0, 0], hosts.output("edge0")[-2000:]
        air.send_signal(signal.SIGTERM)
        assert air.wait(timeout=30) == 0, hosts.output("air")[-2000:]
    finally:
        hosts.kill_all()
    wall_s = time.monotonic() - t0
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        for d in r["devices"]:
            assert d["status"] == "ok", d
            assert d["frames_received"] == d["frames_sent"] > 0 and d["airtime_s"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["security"] == "sealed" and summary["rounds"] == 2
    assert "air stopped" in hosts.output("air")
    print(f"four hosts, two rounds over gr-zmq-iq with CURVE: {wall_s:.1f} s wall")
