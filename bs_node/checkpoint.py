"""The BS's checkpoint: everything a run needs to go on after a crash, written atomically at every round close.

Data, not code (docs/security.md "Checkpoint and resume"): `<run dir>/checkpoint.json` is strict JSON (one
`CheckpointFile`: the document and its integrity tag), its tensors are `<run dir>/checkpoint-<sha>.safetensors`
(named by a prefix of their SHA-256, which the document pins). The document holds

    format        "fedlora-checkpoint/2"
    run_id        the run's id: a resumed BS keeps it, so edges that survived keep their data, model and residuals
    next_round    the round the run goes on with (every round before it is closed and recorded)
    config        the resolved experiment and bench, as mappings, without what does not change the computation
                  (addresses, the key directory): a resume under another configuration is refused, naming keys
    adapter       the global adapter's keys (tensors `adapter/<key>`)
    controller    the policy's state (virtual energy queues, channel and compute estimates, its generator)
    closer        per-device counters and cached updates (stale reuse), the aggregated-rounds verdicts
    rng           torch, numpy and Python generator states
    initial       the accuracy before fine-tuning (test, validation)
    endpoints     the control and data addresses the BS had bound (a resume binds them again)

controller, closer and rng are `bs_node.state_codec` trees. The tag is HMAC-SHA256 of the document's canonical JSON
under the run's checkpoint key (trust.run_files). Loading checks, in order, and refuses naming what failed: the
tag, the document's schema, the tensors file's hash, finite adapter values, next_round against rounds.jsonl, the
configuration. Both files are written 0600, fsynced and renamed, the tensors first (a new name each time), so a
crash at any moment leaves a checkpoint.json whose tensors file is whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from bs_node.records import RecordsError, recorded_rounds
from bs_node.state_codec import StateCodecError, decode, encode
from config import BenchConfig, ExperimentConfig, to_mapping
from config.loading import BENCH_WIRING_KEYS, drop_keys
from trust.run_files import checkpoint_key, fsync_dir, tag, tag_matches, write_atomic

log = logging.getLogger("bs")
FORMAT: Literal["fedlora-checkpoint/2"] = "fedlora-checkpoint/2"
CHECKPOINT_FILE = "checkpoint.json"
MAX_DOCUMENT_BYTES = 256 << 20
# Where processes listen and where keys lie: a resumed run may differ in them (new ports for a new air, say).
_NOT_CONFIGURATION = tuple(("bench", *path) for path in BENCH_WIRING_KEYS)
_Accuracy = Annotated[float, Field(ge=0.0, le=1.0)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class Initial(_Strict):
    accuracy: _Accuracy = None
    val_accuracy: _Accuracy = None


class TensorFile(_Strict):
    file: Annotated[str, Field(pattern=r"^checkpoint-[0-9a-f]{16}\.safetensors$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class CheckpointDocument(_Strict):
    format: Literal["fedlora-checkpoint/2"]
    run_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    next_round: Annotated[int, Field(ge=1, le=1_000_000_000)]
    config: dict[str, JsonValue]
    adapter: list[str]
    controller: JsonValue
    closer: JsonValue
    rng: JsonValue
    initial: Initial
    endpoints: dict[str, str]
    tensors: TensorFile


class CheckpointFile(_Strict):
    document: CheckpointDocument
    tag: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


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
    """Atomically replace `<run_dir>/checkpoint.json` and its tensors file (docstring above)."""
    if initial is not None:
        checkpoint.initial = dict(initial)
    if endpoints is not None:
        checkpoint.endpoints = dict(endpoints)
    run_dir = Path(run_dir)
    tensors = {f"adapter/{k}": v.detach().cpu().contiguous().clone() for k, v in checkpoint.adapter.items()}
    trees = {part: encode(getattr(checkpoint, part), tensors, part) for part in ("controller", "closer", "rng")}
    data = save_tensors(tensors)
    sha = hashlib.sha256(data).hexdigest()
    tensor_file = f"checkpoint-{sha[:16]}.safetensors"
    write_atomic(run_dir / tensor_file, data)
    document = CheckpointDocument(
        format=FORMAT,
        run_id=checkpoint.run_id,
        next_round=checkpoint.next_round,
        config=json.loads(json.dumps(checkpoint.config, allow_nan=False)),
        adapter=list(checkpoint.adapter),
        initial=Initial(**checkpoint.initial),
        endpoints=checkpoint.endpoints,
        tensors=TensorFile(file=tensor_file, sha256=sha),
        **trees,
    )
    body = _canonical(document)
    key = checkpoint_key(run_dir, create=True)
    text = json.dumps({"document": json.loads(body), "tag": tag(key, body)}, allow_nan=False, indent=1)
    path = run_dir / CHECKPOINT_FILE
    write_atomic(path, text.encode())
    for old in run_dir.glob("checkpoint-*.safetensors"):  # only now: the new document names the new tensors
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    fsync_dir(run_dir)
    return path


def _canonical(document: CheckpointDocument) -> bytes:
    """The bytes the tag covers: the document as JSON with sorted keys and no spaces."""
    return json.dumps(document.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def load(run_dir: Path, experiment: ExperimentConfig, bench: BenchConfig) -> Checkpoint:
    """The run's checkpoint, verified and checked against the configuration it is resumed under."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint (no round of this run was closed), nothing to resume")
    document = _verified_document(run_dir, path)
    tensors = _tensors(run_dir, document)
    try:
        trees = {part: decode(getattr(document, part), tensors, part) for part in ("controller", "closer", "rng")}
    except (StateCodecError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    checkpoint = Checkpoint(
        run_id=document.run_id,
        next_round=document.next_round,
        config=dict(document.config),
        adapter={k: tensors[f"adapter/{k}"] for k in document.adapter},
        initial=document.initial.model_dump(),
        endpoints=dict(document.endpoints),
        **trees,
    )
    _check_rounds(run_dir, path, checkpoint.next_round)
    diffs = differences(checkpoint.config, run_configuration(experiment, bench))
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(f"{path} is of another configuration: {shown}")
    return checkpoint


def _verified_document(run_dir: Path, path: Path) -> CheckpointDocument:
    """checkpoint.json parsed (strict JSON, the schema) and its tag checked under the run's key."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_DOCUMENT_BYTES + 1)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise CheckpointError(f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes")
        data = json.loads(raw, parse_constant=_no_constant)
        if not isinstance(data, dict) or set(data) != {"document", "tag"}:
            raise CheckpointError(f"{path}: not a {FORMAT} file (a document and its tag expected)")
        key = checkpoint_key(run_dir, create=False)
    except (OSError, ValueError, RecursionError) as exc:  # RunFileError, JSONDecodeError, huge numbers
        raise CheckpointError(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from None
    body = json.dumps(data["document"], sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if not isinstance(data["tag"], str) or not tag_matches(key, body, data["tag"]):
        raise CheckpointError(f"{path}: integrity tag does not match (altered, or not written under this run's key)")
    try:
        return CheckpointFile.model_validate(data).document
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{path}: {where}: {first['msg']}") from None


def _tensors(run_dir: Path, document: CheckpointDocument) -> dict[str, torch.Tensor]:
    """The tensors file the document names, its hash checked, the adapter's values finite."""
    path = run_dir / document.tensors.file
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != document.tensors.sha256:
            raise CheckpointError(f"{path}: SHA-256 does not match {CHECKPOINT_FILE}'s")
        tensors = load_tensors(data)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from None
    for key in document.adapter:
        t = tensors.get(f"adapter/{key}")
        if t is None:
            raise CheckpointError(f"{path}: adapter/{key}: missing")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: adapter/{key}: not finite floating point values")
    return tensors


def _check_rounds(run_dir: Path, path: Path, next_round: int) -> None:
    """Every round before next_round is in rounds.jsonl, and at most next_round itself after them (its record
    written, the BS gone before its checkpoint): a rewound or advanced next_round is refused."""
    try:
        rounds = recorded_rounds(run_dir / "rounds.jsonl")
    except RecordsError as exc:
        raise CheckpointError(str(exc)) from None
    last = max(rounds, default=0)
    if last > next_round:
        raise CheckpointError(f"{path}: next_round: {next_round} is before the rounds rounds.jsonl holds (1..{last})")
    if last < next_round - 1:
        raise CheckpointError(f"{path}: next_round: {next_round}, but rounds.jsonl ends at round {last}")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")
