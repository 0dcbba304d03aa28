"""The terminal view of a run: a status line while a round runs, a table row per device when it closes.

Each round's headline shows the test accuracy (reported only) beside the validation accuracy (what settings are
chosen on)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from bs_node.measurements import RoundRecord


class LiveView:
    def __init__(self, stream: TextIO = sys.stdout, status_every_s: float = 5.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.status_every_s = status_every_s
        self._last_status = 0.0
        self._status_len = 0

    def line(self, text: str) -> None:
        self._clear_status()
        print(text, file=self.stream, flush=True)

    def status(self, round_idx: int, elapsed_s: float, progress: dict[int, str]) -> None:
        """One line of per-device progress; rewritten in place on a terminal, throttled otherwise."""
        now = time.monotonic()
        if not self.tty and now - self._last_status < self.status_every_s:
            return
        self._last_status = now
        text = f"  round {round_idx} {elapsed_s:5.0f}s | " + "  ".join(f"e{d}:{s}" for d, s in sorted(progress.items()))
        if self.tty:
            pad = max(0, self._status_len - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._status_len = len(text)
        else:
            print(text, file=self.stream, flush=True)

    def _clear_status(self) -> None:
        if self.tty and self._status_len:
            self.stream.write("\r" + " " * self._status_len + "\r")
            self._status_len = 0

    def round_table(self, record: RoundRecord) -> None:
        self.line(
            f"round {record.round:3d} | accuracy {percent(record.accuracy)} | validation "
            f"{percent(record.val_accuracy)} | uplink {record.uplink_bytes / 1e3:8.1f} kB | "
            f"energy {record.energy_j:7.1f} J | {record.wall_s:5.1f} s"
        )
        self.line(
            "   dev  status        rank depth  power_dBm   bw_kHz  mod   bytes_kB  frames(lost)  "
            "snr_dB  airtime_s  compute_s  energy_J"
        )
        for d in record.devices:
            snr = f"{d.snr_db:6.1f}" if d.snr_db is not None else "   n/a"
            self.line(
                f"   {d.device_id:3d}  {d.status:<12s} {d.rank:4d} {d.depth:5d}  {d.tx_power_dbm:9.1f} "
                f"{d.bandwidth_hz / 1e3:8.1f}  {d.modulation:<4s} {d.uplink_bytes / 1e3:9.1f}  "
                f"{d.frames_sent:6d}({d.frames_lost:4d})  {snr}  {d.airtime_s:9.2f}  {d.compute_s:9.1f}  "
                f"{d.energy_j:8.1f}"
            )


def percent(value: float | None) -> str:
    """An accuracy as the view shows it: test or validation, "n/a" when there is none (nothing held out)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value * 100:.1f} %"
