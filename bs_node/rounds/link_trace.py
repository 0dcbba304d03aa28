"""The BS's per-frame link trace: every uplink transmission of the round and what became of it (proto.link_trace).

The round logic tells it three things: which frames each ARQ burst carried (the edge's BurstEnd lists them), each
frame the PHY passed (with the receiver's SNR and what the gate and the reassembler made of it), and the round's
plans and reports when it closes. At the close it writes one row per transmission: a frame a burst listed and
the BS never got is ``lost``. Memory is bounded by the round's planned frames; frames beyond that (a flood of
rejected or unexpected ones) are counted, and only the first MAX_EXTRA_ROWS of them get rows.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from bs_node.rounds.state import Pending
from proto.control import Plan
from proto.framing import Frame
from proto.link_trace import TRACE_FILE, FrameRow, ReportRow, TraceRow, row_json
from proto.numerology import burst_airtime_s

MAX_EXTRA_ROWS = 1000  # rejected / unexpected frames per round that get a row of their own


class LinkTracer:
    """Collects one round's transmissions and writes them to `<run dir>/link_trace.jsonl` at its close."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / TRACE_FILE
        self._now = time.time
        # of the round in progress (the runner passes only its frames and bursts), by device:
        self._bursts: dict[int, dict[int, tuple[float, list[int], int]]] = {}  # attempt -> time, seqs, total
        self._got: dict[int, dict[tuple[int, int], tuple[float, int, float | None]]] = {}  # (attempt, seq) -> t, B, snr
        self._extra: list[FrameRow] = []
        self.extra_unrecorded: Counter[str] = Counter()  # outcome -> frames beyond MAX_EXTRA_ROWS this round

    def resume(self, next_round: int) -> None:
        """A resumed run goes on at next_round: rows of that round or later (a crash between this file and the
        checkpoint) are dropped, so the round that runs again is traced once. Streams: a day's trace is big."""
        if not self.path.exists():
            return
        tmp = self.path.with_name(TRACE_FILE + ".tmp")
        with self.path.open() as src, tmp.open("w") as dst:
            for line in src:
                if line.strip() and json.loads(line).get("round", 0) < next_round:
                    dst.write(line)
        tmp.replace(self.path)

    # ------------------------------------------------------------------------------------------ events
    def burst_ended(self, device_id: int, round_idx: int, attempt: int, seqs: list[int], total: int) -> None:
        self._bursts.setdefault(device_id, {})[attempt] = (self._now(), list(seqs), total)

    def frame(self, frame: Frame, frame_bytes: int, snr_db: float | None, outcome: str) -> None:
        """A frame the PHY passed: ``ok`` (new to the reassembler), or duplicate / rejected:<reason> / unexpected."""
        if outcome == "ok":
            got = self._got.setdefault(frame.device_id, {})
            got.setdefault((frame.attempt, frame.seq), (self._now(), frame_bytes, snr_db))
            return
        if len(self._extra) >= MAX_EXTRA_ROWS:
            self.extra_unrecorded[outcome] += 1
            return
        self._extra.append(
            FrameRow(
                time_s=self._now(),
                device=frame.device_id,
                round=frame.round_idx,
                attempt=frame.attempt,
                seq=frame.seq,
                total=frame.total,
                frame_bytes=frame_bytes,
                outcome=outcome,
                crc_ok=True,
                snr_db=snr_db,
            )
        )

    # ------------------------------------------------------------------------------------------ close
    def close_round(self, round_idx: int, plans: Mapping[int, Plan], pending: Mapping[int, Pending]) -> int:
        """Write the round's rows (frames in device, attempt, seq order; then the reports); returns how many."""
        rows: list[TraceRow] = []
        devices = sorted(set(self._bursts) | set(self._got))
        for device_id in devices:
            rows += self._device_rows(device_id, round_idx, plans.get(device_id))
        for row in self._extra:
            plan = plans.get(row.device) if row.outcome == "duplicate" else None
            rows.append(row if plan is None else _with_setting(row, plan))
        now = self._now()
        for device_id, p in sorted(pending.items()):
            if p.report is not None:
                m = p.report.measurements
                rows.append(
                    ReportRow(
                        time_s=now,
                        device=device_id,
                        round=round_idx,
                        status=p.report.status,
                        **_report_fields(m.model_dump()),
                    )
                )
        with self.path.open("a") as fh:
            fh.write("".join(row_json(row) + "\n" for row in rows))
        self._bursts.clear()
        self._got.clear()
        self._extra.clear()
        self.extra_unrecorded.clear()
        return len(rows)

    def _device_rows(self, device_id: int, round_idx: int, plan: Plan | None) -> list[FrameRow]:
        got = self._got.get(device_id, {})
        bursts = self._bursts.get(device_id, {})
        total = next((t for _, _, t in bursts.values()), None)
        # every frame of an update but the last has the same size: a lost frame's size comes from a received one
        sizes = {s: n for (_, s), (_, n, _) in got.items()}
        full = next((n for s, n in sizes.items() if total is None or s < total - 1), None)
        keys = set(got) | {(a, s) for a, (_, seqs, _) in bursts.items() for s in seqs}
        rows = []
        for attempt, seq in sorted(keys):
            size: int | None
            if (attempt, seq) in got:
                t, size, snr = got[(attempt, seq)]
                outcome, crc_ok = "ok", True
            else:
                t, snr = bursts[attempt][0], None
                outcome, crc_ok = "lost", False
                size = sizes.get(seq, full if total is not None and seq < total - 1 else None)
            row = FrameRow(
                time_s=t,
                device=device_id,
                round=round_idx,
                attempt=attempt,
                seq=seq,
                total=total,
                frame_bytes=size,
                outcome=outcome,
                crc_ok=crc_ok,
                snr_db=snr,
            )
            rows.append(row if plan is None else _with_setting(row, plan))
        return rows


def _with_setting(row: FrameRow, plan: Plan) -> FrameRow:
    """The row with the setting the plan sent the frame at, and its airtime at that setting."""
    airtime_s = None
    if row.frame_bytes is not None and plan.bandwidth_hz > 0:
        airtime_s = burst_airtime_s([row.frame_bytes], plan.modulation, plan.bandwidth_hz)
    return row.model_copy(
        update={
            "modulation": plan.modulation,
            "tx_power_dbm": plan.tx_power_dbm,
            "bandwidth_hz": plan.bandwidth_hz,
            "airtime_s": airtime_s,
        }
    )


def _report_fields(measured: dict[str, object]) -> dict[str, object]:
    keys = ("compute_s", "train_wall_s", "compute_energy_j", "transmit_energy_j", "energy_j", "energy_source")
    return {k: measured[k] for k in (*keys, "airtime_s") if measured.get(k) is not None}
