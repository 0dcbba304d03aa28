"""model.device and GPU energy: CUDA only where it is, a clear error where it is not; NVML's joules recorded."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from config import ConfigError, load_experiment
from fedlora import accelerator, energy
from fedlora.accelerator import GpuEnergy, autocast_dtype, resolve_device


def test_without_a_gpu_auto_is_the_cpu_and_naming_cuda_is_an_error():
    assert not torch.cuda.is_available()  # the CPU build of torch on these machines
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"model.device = '{spec}': torch .* sees no CUDA device"):
            resolve_device(spec)
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="model.device"):
        load_experiment(None, ["model.device=gpu"])


def test_with_gpus_auto_takes_the_first_and_an_index_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype(torch.device("cuda", 0)) == torch.float16
    assert autocast_dtype(torch.device("cpu")) is None  # the CPU trains in fp32


def _fake_nvml(monkeypatch, step_mj: int, fail: bool = False) -> None:
    counter = {"mj": 1_000_000}

    def total_energy(handle):
        assert handle == ("gpu", 0)
        counter["mj"] += step_mj
        return counter["mj"]

    def init():
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    module = types.SimpleNamespace(
        nvmlInit=init,
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)


def test_a_gpu_rounds_energy_adds_nvmls_joules_and_says_so(monkeypatch):
    monkeypatch.setattr(energy, "_read_rapl_uj", lambda: None)  # the CPU part from the model: 0 W here
    _fake_nvml(monkeypatch, step_mj=5_000)
    with energy.ComputeWindow(watts_per_core=0.0, gpu=GpuEnergy(0)) as window:
        pass
    assert window.result is not None
    assert window.result.energy_j == pytest.approx(5.0) and window.result.source == "cpu_model+nvml"


def test_without_nvml_the_gpu_is_unmeasured_and_the_round_goes_on(monkeypatch):
    monkeypatch.setattr(energy, "_read_rapl_uj", lambda: None)
    _fake_nvml(monkeypatch, step_mj=5_000, fail=True)
    gpu = GpuEnergy(0)
    assert not gpu.available
    with energy.ComputeWindow(watts_per_core=10.0, gpu=gpu) as window:
        sum(range(100_000))
    assert window.result is not None and window.result.source == "cpu_model+gpu_unmeasured"
    assert window.result.energy_j == pytest.approx(window.result.cpu_s * 10.0)


def test_the_bs_reports_a_model_it_cannot_have_in_one_line(tmp_path):
    import subprocess

    from launcher.main import entry_point
    from tests.processes import ENV, REPO, TINY

    cmd = [*entry_point("fedlora-bs"), "--run-dir", str(tmp_path / "run"), "--bench", "hw_configs/sim.yaml"]
    cmd += ["--control", "tcp://127.0.0.1:0", "--data", "tcp://127.0.0.1:0", *TINY, "--set", "model.device=cuda:0"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "cannot set up the task and model 'tiny': model.device = 'cuda:0'" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_accelerator_module_is_what_training_uses():
    assert accelerator.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_the_gpu_check_script_says_there_is_no_gpu_here(capsys):
    import importlib.util

    from tests.processes import REPO

    spec = importlib.util.spec_from_file_location("check_gpu", REPO / "scripts" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cuda:0"]) == 2
    assert "no GPU to check" in capsys.readouterr().err
