"""fedlora-radio-check: check a bench's radios before a run (procedure: docs/radio-calibration.md, "Bring-up").

Each step prints PASS, FAIL or SKIP with what it measured and what it expected:

  a. find    every radio the bench names (UHD's device find / SoapySDR's enumerate, with the bench's args)
  b. open    each with the settings the rf link uses (phy.rf_radio.open_radio); sample rate, carrier and gain
             read back against the requested ones, the LO lock sensor, the clock
  c. link    edge radio k -> cable + attenuator -> BS radio: N OFDM frames through phy.rf's own transmitter
             and receiver; frames received, and their median SNR against the SNR the bench predicts:
             tx power - attenuation - (channel.noise_psd_dbm_hz + channel.noise_figure_db + 10 log10(share))
  d. radio   underruns of the edge radio and overruns of the BS radio during c (phy.rf_counters)

--dry-run runs the same steps on stand-in radios (phy.rf_standin: the same flowgraphs, a GNU Radio channel
model for the cable), so everything but the hardware is exercised. Exit status: 0 all PASS/SKIP, 1 a FAIL,
2 a bad command line or bench.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phy.bringup_budget import expected_snr_db, link_share_hz, link_tx_power_dbm, noise_dbm

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
DRY_RUN_ATTENUATION_DB = 80.0  # the stand-in cable when --dry-run is given no --attenuation-db


@dataclass
class Check:
    step: str  # a | b | c | d
    name: str
    status: str  # PASS | FAIL | SKIP
    measured: str
    expected: str
    detail: str = ""

    def line(self) -> str:
        tail = f" - {self.detail}" if self.detail else ""
        return f"{self.status}  {self.step}. {self.name}: {self.measured} (expected {self.expected}){tail}"


@dataclass(frozen=True)
class Limits:
    """Pass/fail thresholds (command-line options)."""

    rate_rel_tolerance: float = 1e-3
    freq_tolerance_hz: float = 50.0  # well inside the OFDM receiver's carrier-offset range
    gain_tolerance_db: float = 1.0  # the radios' gain steps (B210 RX 1 dB, HackRF VGA 2 dB / 2)
    snr_tolerance_db: float = 3.0
    snr_ceiling_db: float = 30.0  # what a per-packet SNR estimate resolves on radios (IQ imbalance, phase noise)
    min_frame_fraction: float = 0.9
    max_rx_dbm: float = -20.0  # refuse to put more on the BS radio's RX port (damage: -5 dBm on a HackRF)


# --------------------------------------------------------------------------------------------- the steps
def radio_specs(bench: Any, edges: list[int], device_count: int, tx_power_dbm: float) -> dict[str, Any]:
    """role -> RadioSpec, exactly as phy.rf opens the radios (the edges at the test's power and share)."""
    from phy.channel import DeviceGeometry, TxSetting
    from phy.rf import RfUplinkTransmitter
    from phy.rf_radio import RadioSpec

    rf = bench.rf
    specs = {
        "BS": RadioSpec(
            rf.driver, "rx", rf.bs_device_args, rf.center_freq_hz, rf.sample_rate_hz, rf.rx_gain_db, rf.rx_antenna
        )
    }
    setting = TxSetting(tx_power_dbm, link_share_hz(bench, device_count), "qpsk")
    for k in edges:
        tx = RfUplinkTransmitter(bench, DeviceGeometry(k, bench.device(k).distance_m), device_count=device_count)
        specs[f"edge {k}"] = tx.spec(setting)
    return specs


def find_step(radios: Any, specs: dict[str, Any]) -> tuple[list[Check], set[str]]:
    checks, found = [], set()
    for role, spec in specs.items():
        want = f"one {spec.driver} device matching {spec.device_args!r}"
        try:
            matches = radios.find(spec.device_args)
        except Exception as exc:  # a missing driver or library is a FAIL, not a traceback
            checks.append(Check("a", f"find {role} radio", FAIL, f"search failed: {exc}", want))
            continue
        if len(matches) == 1:
            checks.append(Check("a", f"find {role} radio", PASS, matches[0], want))
            found.add(role)
        elif not matches:
            hint = "uhd_find_devices" if spec.driver == "uhd" else "SoapySDRUtil --find"
            checks.append(
                Check(
                    "a",
                    f"find {role} radio",
                    FAIL,
                    f"no device found for {spec.device_args!r}",
                    want,
                    f"plugged in, powered, driver installed? compare with `{hint}` and the bench's rf device args",
                )
            )
        else:
            detail = "add serial=... to the bench's device args"
            checks.append(Check("a", f"find {role} radio", FAIL, f"{len(matches)} devices: {matches}", want, detail))
    return checks, found


def open_step(radios: Any, specs: dict[str, Any], found: set[str], limits: Limits) -> tuple[list[Check], dict]:
    from phy.rf_radio import read_back

    checks: list[Check] = []
    blocks: dict[str, Any] = {}
    for role, spec in specs.items():
        if role not in found:
            checks.append(Check("b", f"open {role} radio", SKIP, "not opened", spec.describe(), "not found in a"))
            continue
        try:
            block = radios.open(spec)
            rb = read_back(block, spec)
        except Exception as exc:  # the radio refused: a FAIL naming it, not a traceback
            checks.append(Check("b", f"open {role} radio", FAIL, f"{type(exc).__name__}: {exc}", spec.describe()))
            continue
        blocks[role] = block
        checks.append(Check("b", f"open {role} radio", PASS, f"clock {rb.clock}", spec.describe()))
        lo, hi = rb.gain_range_db
        rate_error = abs(rb.sample_rate_hz - spec.sample_rate_hz) / spec.sample_rate_hz
        within = {
            "sample rate": rate_error <= limits.rate_rel_tolerance,
            "carrier": abs(rb.center_freq_hz - spec.center_freq_hz) <= limits.freq_tolerance_hz,
            "gain": abs(rb.gain_db - spec.gain_db) <= limits.gain_tolerance_db and lo <= spec.gain_db <= hi,
        }
        wrong = [what for what, ok in within.items() if not ok]
        checks.append(
            Check(
                "b",
                f"{role} settings",
                FAIL if wrong else PASS,
                f"{rb.sample_rate_hz / 1e6:.6f} Msps, {rb.center_freq_hz / 1e6:.6f} MHz, {rb.gain_db:.2f} dB "
                f"(range {lo:g}..{hi:g})",
                f"{spec.sample_rate_hz / 1e6:.6f} Msps +- {limits.rate_rel_tolerance:g}, "
                f"{spec.center_freq_hz / 1e6:.6f} MHz +- {limits.freq_tolerance_hz:g} Hz, "
                f"{spec.gain_db:.2f} +- {limits.gain_tolerance_db:g} dB in range",
                f"wrong: {', '.join(wrong)}" if wrong else "",
            )
        )
        if rb.lo_locked is None:
            checks.append(Check("b", f"{role} LO lock", SKIP, "no lo_locked sensor", "locked"))
        else:
            status, value = (PASS, "locked") if rb.lo_locked else (FAIL, "NOT locked")
            checks.append(Check("b", f"{role} LO lock", status, value, "locked"))
    return checks, blocks


def link_step(
    bench: Any,
    rx: Any,
    k: int,
    sink: Any,
    *,
    device_count: int,
    attenuation_db: float,
    tx_power_dbm: float,
    frame_count: int,
    modulation: str,
    limits: Limits,
) -> list[Check]:
    """Steps c and d for edge k: its frames through the cable to the running BS receiver."""
    from phy.channel import DeviceGeometry, TxSetting
    from phy.rf import RfUplinkTransmitter
    from proto.framing import fragment

    share_hz = link_share_hz(bench, device_count)
    expected = expected_snr_db(bench, tx_power_dbm, attenuation_db, share_hz)
    rx_dbm = tx_power_dbm - attenuation_db
    why = (
        f"{tx_power_dbm:.1f} dBm - {attenuation_db:g} dB - noise {noise_dbm(bench, share_hz):.1f} dBm "
        f"in {share_hz / 1e3:g} kHz"
    )
    if rx_dbm > limits.max_rx_dbm:
        too_hot = f"would put {rx_dbm:.1f} dBm on the BS RX port"
        return [Check("c", f"edge {k} -> BS", FAIL, too_hot, f"<= {limits.max_rx_dbm:g} dBm", "add attenuation")]
    tx = RfUplinkTransmitter(
        bench, DeviceGeometry(k, bench.device(k).distance_m), device_count=device_count, sink_factory=lambda s: sink
    )
    payload = np.random.default_rng(k).integers(0, 256, frame_count * bench.radio.frame_payload_bytes, np.uint8)
    frames = [f.to_bytes() for f in fragment(payload.tobytes(), k, 0, bench.radio.frame_payload_bytes)]
    before = rx.take_radio_counts()["overruns"]
    rx.recv(0.0)
    report = tx.send(frames, TxSetting(tx_power_dbm, share_hz, modulation), round_idx=0)
    sent = set(frames)
    got = [f for f in _collect(rx, len(frames), report.airtime_s) if f.data in sent]
    counts = {**rx.take_radio_counts(), "underruns": tx.take_radio_counts()["underruns"]}
    need = math.ceil(limits.min_frame_fraction * len(frames))
    checks = [
        Check(
            "c",
            f"edge {k} -> BS frames",
            PASS if len(got) >= need else FAIL,
            f"{len(got)}/{len(frames)} ({modulation}, {bench.radio.frame_payload_bytes} B)",
            f">= {need}",
        )
    ]
    snrs = [f.snr_db for f in got if f.snr_db is not None]
    name = f"edge {k} -> BS SNR"
    if not snrs:
        checks.append(Check("c", name, FAIL, "no frame, no SNR", f"{expected:.1f} dB ({why})"))
    else:
        median = statistics.median(snrs)
        measured = f"{median:.1f} dB median ({min(snrs):.1f}..{max(snrs):.1f})"
        if expected > limits.snr_ceiling_db:
            floor = limits.snr_ceiling_db - limits.snr_tolerance_db
            detail = f"{expected:.1f} dB ({why}) is above the ~{limits.snr_ceiling_db:g} dB an estimate resolves"
            checks.append(Check("c", name, PASS if median >= floor else FAIL, measured, f">= {floor:g} dB", detail))
        else:
            ok = abs(median - expected) <= limits.snr_tolerance_db
            target = f"{expected:.1f} +- {limits.snr_tolerance_db:g} dB ({why})"
            checks.append(Check("c", name, PASS if ok else FAIL, measured, target))
    if counts["underruns"] is None:
        why_not = "gr-soapy's sink only prints 'sU' to stderr"
        checks.append(Check("d", f"edge {k} radio underruns", SKIP, "not reported", "0", why_not))
    else:
        status = PASS if counts["underruns"] == 0 else FAIL
        checks.append(Check("d", f"edge {k} radio underruns", status, str(counts["underruns"]), "0"))
    earlier = f"{before} more before the test" if before else ""
    status = PASS if counts["overruns"] == 0 else FAIL
    checks.append(Check("d", f"BS radio overruns during edge {k}", status, str(counts["overruns"]), "0", earlier))
    return checks


def _collect(rx: Any, expected_frames: int, airtime_s: float) -> list[Any]:
    """Frames until all came, or none came for 2 s after some did, or the deadline passed."""
    got: list[Any] = []
    deadline = time.monotonic() + 10.0 + 2.0 * airtime_s
    last = time.monotonic()
    while time.monotonic() < deadline and len(got) < expected_frames:
        batch = rx.recv(0.25)
        if batch:
            got += batch
            last = time.monotonic()
        elif got and time.monotonic() - last > 2.0:
            break
    return got


def run_checks(
    bench: Any,
    radios: Any,
    *,
    edges: list[int],
    device_count: int,
    attenuation_db: float | None,
    tx_power_dbm: float | None = None,
    frame_count: int = 20,
    modulation: str = "qpsk",
    target_snr_db: float = 20.0,
    limits: Limits | None = None,
) -> tuple[list[Check], dict[str, Any]]:
    """All steps; returns the checks and the test's settings (for the report)."""
    from phy.rf import RfUplinkReceiver

    limits = limits or Limits()
    share_hz = link_share_hz(bench, device_count)
    if tx_power_dbm is None:
        tx_power_dbm = link_tx_power_dbm(bench, attenuation_db or 0.0, share_hz, target_snr_db)
    settings = {"attenuation_db": attenuation_db, "tx_power_dbm": tx_power_dbm, "share_hz": share_hz}
    if attenuation_db is not None:
        settings["expected_snr_db"] = round(expected_snr_db(bench, tx_power_dbm, attenuation_db, share_hz), 2)
    specs = radio_specs(bench, edges, device_count, tx_power_dbm)
    checks, found = find_step(radios, specs)
    opened, blocks = open_step(radios, specs, found, limits)
    checks += opened
    skip = "" if "BS" in blocks else "the BS radio is not open (b)"
    if attenuation_db is None:
        skip = "no --attenuation-db: connect edge TX -> cable -> attenuator -> BS RX and give the total loss"
    if skip or attenuation_db is None:
        checks += [Check("c", f"edge {k} -> BS", SKIP, "not run", "frames and SNR", skip) for k in edges]
        return checks, settings
    rx = RfUplinkReceiver(bench, device_count=device_count, source=blocks["BS"])
    try:
        for k in edges:
            if f"edge {k}" not in blocks:
                checks.append(Check("c", f"edge {k} -> BS", SKIP, "not run", "frames and SNR", "edge radio not open"))
                continue
            checks += link_step(
                bench,
                rx,
                k,
                blocks[f"edge {k}"],
                device_count=device_count,
                attenuation_db=attenuation_db,
                tx_power_dbm=tx_power_dbm,
                frame_count=frame_count,
                modulation=modulation,
                limits=limits,
            )
    finally:
        rx.close()
    return checks, settings


# --------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None, *, standin: Any | None = None) -> int:
    """standin: a phy.rf_standin.StandInConfig for --dry-run (tests force faults with it)."""
    parser = argparse.ArgumentParser(prog="fedlora-radio-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help="bench YAML with phy: rf")
    parser.add_argument("--bench-set", dest="bench_overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--attenuation-db", type=float, help="cable + attenuator loss between edge TX and BS RX")
    parser.add_argument("--dry-run", action="store_true", help="stand-in radios (phy.rf_standin); open no radio")
    parser.add_argument("--edge", type=int, action="append", help="edge radio to check (repeatable; default all)")
    parser.add_argument("--devices", type=int, help="device count of the run (default: the bench's device list)")
    parser.add_argument("--frames", type=int, default=20, help="frames per edge in the link test")
    parser.add_argument("--modulation", default="qpsk")
    parser.add_argument("--tx-power-dbm", type=float, help="default: the power for --target-snr-db, in range")
    parser.add_argument("--target-snr-db", type=float, default=20.0)
    parser.add_argument("--snr-tolerance-db", type=float, default=Limits.snr_tolerance_db)
    parser.add_argument("--snr-ceiling-db", type=float, default=Limits.snr_ceiling_db)
    parser.add_argument("--max-rx-dbm", type=float, default=Limits.max_rx_dbm)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    from config import ConfigError, load_bench

    try:
        bench = load_bench(args.bench, args.bench_overrides)
    except ConfigError as exc:
        print(f"fedlora-radio-check: configuration error: {exc}", file=sys.stderr)
        return 2
    if bench.phy != "rf":
        print(f"fedlora-radio-check: {args.bench} is a {bench.phy!r} bench, not rf", file=sys.stderr)
        return 2
    device_count = args.devices or len(bench.devices)
    edges = args.edge if args.edge else list(range(min(device_count, len(bench.rf.edge_device_args))))
    from proto.numerology import MODEM_MODULATION_NAMES as MODULATIONS

    if not all(0 <= k < device_count for k in edges) or args.frames < 1 or args.modulation not in MODULATIONS:
        print(
            f"fedlora-radio-check: --edge must be in 0..{device_count - 1}, --frames >= 1, --modulation one of "
            f"{sorted(MODULATIONS)}",
            file=sys.stderr,
        )
        return 2
    attenuation_db = args.attenuation_db
    if args.dry_run:
        from phy.rf_standin import StandInRadios

        attenuation_db = DRY_RUN_ATTENUATION_DB if attenuation_db is None else attenuation_db
        radios: Any = StandInRadios(bench, attenuation_db, standin)
    else:
        from phy.rf_radio import HardwareRadios

        radios = HardwareRadios(bench.rf.driver)
    limits = Limits(
        snr_tolerance_db=args.snr_tolerance_db, snr_ceiling_db=args.snr_ceiling_db, max_rx_dbm=args.max_rx_dbm
    )
    mode = "stand-in radios (--dry-run)" if args.dry_run else f"{bench.rf.driver} radios"
    print(f"bench {bench.name} ({args.bench}): {mode}, edges {edges} of {device_count}, {bench.rf.access}")
    checks, settings = run_checks(
        bench,
        radios,
        edges=edges,
        device_count=device_count,
        attenuation_db=attenuation_db,
        tx_power_dbm=args.tx_power_dbm,
        frame_count=args.frames,
        modulation=args.modulation,
        target_snr_db=args.target_snr_db,
        limits=limits,
    )
    print("  " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items()))
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == FAIL]
    print(", ".join(f"{sum(c.status == s for c in checks)} {s}" for s in (FAIL, PASS, SKIP)))
    if args.out:
        report = {"bench": bench.name, "bench_file": str(args.bench), "dry_run": args.dry_run, "edges": edges}
        report.update(settings)
        report.update({"ok": not failed, "checks": [asdict(c) for c in checks]})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
