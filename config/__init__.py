"""Typed configuration: one YAML file describes an experiment, one describes a bench.

Both are frozen pydantic models (config/experiment.py, config/bench.py) filled by config/loading.py, whose
errors are one line naming the file, the dotted key, the value and what is allowed. This package sits at the
bottom of the layering: it imports neither torch nor GNU Radio nor any of fedlora/phy/link/bs_node/edge_node.
"""

from config.base import REPO_ROOT, ConfigError, ConfigModel, RuleError
from config.bench import (
    AddressConfig,
    AirConfig,
    ArqConfig,
    BenchConfig,
    ChannelConfig,
    DeviceProfile,
    FadingModel,
    RadioConfig,
    RfConfig,
)
from config.experiment import (
    CodecConfig,
    ControllerConfig,
    DevicesConfig,
    ExperimentConfig,
    ModelConfig,
    RoundConfig,
    TaskConfig,
    TrainConfig,
)
from config.loading import (
    DEFAULT_BENCH,
    DEFAULT_EXPERIMENT,
    apply_overrides,
    load_bench,
    load_experiment,
    read_per_curve,
    to_mapping,
    validated,
)
from config.per_curve import PerCurveTable

__all__ = [
    "DEFAULT_BENCH",
    "DEFAULT_EXPERIMENT",
    "REPO_ROOT",
    "AddressConfig",
    "AirConfig",
    "ArqConfig",
    "BenchConfig",
    "ChannelConfig",
    "CodecConfig",
    "ConfigError",
    "ConfigModel",
    "ControllerConfig",
    "DeviceProfile",
    "DevicesConfig",
    "ExperimentConfig",
    "FadingModel",
    "ModelConfig",
    "PerCurveTable",
    "RadioConfig",
    "RfConfig",
    "RoundConfig",
    "RuleError",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "load_bench",
    "load_experiment",
    "read_per_curve",
    "to_mapping",
    "validated",
]
