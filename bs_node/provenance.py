"""Where a result came from: code version, packages, host and radios, written beside every run's records.

A number in a paper must be traceable to the code and the machine that made it. The BS writes
`provenance.json` into the run folder when the run starts: the model's weights, the git commit of the testbed
(and whether the work tree had uncommitted changes), the versions of the packages that shape the numbers, the
host, and for radio benches the radios' device arguments (serials where the bench names them) and gains. Nothing
here may stop a run: what cannot be read is recorded as null.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from config import REPO_ROOT, BenchConfig, ModelConfig
from fedlora import embedded_llm

PYTHON_PACKAGES = ("torch", "transformers", "peft", "numpy", "scipy", "pyzmq", "pydantic", "gguf")
DEBIAN_PACKAGES = ("gnuradio", "libuhd*", "uhd-host", "soapysdr*", "libsoapysdr*")


def collect(bench: BenchConfig, repo: Path = REPO_ROOT, model: ModelConfig | None = None) -> dict[str, Any]:
    """Everything `provenance.json` holds (see the module docstring)."""
    commit, dirty = _git(repo)
    return {
        "model": None if model is None else _model(model),
        "code": {"commit": commit, "dirty": dirty, "path": str(repo)},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "packages": {name: _version(name) for name in PYTHON_PACKAGES},
        "debian_packages": _debian_packages(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "radios": _radios(bench),
    }


def _model(model: ModelConfig) -> dict[str, Any]:
    """Which weights the run fine-tuned; the embedded LLM says that they are a 4-bit quantisation's."""
    return {
        "name_or_path": model.name_or_path,
        "source": embedded_llm.source() if model.name_or_path == embedded_llm.NAME else None,
    }


def _git(repo: Path) -> tuple[str | None, bool | None]:
    """(commit, work tree has uncommitted changes to tracked files); (None, None) outside a git checkout."""
    try:
        commit = _run(["git", "-C", str(repo), "rev-parse", "HEAD"])
        status = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _debian_packages() -> dict[str, str]:
    """Installed Debian packages that carry the radio stack (GNU Radio, UHD, SoapySDR): name -> version."""
    try:
        out = _run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package} ${Version}\\n", *DEBIAN_PACKAGES])
    except (OSError, subprocess.SubprocessError):
        return {}
    installed = (line.split() for line in out.splitlines())
    return {fields[1]: fields[2] for fields in installed if len(fields) == 3 and fields[0].startswith("ii")}


def _radios(bench: BenchConfig) -> dict[str, Any] | None:
    """What a radio bench ran on, as the bench names it (device args carry serials when the lab pins them)."""
    if bench.phy != "rf":
        return None
    rf = bench.rf
    return {
        "driver": rf.driver,
        "bs_device_args": rf.bs_device_args,
        "edge_device_args": list(rf.edge_device_args),
        "center_freq_hz": rf.center_freq_hz,
        "sample_rate_hz": rf.sample_rate_hz,
        "tx_gain_db": rf.tx_gain_db,
        "rx_gain_db": rf.rx_gain_db,
    }


def _run(cmd: list[str]) -> str:
    """A short query's stdout; dpkg-query exits 1 when some pattern matches nothing, which is no failure here."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if done.returncode not in (0, 1) or (done.returncode == 1 and cmd[0] == "git"):
        raise subprocess.SubprocessError(done.stderr.strip())
    return done.stdout.strip()
