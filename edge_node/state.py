"""An edge's own checkpoint: its error feedback, so an edge started anew after a crash sends what it owes.

`<state dir>/edge-<k>.pt` holds the run id, the device, the last round it sparsified in, and its sparsifier's
state (residual, sent updates awaiting the BS's verdict, call count). It is written when an update is held,
before any of it goes on the air, atomically (write, fsync, rename): after a crash the file says exactly what
the device owes. A file of another run or device is ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("edge")
FORMAT = "fedlora-edge-state/1"


def state_path(state_dir: Path, device_id: int) -> Path:
    return Path(state_dir) / f"edge-{device_id}.pt"


def save_state(path: Path, *, run_id: str, device_id: int, round_idx: int, sparsifier: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    record = {"format": FORMAT, "run_id": run_id, "device_id": device_id, "round": round_idx, "sparsifier": sparsifier}
    with open(tmp, "wb") as fh:
        torch.save(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_state(path: Path, *, run_id: str, device_id: int) -> dict[str, Any] | None:
    """The saved state if it is this run's and this device's; None otherwise (logged when unusable)."""
    if not path.exists():
        return None
    try:
        record = torch.load(path, weights_only=True)  # tensors, dicts, numbers, strings: nothing to execute
    except Exception as exc:
        log.warning("edge %d: state file %s cannot be read (%s); starting without it", device_id, path, exc)
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        log.warning("edge %d: %s is not an edge state file; ignored", device_id, path)
        return None
    if record.get("run_id") != run_id or record.get("device_id") != device_id:
        log.info("edge %d: %s is of run %s, not %s; ignored", device_id, path, record.get("run_id"), run_id)
        return None
    return record
