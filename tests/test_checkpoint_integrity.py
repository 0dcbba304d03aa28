"""Checkpoints are data, not code, and sealed (issue 24, item 6), and rounds.jsonl survives a torn append (item 9):
a pickle in the checkpoint's place runs nothing; an adapter scaled by 1e6, a forged accuracy and a rewound
next_round are refused naming what failed; what is checkable without the tag is checked too; run files holding
model state are 0600; a torn last record is dropped with a warning, a torn line before it names the line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from bs_node.checkpoint import CHECKPOINT_FILE, CheckpointError, load
from bs_node.records import RunRecorder
from tests.bs_fakes import make_station, sends_update
from trust.run_files import checkpoint_key, checkpoint_key_path, tag

OVERRIDES = ["round.rounds=3", "devices.count=1"]


@pytest.fixture(scope="module")
def closed_two_rounds(tmp_path_factory) -> tuple[Path, object, object]:
    """A run folder whose BS closed rounds 1 and 2 (fake transport), and its configuration."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    bs = make_station(run_dir, OVERRIDES)
    bs.transport.join(0, sends_update(bs.transport, 0, 0.01))
    bs.runner._start()
    bs.runner.wait_for_devices()
    for r in (1, 2):
        bs.runner.run_round(r)
    return run_dir, bs.runner.exp, bs.runner.bench


@pytest.fixture
def run(closed_two_rounds, tmp_path):
    source, exp, bench = closed_two_rounds
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir, exp, bench


def _document(run_dir: Path) -> dict:
    return json.loads((run_dir / CHECKPOINT_FILE).read_text())["document"]


def _write(run_dir: Path, document: dict, *, retag: bool) -> None:
    """Write a changed document back: keeping the old tag (an attacker without the key) or with a valid one."""
    old = json.loads((run_dir / CHECKPOINT_FILE).read_text())
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    new_tag = tag(checkpoint_key(run_dir, create=False), body) if retag else old["tag"]
    (run_dir / CHECKPOINT_FILE).write_text(json.dumps({"document": document, "tag": new_tag}))


def _scale_adapter(run_dir: Path, document: dict, factor: float) -> None:
    """Scale the adapter in the tensors file and pin the new file's hash in the document."""
    import hashlib

    path = run_dir / document["tensors"]["file"]
    tensors = load_tensors(path.read_bytes())
    tensors = {k: v * factor if k.startswith("adapter/") else v for k, v in tensors.items()}
    data = save_tensors(tensors)
    path.write_bytes(data)
    document["tensors"]["sha256"] = hashlib.sha256(data).hexdigest()


def test_a_pickle_in_the_checkpoints_place_runs_nothing(run, tmp_path):
    run_dir, exp, bench = run
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "fedlora-checkpoint/1", "x": Payload()}, run_dir / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load(run_dir, exp, bench)
    assert not marker.exists()


def test_an_altered_checkpoint_is_refused_naming_what_failed(run):
    run_dir, exp, bench = run
    assert load(run_dir, exp, bench).next_round == 3
    pristine = (run_dir / CHECKPOINT_FILE).read_text()
    tensors_file = run_dir / _document(run_dir)["tensors"]["file"]
    pristine_tensors = tensors_file.read_bytes()

    document = _document(run_dir)
    _scale_adapter(run_dir, document, 1e6)  # the hash pinned again, but the tag is over the old document
    _write(run_dir, document, retag=False)
    with pytest.raises(CheckpointError, match="checkpoint.json: integrity tag does not match"):
        load(run_dir, exp, bench)
    (run_dir / CHECKPOINT_FILE).write_text(pristine)  # the tensors alone changed: their hash is wrong
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load(run_dir, exp, bench)
    tensors_file.write_bytes(pristine_tensors)

    for field, value in (("initial", {"accuracy": 0.99, "val_accuracy": 0.99}), ("next_round", 1)):
        document = _document(run_dir)
        document[field] = value
        _write(run_dir, document, retag=False)
        with pytest.raises(CheckpointError, match="integrity tag does not match"):
            load(run_dir, exp, bench)
    (run_dir / CHECKPOINT_FILE).write_text(pristine)
    assert load(run_dir, exp, bench).next_round == 3


def test_what_is_checkable_without_the_tag_is_checked(run):
    """Even under a valid tag (the key stolen, or a bug): next_round against rounds.jsonl, finite adapter values,
    the schema's bounds."""
    run_dir, exp, bench = run
    pristine = (run_dir / CHECKPOINT_FILE).read_text()
    document = _document(run_dir)
    document["next_round"] = 1
    _write(run_dir, document, retag=True)
    with pytest.raises(CheckpointError, match=r"next_round: 1 is before the rounds rounds.jsonl holds \(1..2\)"):
        load(run_dir, exp, bench)
    document["next_round"] = 7
    _write(run_dir, document, retag=True)
    with pytest.raises(CheckpointError, match="next_round: 7, but rounds.jsonl ends at round 2"):
        load(run_dir, exp, bench)
    (run_dir / CHECKPOINT_FILE).write_text(pristine)
    document = _document(run_dir)
    document["initial"]["accuracy"] = 3.5
    _write(run_dir, document, retag=True)
    with pytest.raises(CheckpointError, match="document.initial.accuracy"):
        load(run_dir, exp, bench)
    (run_dir / CHECKPOINT_FILE).write_text(pristine)
    document = _document(run_dir)
    _scale_adapter(run_dir, document, float("inf"))
    _write(run_dir, document, retag=True)
    with pytest.raises(CheckpointError, match="adapter/.*not finite"):
        load(run_dir, exp, bench)


def test_without_its_key_a_checkpoint_is_not_trusted(run):
    run_dir, exp, bench = run
    checkpoint_key_path(run_dir).unlink()
    with pytest.raises(CheckpointError, match="checkpoint.key: missing"):
        load(run_dir, exp, bench)


def test_run_files_holding_model_state_are_private(run):
    run_dir, _, _ = run
    document = _document(run_dir)
    for name in (CHECKPOINT_FILE, document["tensors"]["file"], "adapter.pt", "keys/checkpoint.key"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((run_dir / "keys").stat().st_mode) == 0o700
    assert len(list(run_dir.glob("checkpoint-*.safetensors"))) == 1  # the older round's tensors are gone
    assert not (run_dir / "checkpoint.pt").exists()


def test_a_torn_last_record_is_dropped_a_torn_earlier_one_is_named(run, caplog):
    run_dir, exp, bench = run
    rounds = run_dir / "rounds.jsonl"
    lines = rounds.read_text().splitlines()
    rounds.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][: len(lines[1]) // 2])  # round 3 torn mid-append
    with caplog.at_level(logging.WARNING):
        assert load(run_dir, exp, bench).next_round == 3
        recorder = RunRecorder(run_dir)
        recorder.resume(3)
    assert "line 3 is torn" in caplog.text
    assert [json.loads(line)["round"] for line in rounds.read_text().splitlines()] == [1, 2]
    assert [r.round for r in recorder.records] == [1, 2]

    rounds.write_text(lines[0][:40] + "\n" + lines[1] + "\n")
    with pytest.raises(CheckpointError, match="rounds.jsonl: line 1 is not a round record"):
        load(run_dir, exp, bench)


def test_each_round_record_is_fsynced(tmp_path, monkeypatch, closed_two_rounds):
    source, _, _ = closed_two_rounds
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    recorder = RunRecorder(tmp_path)
    recorder.plot = lambda: None  # type: ignore[method-assign]
    record = RunRecorder(source)
    record.resume(3)
    recorder.write_round(record.records[0])
    assert str(tmp_path / "rounds.jsonl") in synced
