"""The BS's checkpoint: everything a run needs to go on after a crash, written atomically at every round close.

`<run dir>/checkpoint.pt` (torch.save of one dict, docs/security.md "Checkpoint and resume"):

    format        "fedlora-checkpoint/1"
    run_id        the run's id: a resumed BS keeps it, so edges that survived keep their data, model and residuals
    next_round    the round the run goes on with (every round before it is closed and recorded)
    config        the resolved experiment and bench, as mappings, without what does not change the computation
                  (addresses, the key directory): a resume under another configuration is refused, naming keys
    adapter       the global adapter
    controller    the policy's state (virtual energy queues, channel and compute estimates, its generator)
    closer        per-device counters and cached updates (stale reuse), the aggregated-rounds verdicts
    rng           torch, numpy and Python generator states
    initial       the accuracy before fine-tuning (test, validation)
    endpoints     the control and data addresses the BS had bound (a resume binds them again)

Written to a temporary file, fsynced, renamed over the old one, and the folder fsynced: a crash at any moment
leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import BenchConfig, ExperimentConfig, to_mapping
from config.loading import BENCH_WIRING_KEYS, drop_keys

FORMAT = "fedlora-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"
# Where processes listen and where keys lie: a resumed run may differ in them (new ports for a new air, say).
_NOT_CONFIGURATION = tuple(("bench", *path) for path in BENCH_WIRING_KEYS)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not belong to the run being resumed."""


@dataclass
class Checkpoint:
    run_id: str
    next_round: int
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    controller: dict[str, Any]
    closer: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, float | None] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)


def run_configuration(experiment: ExperimentConfig, bench: BenchConfig) -> dict[str, Any]:
    """The resolved configuration as a checkpoint compares it."""
    config: dict[str, Any] = {"experiment": to_mapping(experiment), "bench": to_mapping(bench)}
    return drop_keys(config, _NOT_CONFIGURATION)


def differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, each with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            out += differences(saved.get(key, "<absent>"), now.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: {_short(saved)} in the checkpoint, {_short(now)} now"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(states: dict[str, Any]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])


def capture(
    run_id: str,
    next_round: int,
    experiment: ExperimentConfig,
    bench: BenchConfig,
    adapter: dict[str, torch.Tensor],
    *,
    controller: dict[str, Any],
    closer: dict[str, Any],
) -> Checkpoint:
    """The state to go on with at next_round (the adapter copied, the generators' states taken now)."""
    return Checkpoint(
        run_id=run_id,
        next_round=next_round,
        config=run_configuration(experiment, bench),
        adapter={k: v.detach().clone() for k, v in adapter.items()},
        controller=controller,
        closer=closer,
        rng=rng_states(),
    )


def save(
    run_dir: Path,
    checkpoint: Checkpoint,
    *,
    initial: dict[str, float | None] | None = None,
    endpoints: dict[str, str] | None = None,
) -> Path:
    """Atomically replace `<run_dir>/checkpoint.pt` (write, fsync, rename, fsync the folder)."""
    if initial is not None:
        checkpoint.initial = dict(initial)
    if endpoints is not None:
        checkpoint.endpoints = dict(endpoints)
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_name(CHECKPOINT_FILE + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, **vars(checkpoint)}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load(run_dir: Path, experiment: ExperimentConfig, bench: BenchConfig) -> Checkpoint:
    """The run's checkpoint, checked against the configuration it is resumed under."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint (no round of this run was closed), nothing to resume")
    try:
        # our own file, written by this code: it holds the controller's and closer's Python objects
        data = torch.load(path, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    data.pop("format")
    try:
        checkpoint = Checkpoint(**data)
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    diffs = differences(checkpoint.config, run_configuration(experiment, bench))
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(f"{path} is of another configuration: {shown}")
    return checkpoint
