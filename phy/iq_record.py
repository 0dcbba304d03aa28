"""IQ at the BS receiver as a SigMF recording (`<name>.sigmf-data` + `<name>.sigmf-meta`) that other SDR tools open.

The samples are written by a GNU Radio file sink (C++: no Python on the sample path) as complex64 little endian,
SigMF's ``cf32_le``; this class keeps the per-frame annotations (sample span, which frame, what became of it)
and writes the metadata through the `sigmf` package, which validates it against the SigMF schema, when the
recording closes. The metadata is rewritten at every `flush()` (each round close), so a run cut off keeps a
readable recording of what it finished.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sigmf import SigMFFile

MAX_ANNOTATIONS = 1_000_000  # a day at a few hundred frames a minute; beyond it frames are counted, not annotated


class SigmfRecording:
    """Annotations and metadata of one recording; the data file is filled by whoever holds `data_path`."""

    def __init__(self, base: Path, *, sample_rate_hz: float, description: str, center_freq_hz: float = 0.0) -> None:
        self.base = Path(base)
        self.data_path = self.base.with_suffix(".sigmf-data")
        self.meta_path = self.base.with_suffix(".sigmf-meta")
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_rate_hz = float(sample_rate_hz)
        self.description = description
        self.center_freq_hz = float(center_freq_hz)
        self.created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.annotations: list[tuple[int, int, str, str]] = []  # start, length, label, comment
        self.unannotated = 0

    def annotate(self, start_sample: int, length_samples: int, label: str, comment: str) -> None:
        if len(self.annotations) >= MAX_ANNOTATIONS:
            self.unannotated += 1
            return
        self.annotations.append((int(start_sample), int(length_samples), label, comment))

    def flush(self) -> None:
        """(Re)write the metadata for the samples written so far; SigMF's schema checks it."""
        global_info: dict[str, Any] = {
            SigMFFile.DATATYPE_KEY: "cf32_le",
            SigMFFile.SAMPLE_RATE_KEY: self.sample_rate_hz,
            SigMFFile.DESCRIPTION_KEY: self.description
            + (f" ({self.unannotated} frames beyond {MAX_ANNOTATIONS} not annotated)" if self.unannotated else ""),
            SigMFFile.RECORDER_KEY: "fedlora-testbed",
        }
        # the pair is found by name; no data_file here, so a growing or still empty recording is not mapped
        meta = SigMFFile(global_info=global_info)
        meta.add_capture(
            0, metadata={SigMFFile.FREQUENCY_KEY: self.center_freq_hz, SigMFFile.DATETIME_KEY: self.created}
        )
        for start, length, label, comment in self.annotations:
            meta.add_annotation(start, length, metadata={SigMFFile.LABEL_KEY: label, SigMFFile.COMMENT_KEY: comment})
        meta.validate()
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        with tmp.open("w") as fh:
            meta.dump(fh, pretty=True)
        tmp.replace(self.meta_path)
