"""provenance.json: a run folder says which code, packages, machine and radios made its numbers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bs_node import provenance
from config import load_bench

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_records_its_commit_packages_and_host():
    origin = provenance.collect(load_bench(REPO / "hw_configs" / "sim.yaml"))
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert origin["code"]["commit"] == head.strip() and isinstance(origin["code"]["dirty"], bool)
    assert origin["packages"]["torch"].startswith("2.13.0") and origin["packages"]["numpy"].startswith("1.")
    assert origin["host"]["cpu_count"] >= 1 and origin["python"]["version"].startswith("3.11")
    assert origin["radios"] is None  # a sim bench has none


def test_a_radio_bench_records_its_radios_and_gains():
    bench = load_bench(REPO / "hw_configs" / "usrp_b210.yaml")
    radios = provenance.collect(bench)["radios"]
    assert radios["bs_device_args"] == bench.rf.bs_device_args and "serial=" in radios["bs_device_args"]
    assert radios["edge_device_args"] == list(bench.rf.edge_device_args)
    assert (radios["tx_gain_db"], radios["rx_gain_db"]) == (bench.rf.tx_gain_db, bench.rf.rx_gain_db)


def test_outside_a_git_checkout_the_commit_is_null_not_an_error(tmp_path):
    origin = provenance.collect(load_bench(REPO / "hw_configs" / "sim.yaml"), repo=tmp_path)
    assert origin["code"] == {"commit": None, "dirty": None, "path": str(tmp_path)}
