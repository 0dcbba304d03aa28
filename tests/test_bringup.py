"""fedlora-radio-check (phy/bringup.py): the expected-SNR arithmetic, the steps on stand-in radios (phy/rf_standin.py)
with faults forced into them, and the clear failure when no radio is attached (this machine has none)."""

from __future__ import annotations

import json
import math

import pytest

from phy.bringup import (
    FAIL,
    PASS,
    SKIP,
    Limits,
    expected_snr_db,
    link_share_hz,
    link_tx_power_dbm,
    main,
    noise_dbm,
    run_checks,
)
from tests.processes import REPO

B210 = REPO / "hw_configs" / "usrp_b210.yaml"
HACKRF = REPO / "hw_configs" / "hackrf_one.yaml"


def load_bench(*args, **kwargs):
    from config import load_bench

    return load_bench(*args, **kwargs)


def by_name(checks) -> dict[str, object]:
    return {c["name"] if isinstance(c, dict) else c.name: c for c in checks}


def test_expected_snr_is_power_minus_attenuation_minus_the_benchs_noise():
    bench = load_bench(B210)  # noise -174 dBm/Hz + NF 8 dB; 4 devices share 1 MHz (fdma)
    share_hz = link_share_hz(bench, 4)
    assert share_hz == 250e3
    assert noise_dbm(bench, share_hz) == pytest.approx(-174 + 8 + 10 * math.log10(250e3))
    assert expected_snr_db(bench, -10.0, 80.0, share_hz) == pytest.approx(-10 - 80 + 174 - 8 - 53.979, abs=1e-3)
    # the test power aims at the target SNR, inside the bench's range (-10 .. +10 dBm)
    assert link_tx_power_dbm(bench, 100.0, share_hz, 20.0) == pytest.approx(20 + 100 - 112.021, abs=1e-3)
    assert link_tx_power_dbm(bench, 30.0, share_hz, 20.0) == -10.0
    assert link_tx_power_dbm(bench, 200.0, share_hz, 20.0) == 10.0
    assert link_share_hz(load_bench(HACKRF), 4) == 1e6  # tdma: every device uses the whole band


@pytest.mark.gnuradio
def test_dry_run_passes_every_step_and_writes_the_report(tmp_path, capsys):
    pytest.importorskip("gnuradio")
    out = tmp_path / "check.json"
    argv = ["--bench", str(B210), "--dry-run", "--attenuation-db", "80", "--edge", "1", "--frames", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PASS  a. find BS radio" in printed and "PASS  c. edge 1 -> BS SNR" in printed
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["edges"] == [1] and report["dry_run"] is True
    assert report["expected_snr_db"] == pytest.approx(22.02, abs=0.01)  # -10 dBm - 80 dB - (-112.02 dBm)
    checks = by_name(report["checks"])
    assert {c["step"] for c in report["checks"]} == {"a", "b", "c", "d"}
    assert all(c["status"] == PASS for c in report["checks"])
    assert checks["edge 1 -> BS frames"]["measured"].startswith("4/4")
    median_db = float(checks["edge 1 -> BS SNR"]["measured"].split()[0])
    assert abs(median_db - 22.02) < 1.0  # the stand-in is the bench's model: the modem lands on it


@pytest.mark.gnuradio
def test_forced_radio_faults_fail_their_steps(capsys):
    pytest.importorskip("gnuradio")
    from phy.rf_standin import StandInConfig

    faults = StandInConfig(noise_figure_error_db=8.0, overflows=2, underflows_per_burst=3)
    argv = ["--bench", str(B210), "--dry-run", "--attenuation-db", "80", "--edge", "0", "--frames", "4"]
    assert main(argv, standin=faults) == 1
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines() if line[:4] in (PASS, FAIL)}
    assert "FAIL  c. edge 0 -> BS SNR" in lines  # ~14 dB measured, 22.0 +- 3 expected
    assert "FAIL  d. edge 0 radio underruns" in lines and ": 3 (expected 0)" in lines["FAIL  d. edge 0 radio underruns"]
    assert ": 2 (expected 0)" in lines["FAIL  d. BS radio overruns during edge 0"]
    assert "PASS  b. BS settings" in lines  # the rest of the bench is fine


@pytest.mark.gnuradio
def test_missing_radio_and_unsettable_gain_fail_find_and_open():
    pytest.importorskip("gnuradio")
    from phy.rf_standin import StandInConfig, StandInRadios

    bench = load_bench(B210, ["rf.rx_gain_db=80"])  # a B210 receives with 0..76 dB
    radios = StandInRadios(bench, 80.0, StandInConfig(missing=frozenset({"type=b200,serial=ED0001"})))
    checks, _ = run_checks(bench, radios, edges=[0, 1], device_count=4, attenuation_db=None)
    got = by_name(checks)
    assert got["find edge 1 radio"].status == FAIL and "'type=b200,serial=ED0001'" in got["find edge 1 radio"].measured
    assert got["open edge 1 radio"].status == SKIP
    assert got["BS settings"].status == FAIL and got["BS settings"].detail == "wrong: gain"
    assert got["edge 0 settings"].status == PASS
    assert [c.status for c in checks if c.step == "c"] == [SKIP, SKIP]  # no attenuation given: nothing transmitted


@pytest.mark.gnuradio
def test_a_too_hot_link_is_refused_before_anything_is_sent():
    pytest.importorskip("gnuradio")
    from phy.rf_standin import StandInRadios

    bench = load_bench(B210)
    radios = StandInRadios(bench, 5.0)
    checks, _ = run_checks(bench, radios, edges=[0], device_count=4, attenuation_db=5.0, limits=Limits())
    refused = by_name(checks)["edge 0 -> BS"]
    assert refused.status == FAIL and "-15.0 dBm on the BS RX port" in refused.measured


@pytest.mark.gnuradio
@pytest.mark.parametrize("bench", [B210, HACKRF], ids=["uhd", "soapy"])
def test_without_radios_step_a_fails_naming_the_args(bench, capsys):
    pytest.importorskip("gnuradio")
    assert main(["--bench", str(bench), "--edge", "0"]) == 1
    out = capsys.readouterr().out
    args = load_bench(bench).rf.bs_device_args
    assert "FAIL  a. find BS radio: " in out and repr(args) in out
    assert "SKIP  c. edge 0 -> BS" in out  # nothing opened, nothing sent


def test_a_bench_that_is_not_rf_is_a_usage_error(capsys):
    assert main(["--bench", str(REPO / "hw_configs" / "sim.yaml")]) == 2
    assert "not rf" in capsys.readouterr().err
