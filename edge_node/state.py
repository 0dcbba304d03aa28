"""An edge's own checkpoint: its error feedback, so an edge started anew after a crash sends what it owes.

`<state dir>/edge-<k>.safetensors` holds the sparsifier's tensors (the residual, the sent updates awaiting the BS's
verdict and the residual before each of them) and, in the file's metadata, a JSON header: the format, the run id,
the device, the last round it sparsified in and the call count. Data, not code: no pickle is read. It is written
when an update is held, before any of it goes on the air, 0600, atomically (write, fsync, rename; trust.run_files):
after a crash the file says exactly what the device owes. A file of another run or device, or one that cannot be
read (not this format, torn, non-finite values), is ignored with a log line.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from trust.run_files import write_atomic

log = logging.getLogger("edge")
FORMAT = "fedlora-edge-state/2"
_PARTS = ("residual", "pending", "before")  # residual: key -> tensor; pending, before: round -> key -> tensor
MAX_STATE_BYTES = 1 << 31


class StateFileError(ValueError):
    """An edge state file that cannot be used; the message says why."""


def state_path(state_dir: Path, device_id: int) -> Path:
    return Path(state_dir) / f"edge-{device_id}.safetensors"


def save_state(path: Path, *, run_id: str, device_id: int, round_idx: int, sparsifier: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in sparsifier["residual"].items():
        tensors[f"residual/{key}"] = t
    for part in ("pending", "before"):
        for r, state in sparsifier.get(part, {}).items():
            tensors.update({f"{part}/{int(r)}/{key}": t for key, t in state.items()})
    header = {"format": FORMAT, "run_id": run_id, "device_id": device_id, "round": round_idx}
    header["calls"] = int(sparsifier["calls"])
    tensors = {k: t.detach().cpu().float().contiguous().clone() for k, t in tensors.items()}
    write_atomic(path, save_tensors(tensors, metadata={"state": json.dumps(header)}))


def load_state(path: Path, *, run_id: str, device_id: int) -> dict[str, Any] | None:
    """The saved state if it is this run's and this device's; None otherwise (logged when unusable)."""
    if not path.exists():
        return None
    try:
        header, sparsifier = read_state(path)
    except (OSError, StateFileError) as exc:
        log.warning("edge %d: state file %s cannot be used (%s); starting without it", device_id, path, exc)
        return None
    if header.get("run_id") != run_id or header.get("device_id") != device_id:
        log.info("edge %d: %s is of run %s, not %s; ignored", device_id, path, header.get("run_id"), run_id)
        return None
    return {**header, "sparsifier": sparsifier}


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, sparsifier state) of a state file; StateFileError naming what is wrong."""
    data = path.read_bytes()
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"{len(data)} bytes, more than an edge state file holds")
    try:
        header = json.loads(_metadata(data).get("state", "null"), parse_constant=_no_constant)
        tensors = load_tensors(data)
    except (ValueError, RecursionError, struct.error, SafetensorError) as exc:
        raise StateFileError(f"not a safetensors file: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateFileError(f"not a {FORMAT} file")
    if not isinstance(header.get("calls"), int) or not isinstance(header.get("round"), int):
        raise StateFileError("header: calls and round must be integers")
    return header, _sparsifier_state(tensors, header["calls"])


def _sparsifier_state(tensors: dict[str, torch.Tensor], calls: int) -> dict[str, Any]:
    state: dict[str, Any] = {"residual": {}, "pending": {}, "before": {}, "calls": calls}
    for name, t in tensors.items():
        part, _, rest = name.partition("/")
        if part not in _PARTS or not rest:
            raise StateFileError(f"tensor {name!r}: not residual/, pending/ or before/")
        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
            raise StateFileError(f"tensor {name!r}: not finite float32")
        if part == "residual":
            state["residual"][rest] = t
            continue
        round_text, _, key = rest.partition("/")
        if not round_text.isdigit() or not key or len(round_text) > 9:
            raise StateFileError(f"tensor {name!r}: {part}/<round>/<key> expected")
        state[part].setdefault(int(round_text), {})[key] = t
    stray = sorted(set(state["before"]) - set(state["pending"]))
    if stray:
        raise StateFileError(f"before/{stray[0]}: a residual saved for a round with no pending update")
    return state


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (an 8-byte little-endian length, then that much JSON)."""
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a file of {len(data)}")
    header = json.loads(data[8 : 8 + size], parse_constant=_no_constant)
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")
