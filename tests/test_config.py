"""Config loading: shipped files load, every mistake is one line naming file, key and value, and the CLIs say so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config import (
    REPO_ROOT,
    BenchConfig,
    ChannelConfig,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    apply_overrides,
    load_bench,
    load_experiment,
    read_per_curve,
    to_mapping,
    validated,
)

BENCHES = sorted((REPO_ROOT / "hw_configs").glob("*.yaml"))
EXPERIMENTS = sorted((REPO_ROOT / "experiments").glob("*.yaml"))
CURVE = REPO_ROOT / "hw_configs" / "calibration" / "loopback.yaml"


def test_defaults_load():
    exp = load_experiment()
    bench = load_bench()
    assert exp.devices.count == 4 and exp.task.name == "rotten_tomatoes"
    assert bench.phy == "sim" and bench.radio.total_bandwidth_hz == 1e6
    assert len(bench.devices) == 4
    assert isinstance(ExperimentConfig().round.deadline_s, float)


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.name)
def test_every_shipped_bench_loads_and_round_trips(path: Path):
    bench = load_bench(path)
    assert validated(BenchConfig, to_mapping(bench), "round trip") == bench
    if bench.per_curve is not None:  # resolved from the bench's folder, content carried along
        assert Path(bench.per_curve) == CURVE.resolve()
        assert bench.per_curve_table == read_per_curve(CURVE)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_loads_and_round_trips(path: Path):
    exp = load_experiment(path)
    assert validated(ExperimentConfig, to_mapping(exp), "round trip") == exp


def test_shipped_per_curve_file_loads():
    table = read_per_curve(CURVE)
    assert set(table.curves) == {"bpsk", "qpsk", "8psk"} and table.ref_frame_bytes == 1000


def _keys(node: object, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return {k for key, value in node.items() for k in {prefix + key} | _keys(value, f"{prefix}{key}.")}
    return set()


@pytest.mark.parametrize("kind", ["experiment", "bench"])
def test_run_folder_snapshot_keeps_the_yaml_keys(tmp_path: Path, kind: str):
    """bs_node/records.py writes yaml.safe_dump(to_mapping(cfg)); it must hold the shipped keys and reload equal."""
    source = REPO_ROOT / ("experiments/default.yaml" if kind == "experiment" else "hw_configs/zmq_iq.yaml")
    load = load_experiment if kind == "experiment" else load_bench
    cfg = load(source)
    snapshot = tmp_path / f"{kind}.yaml"
    snapshot.write_text(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
    written = yaml.safe_load(snapshot.read_text())
    assert _keys(yaml.safe_load(source.read_text())) <= _keys(written)
    assert set(written) == set(type(cfg).model_fields)
    assert load(snapshot) == cfg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("devices: {count: four}", "devices.count = 'four': expected an integer"),
        ("devices: {count: yes}", "devices.count = True: expected an integer"),
        (
            "devices: {cuont: 4}",
            "devices.cuont = 4: unknown key; allowed: count, dirichlet_alpha, min_examples, validation_fraction",
        ),
        ("devices: {validation_fraction: 0.6}", "devices.validation_fraction = 0.6: expected <= 0.5"),
        ("devices: {validation_fraction: -0.1}", "devices.validation_fraction = -0.1: expected >= 0"),
        ("task: {max_validation: 0}", "task.max_validation = 0: expected > 0"),
        ("task: {name: mnist}", "task.name = 'mnist': expected one of 'rotten_tomatoes', 'sst2', 'qnli'"),
        ("round: {rounds: 0}", "round.rounds = 0: expected > 0"),
        ("round: {stale_rounds: -1}", "round.stale_rounds = -1: expected >= 0"),
        ("controller: {rank: 99}", "controller.rank = 99: expected 1..model.max_rank (8)"),
        ("controller: {loss_weights: [0.6, 0.5, 0.6]}", "controller.loss_weights = [0.6, 0.5, 0.6]: rank + sparsity"),
        ("controller: {loss_weights: [0.2, 1.5, 0.2]}", "controller.loss_weights[1] = 1.5: expected <= 1"),
        ("controller: {modulations: [qam]}", "controller.modulations[0] = 'qam': expected one of 'bpsk'"),
        ("controller: {keep_fractions: []}", "controller.keep_fractions = []: expected at least 1 item"),
        ("training: [1, 2]", "training = [1, 2]: expected a mapping"),
        ("training: {lr: .inf}", "training.lr = inf: expected a finite number"),
        ("model: {target_modules: query}", "model.target_modules = 'query': expected a list"),
        ("task: {name: sst2, path: /nonexistent/glue}", "task.path = '/nonexistent/glue': not a folder"),
        ("[1, 2]", "top level = [1, 2]: expected a mapping"),
        ("a: [unclosed", "cannot parse YAML"),
    ],
)
def test_experiment_errors_are_one_line_naming_file_key_and_value(tmp_path: Path, text: str, needle: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message


def test_bench_errors_name_the_device(tmp_path: Path):
    path = tmp_path / "bench.yaml"
    path.write_text("devices:\n  - {distance_m: 10}\n  - {distance_m: -3}\n")
    with pytest.raises(ConfigError, match=r"devices\[1\]\.distance_m = -3: expected > 0$"):
        load_bench(path)
    path.write_text("devices:\n  - {compute_watts_per_core: 3}\n")
    with pytest.raises(ConfigError, match=r"devices\[0\]\.distance_m: required key is missing"):
        load_bench(path)
    path.write_text("radio: {min_tx_power_dbm: 20}\n")
    with pytest.raises(ConfigError, match=r"radio\.min_tx_power_dbm = 20\.0: must be <= radio\.max_tx_power_dbm"):
        load_bench(path)


def test_yaml_exponents_are_numbers(tmp_path: Path):
    """PyYAML (YAML 1.1) reads 2.0e6 and 1e5 as strings; the loader reads them as YAML 1.2 numbers."""
    path = tmp_path / "bench.yaml"
    path.write_text("radio: {total_bandwidth_hz: 2.0e6}\nchannel: {ref_loss_db: 4e1}\n")
    bench = load_bench(path)
    assert bench.radio.total_bandwidth_hz == 2e6 and bench.channel.ref_loss_db == 40.0
    assert load_bench(path, ["radio.total_bandwidth_hz=1e5"]).radio.total_bandwidth_hz == 1e5


def test_overrides_apply_and_are_checked():
    exp = load_experiment(None, ["round.rounds=2", "model.name_or_path=tiny", "controller.modulation=bpsk"])
    assert exp.round.rounds == 2 and exp.model.name_or_path == "tiny" and exp.controller.modulation == "bpsk"
    assert load_bench(None, ["devices.1.distance_m=30"]).devices[1].distance_m == 30.0
    with pytest.raises(ConfigError, match=r"round\.rounds = 'many': expected an integer \(set by an override\)$"):
        load_experiment(None, ["round.rounds=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"], "cli")
    with pytest.raises(ConfigError, match=r"cli: a = '\[1': not a YAML value"):
        apply_overrides({}, ["a=[1"], "cli")


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_experiment(tmp_path / "nope.yaml")


def test_bench_devices_cycle():
    bench = load_bench()
    assert bench.device(5) == bench.devices[1]


def test_configs_are_frozen_and_typed() -> None:
    exp = load_experiment()
    with pytest.raises(ValueError):
        exp.round.rounds = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="fading"):
        ChannelConfig(fading="nakagami")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


# ----------------------------------------------------------------------------------------------- per_curve
def _bench_with_curve(folder: Path, curve: str) -> Path:
    bench = folder / "bench.yaml"
    bench.write_text(f"name: t\nphy: sim\nper_curve: {curve}\n")
    return bench


def test_per_curve_is_taken_from_the_bench_folder_and_carried_in_the_bench(tmp_path: Path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "curve.yaml").write_text(CURVE.read_text())
    bench = load_bench(_bench_with_curve(tmp_path, "cal/curve.yaml"))
    assert bench.per_curve == str((tmp_path / "cal" / "curve.yaml").resolve())
    assert bench.per_curve_table == read_per_curve(CURVE)
    # what the BS sends in its welcome: an edge on another host validates it without the file
    welcome_bench = json.loads(json.dumps(to_mapping(bench)))
    (tmp_path / "cal" / "curve.yaml").unlink()
    assert validated(BenchConfig, welcome_bench, "welcome: bench") == bench


def test_per_curve_errors(tmp_path: Path):
    path = _bench_with_curve(tmp_path, "missing.yaml")
    with pytest.raises(ConfigError, match=r"bench\.yaml: per_curve = 'missing\.yaml': no such file"):
        load_bench(path)
    (tmp_path / "bad.yaml").write_text("curves: {qpsk: [[5, 0.5], [1, 0.6]]}\n")
    path = _bench_with_curve(tmp_path, "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: curves\.qpsk = \[5\.0, 1\.0\]: SNR points must be strictly"):
        load_bench(path)
    with pytest.raises(ConfigError, match=r"w: per_curve = 'x\.yaml': its table is missing"):
        validated(BenchConfig, {"per_curve": "x.yaml"}, "w")


# ----------------------------------------------------------------------------------------------- processes
def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "cli, args, needles",
    [
        ("launcher.main", ["--bench-set", "channel.fading=bogus"], [".yaml: channel.fading = 'bogus'", "'rayleigh'"]),
        ("launcher.main", ["--set", "round.rounds=-3"], ["default.yaml: round.rounds = -3: expected > 0"]),
        ("launcher.main", ["--set", "devices.cuont=4"], ["default.yaml: devices.cuont = 4: unknown key"]),
        ("launcher.main", ["--set", "devices.count=four"], ["default.yaml: devices.count = 'four': expected an int"]),
        ("launcher.main", ["--experiment", "nope/missing.yaml"], ["nope/missing.yaml: cannot read"]),
        ("bs_node.main", ["--bench-set", "channel.fading=bogus"], ["sim.yaml: channel.fading = 'bogus'"]),
        ("launcher.main", ["--set", "controller.policy=lyapnuov"], ["controller.policy = 'lyapnuov'", "'lyapunov'"]),
        ("launcher.main", ["--set", "seed=-1"], ["default.yaml: seed = -1: expected >= 0"]),
        ("launcher.main", ["--set", "model.max_rank=300"], ["model.max_rank = 300: expected <= 255"]),
    ],
)
def test_cli_prints_one_line_and_exits_2(cli: str, args: list[str], needles: list[str]):
    line = _one_line(_run("-m", cli, *args))
    assert all(n in line for n in needles), line


def test_cli_names_a_missing_per_curve_and_malformed_yaml(tmp_path: Path):
    bench = _bench_with_curve(tmp_path, "nowhere/curve.yaml")
    line = _one_line(_run("-m", "launcher.main", "--bench", str(bench)))
    assert f"{bench}: per_curve = 'nowhere/curve.yaml': no such file" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("round: {rounds: [unclosed\n")
    line = _one_line(_run("-m", "launcher.main", "--experiment", str(broken), "--bench", str(bench)))
    assert f"{broken}: cannot parse YAML" in line


def test_config_and_proto_import_neither_torch_nor_gnuradio():
    code = (
        "import sys, config, proto.control, proto.framing, proto.numerology\n"
        "config.load_bench(); config.load_experiment()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gnuradio')))\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
