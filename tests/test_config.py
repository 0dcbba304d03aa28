"""Config loading: defaults are valid, and every kind of mistake names the file and the field."""

from pathlib import Path

import pytest

from config import (
    BenchConfig,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_bench,
    load_experiment,
    to_mapping,
    validated,
)


def test_shipped_configs_load():
    exp = load_experiment()
    bench = load_bench()
    assert exp.devices.count == 4 and exp.task.name == "rotten_tomatoes"
    assert bench.phy == "sim" and bench.radio.total_bandwidth_hz == 1e6
    assert len(bench.devices) == 4


def test_round_trip_through_mapping():
    exp = load_experiment()
    assert validated(ExperimentConfig, to_mapping(exp), "rt") == exp
    bench = load_bench()
    assert validated(BenchConfig, to_mapping(bench), "rt") == bench


@pytest.mark.parametrize(
    "text, needle",
    [
        ("devices: {count: four}", "devices.count: expected an integer"),
        ("devices: {cuont: 4}", "unknown field(s) ['cuont']"),
        ("task: {name: mnist}", "task.name: 'mnist' is not one of"),
        ("round: {rounds: 0}", "round.rounds: must be > 0"),
        ("controller: {rank: 99}", "controller.rank: 99 is outside"),
        ("training: [1, 2]", "training: expected a mapping"),
        ("model: {target_modules: query}", "model.target_modules: expected a list"),
        ("task: {name: sst2, path: /nonexistent/glue}", "task.path"),
        ("a: [unclosed", "not valid YAML"),
    ],
)
def test_experiment_errors_name_file_and_field(tmp_path: Path, text: str, needle: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_bench_device_errors(tmp_path: Path):
    path = tmp_path / "bench.yaml"
    path.write_text("devices:\n  - {distance_m: 10}\n  - {distance_m: -3}\n")
    with pytest.raises(ConfigError, match=r"devices\[1\]\.distance_m: must be > 0"):
        load_bench(path)
    path.write_text("devices:\n  - {compute_watts_per_core: 3}\n")
    with pytest.raises(ConfigError, match=r"devices\[0\]\.distance_m: required field is missing"):
        load_bench(path)


def test_yaml_exponent_strings_are_numbers(tmp_path: Path):
    path = tmp_path / "bench.yaml"
    path.write_text("radio: {total_bandwidth_hz: 2.0e6}\n")
    assert load_bench(path).radio.total_bandwidth_hz == 2e6


def test_overrides_apply_and_are_checked(tmp_path: Path):
    exp = load_experiment(None, ["round.rounds=2", "model.name_or_path=tiny", "controller.modulation=bpsk"])
    assert exp.round.rounds == 2 and exp.model.name_or_path == "tiny" and exp.controller.modulation == "bpsk"
    with pytest.raises(ConfigError, match="round.rounds: expected an integer"):
        load_experiment(None, ["round.rounds=many"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"], "cli")


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiment(tmp_path / "nope.yaml")


def test_bench_devices_cycle():
    bench = load_bench()
    assert bench.device(5) == bench.devices[1]
    assert isinstance(ExperimentConfig().round.deadline_s, float)
