"""What a sweep is: a grid of (bench, arm, seed) trials, each a whole experiment, declared once in YAML.

An *arm* is what is compared: a policy, an aggregator and a named set of overrides (e.g. `soft`, `dense`), the
product of the three lists. Seeds repeat every arm on every bench; trials of one bench and seed share the data
split and the channel, so arms are compared *paired* on them. The trial id names all four, so a trial's folder
is found again when the sweep is run a second time (finished trials are skipped).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from config import REPO_ROOT, ConfigError, load_bench, load_experiment
from config.base import ConfigModel, Items, RuleError
from config.bench import BenchConfig
from config.experiment import ExperimentConfig, Policy
from config.loading import BENCH_WIRING_KEYS, apply_overrides, drop_keys, read_yaml, to_mapping, validated

Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=40)]
Scalar = str | int | float | bool | None
Overrides = Mapping[str, Scalar | list[Scalar]]


class SweepSpec(ConfigModel):
    name: Label = "sweep"
    experiment: str | None = None  # experiment YAML (None: experiments/default.yaml), relative to the repo
    benches: Items[str] = Field(("hw_configs/sim.yaml",), min_length=1)  # bench YAMLs, relative to the repo
    policies: Items[Policy] | None = None  # a grid axis; None: the arms (or the experiment) set the policy
    aggregators: Items[str] = Field(("default",), min_length=1)  # round.aggregator values; "default": as configured
    arms: Mapping[Label, Overrides] = Field(default_factory=lambda: {"base": {}})  # named override sets
    seeds: Items[Annotated[int, Field(ge=0)]] = Field((0, 1, 2), min_length=1)
    overrides: Overrides = Field(default_factory=dict)  # experiment overrides every trial gets
    bench_overrides: Overrides = Field(default_factory=dict)
    baseline: str | None = None  # arm the paired differences are taken against (None: the first arm)
    cpus_per_trial: int = Field(1, gt=0)  # Ray CPUs a trial asks for; its BS and edges share them
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)  # energy to reach it, besides the baseline's

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> SweepSpec:
        labels = [a.label for a in self.arm_list()]
        if len(set(labels)) != len(labels):
            raise RuleError("arms", labels, "arm labels must be distinct")
        if self.baseline is not None and self.baseline not in labels:
            raise RuleError("baseline", self.baseline, f"expected one of the arms {labels}")
        seen: dict[str, str] = {}
        for i, bench in enumerate(self.benches):
            name = Path(bench).stem
            if name in seen:
                raise RuleError(f"benches[{i}]", bench, f"has the same file name as {seen[name]!r}: trials must differ")
            seen[name] = bench
        ids = [a.label.replace("/", "_") for a in self.arm_list()]
        if len(set(ids)) != len(ids):
            raise RuleError("arms", labels, "arm labels must stay distinct with '/' read as '_' (trial folders)")
        return self

    def arm_list(self) -> list[Arm]:
        """policy x aggregator x named overrides; an arm's own overrides win over the axes."""
        arms = []
        policies: tuple[str | None, ...] = self.policies or (None,)
        for policy, aggregator, (name, overrides) in itertools.product(policies, self.aggregators, self.arms.items()):
            parts = [p for p in (policy, aggregator if aggregator != "default" else None) if p]
            if name != "base" or not parts:
                parts.append(name)
            sets: dict[str, Any] = {}
            if policy:
                sets["controller.policy"] = policy
            if aggregator != "default":
                sets["round.aggregator"] = aggregator
            merged = {**sets, **overrides}
            shared = {**self.overrides, **merged}
            arm_policy = str(shared.get("controller.policy", "as configured"))
            arm_aggregator = str(shared.get("round.aggregator", aggregator))
            arms.append(Arm("/".join(parts), arm_policy, arm_aggregator, name, merged))
        return arms

    def baseline_label(self) -> str:
        return self.baseline or self.arm_list()[0].label

    def trials(self) -> list[Trial]:
        """Every trial, seed-major: a sweep cut short has every arm on the first seeds rather than some arms on all."""
        return [
            Trial(bench=bench, arm=arm, seed=seed, spec=self)
            for seed in self.seeds
            for bench in self.benches
            for arm in self.arm_list()
        ]


@dataclass(frozen=True)
class Arm:
    label: str
    policy: str
    aggregator: str
    variant: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class Trial:
    bench: str
    arm: Arm
    seed: int
    spec: SweepSpec

    @property
    def bench_name(self) -> str:
        return Path(self.bench).stem

    @property
    def trial_id(self) -> str:
        return f"{self.bench_name}__{self.arm.label.replace('/', '_')}__s{self.seed}"

    def experiment_sets(self) -> list[str]:
        """`--set` values of the trial: the sweep's, the arm's, then the seed (later ones win)."""
        merged = {**self.spec.overrides, **self.arm.overrides, "seed": self.seed}
        return [f"{key}={_yaml_value(value)}" for key, value in merged.items()]

    def bench_sets(self) -> list[str]:
        return [f"{key}={_yaml_value(value)}" for key, value in self.spec.bench_overrides.items()]

    def fingerprint(self) -> str:
        """What the trial runs: the resolved experiment and bench, every override applied. A finished trial
        counts as done only while the spec still asks for exactly this, so editing an arm, a shared override or
        the experiment or bench file itself re-runs the trials it changes. ConfigError if they do not load."""
        return _fingerprint(
            repo_path(self.spec.experiment) if self.spec.experiment else None,
            repo_path(self.bench),
            tuple(self.experiment_sets()),
            tuple(self.bench_sets()),
        )


@functools.lru_cache(maxsize=1024)
def _fingerprint(experiment: str | None, bench: str, sets: tuple[str, ...], bench_sets: tuple[str, ...]) -> str:
    return config_fingerprint(load_experiment(experiment, sets), load_bench(bench, bench_sets))


# Where a file is does not change what a trial runs (the curves' content is in their *_table fields), and a path
# differs from clone to clone.
def config_fingerprint(experiment: ExperimentConfig, bench: BenchConfig) -> str:
    """A short hash of what a trial runs: the resolved experiment and bench, paths and addresses left out."""
    bench_map = drop_keys(to_mapping(bench), BENCH_WIRING_KEYS)
    text = json.dumps([to_mapping(experiment), bench_map], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the configuration a finished run recorded (experiment.yaml, bench.yaml), read by this
    code: fields added since then take their defaults, so a trial is re-run only if what it ran differs from what
    is asked now. None if the run folder's configuration is missing or no longer valid."""
    try:
        experiment = validated(ExperimentConfig, read_yaml(run_dir / "experiment.yaml"), str(run_dir))
        bench = validated(BenchConfig, read_yaml(run_dir / "bench.yaml"), str(run_dir))
    except (ConfigError, OSError):
        return None
    return config_fingerprint(experiment, bench)


def _yaml_value(value: Any) -> str:
    """A value as `--set` reads it (YAML): JSON is YAML, and keeps strings like 'none' strings."""
    return json.dumps(value)


def repo_path(path: str) -> str:
    """A path of the spec, relative to the repo unless absolute."""
    p = Path(path)
    return str(p if p.is_absolute() else REPO_ROOT / p)


def load_sweep(path: str | Path | None, overrides: Sequence[str] = ()) -> SweepSpec:
    """The sweep YAML (None: an empty spec) with `key=value` overrides of its top-level keys; ConfigError if bad."""
    data: dict[str, Any] = {}
    where = str(path) if path else "sweep"
    if path is not None:
        loaded = read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level: expected a mapping")
        data = dict(loaded or {})
    data = apply_overrides(data, overrides, where)  # config's own KEY=VALUE reading and its one-line errors
    spec = validated(SweepSpec, data, where)
    for i, bench in enumerate(spec.benches):
        if not Path(repo_path(bench)).is_file():
            raise ConfigError(f"{where}: benches[{i}] = {bench!r}: no such file")
    if spec.experiment is not None and not Path(repo_path(spec.experiment)).is_file():
        raise ConfigError(f"{where}: experiment = {spec.experiment!r}: no such file")
    return spec
