"""The per-frame link trace (`<run dir>/link_trace.jsonl`): what every uplink frame of a run did on the link.

One JSON object per line, of two kinds:

* ``frame``: one transmission of one frame (device, round, ARQ attempt, seq) with the setting it went out at
  (modulation, tx_power_dbm, bandwidth_hz), its size and airtime, and what became of it at the BS: ``ok`` (passed
  the PHY's CRC and the BS's gate: ``snr_db`` is the receiver's per-frame estimate), ``lost`` (the edge's burst
  listed it, the BS never got it: the PHY lost it or its CRC failed), ``duplicate`` (a copy the BS already held),
  ``rejected:<reason>`` (the gate refused it: forged, replayed, stale round, no key) or ``unexpected`` (a frame of
  no round in progress).
* ``report``: what a device reported of its own round (status, compute time and energy), the other half of what
  a controller sees.

Written by the BS (bs_node.rounds.link_trace) as each round closes; read back by the replay PHY (phy.replay) and by
anyone else: the format is declared here once and every line is validated against it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proto.numerology import Modulation

OUTCOMES = ("ok", "lost", "duplicate", "unexpected")  # and "rejected:<reason>"
TRACE_FILE = "link_trace.jsonl"
MAX_TRACE_LINE_BYTES = 4096  # a line is a few hundred bytes; anything longer is not a trace line


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FrameRow(_Row):
    """One transmission of one uplink frame."""

    kind: Literal["frame"] = "frame"
    time_s: float  # wall clock (Unix seconds) at the BS: when it got the frame, or when the burst that lost it ended
    device: Annotated[int, Field(ge=0)]
    round: Annotated[int, Field(ge=0)]
    attempt: Annotated[int, Field(ge=0)]  # the ARQ attempt that sent it (0: not sent through ARQ)
    seq: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=1)] | None = None  # frames of the device's update this round, when known
    modulation: Modulation | None = None  # None: not planned this round (an unexpected frame)
    tx_power_dbm: float | None = None
    bandwidth_hz: Annotated[float, Field(gt=0)] | None = None
    frame_bytes: Annotated[int, Field(ge=0)] | None = None  # on the air; None for a lost frame of unknown size
    airtime_s: Annotated[float, Field(ge=0)] | None = None
    outcome: str = Field(pattern=r"^(ok|lost|duplicate|unexpected|rejected:[a-z_]+)$")
    crc_ok: bool  # passed the PHY's CRC (a lost frame did not, or never reached it)
    snr_db: float | None = None  # the BS receiver's per-frame estimate (None: lost, or the PHY measures none)


class ReportRow(_Row):
    """A device's report of one round: what it says it spent."""

    kind: Literal["report"] = "report"
    time_s: float
    device: Annotated[int, Field(ge=0)]
    round: Annotated[int, Field(ge=0)]
    status: str
    compute_s: float | None = None
    train_wall_s: float | None = None
    compute_energy_j: float | None = None
    transmit_energy_j: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None
    airtime_s: float | None = None


TraceRow = FrameRow | ReportRow


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file and line."""


def row_json(row: TraceRow) -> str:
    return row.model_dump_json(exclude_none=True)


def read_trace(path: str | Path) -> Iterator[TraceRow]:
    """Every row of a trace file, validated; a bad line is a TraceError naming file:line and what is wrong."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise TraceError(f"link trace {path}: cannot open: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"link trace {path}:{lineno}"
            if len(raw) > MAX_TRACE_LINE_BYTES:
                raise TraceError(f"{where}: line of {len(raw)} bytes (a trace line is < {MAX_TRACE_LINE_BYTES})")
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise TraceError(f"{where}: not JSON: {exc}") from None
            kind = data.get("kind") if isinstance(data, dict) else None
            if kind not in ("frame", "report"):
                raise TraceError(f"{where}: kind {kind!r} (expected 'frame' or 'report')")
            try:
                yield FrameRow.model_validate(data) if kind == "frame" else ReportRow.model_validate(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise TraceError(f"{where}: {field}: {first['msg']}") from None
