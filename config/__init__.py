"""Typed configuration: one YAML file describes an experiment, one describes a bench.

Both are plain dataclasses filled from YAML by `from_mapping`, which checks every field's type and names the
file and the dotted field path in its error, so a typo in a lab's bench file points at itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedlora.models import ModelConfig
from fedlora.training import TrainConfig
from phy.channel import ChannelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = REPO_ROOT / "experiments" / "default.yaml"
DEFAULT_BENCH = REPO_ROOT / "hw_configs" / "sim.yaml"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names file and field."""


# ----------------------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class TaskConfig:
    name: Literal["rotten_tomatoes", "sst2", "qnli"] = "rotten_tomatoes"
    path: str | None = None  # GLUE task folder (train.tsv, dev.tsv) for sst2 / qnli
    test_size: int = 1000
    max_train: int | None = None


@dataclass(frozen=True)
class DevicesConfig:
    count: int = 4
    dirichlet_alpha: float = 1.0  # non-IID label skew: smaller is more skewed
    min_examples: int = 8


@dataclass(frozen=True)
class RoundConfig:
    rounds: int = 6
    deadline_s: float = 240.0  # wall-clock deadline of one round at the BS; late devices are dropped
    startup_timeout_s: float = 300.0  # how long the BS waits for devices to register before round 1
    min_devices: int = 1  # the BS starts once this many devices are ready and the startup timeout has passed
    heartbeat_s: float = 2.0
    # devices present for a round whose update did not arrive (not planned, lost) count as zero updates in the
    # average (unbiased partial participation, fedlora/aggregation.py); false: average over the arrivals only
    absent_as_zero: bool = True
    # reuse a present device's latest update for up to this many rounds after it arrived, in the rounds it sits
    # out or loses (MIFA: energy-limited devices take turns without dropping out of the average); 0: never
    stale_rounds: int = 0


@dataclass(frozen=True)
class ControllerConfig:
    policy: str = "fixed"
    rank: int | None = None  # None: the global adapter's max rank
    depth: int | None = None  # None: every transformer layer
    modulation: Literal["bpsk", "qpsk", "8psk"] = "qpsk"
    keep_fraction: float = 1.0  # share of rank components a device sends (fixed policy); 1.0 = dense
    # online policies (docs/controller.md): the choices they have and how they weigh them
    ranks: tuple[int, ...] = (2, 4, 8)
    depths: tuple[int, ...] = (1, 2, 4, 6)
    keep_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    modulations: tuple[str, ...] = ("bpsk", "qpsk", "8psk")
    v: float = 60.0  # Lyapunov penalty weight V: learning proxy vs. queues (which count in budgets)
    loss_weights: tuple[float, ...] = (0.3, 1.0, 0.2)  # λ_r, λ_d, λ_s of the learning-loss proxy
    energy_price: float = 1.0  # κ_E: energy's own price, in budgets, on top of the queue (docs/controller.md)
    energy_credit_rounds: float = 2.0  # energy guard: budgets a device may borrow ahead, repaid by the last round
    participation_iterations: int = 12  # bisection steps of the participation price λ (docs/controller.md)
    latency_budget_s: float | None = None  # long-term round-latency budget T̄; None = no latency queue
    energy_guard: bool = True  # never plan past a device's cumulative energy allowance (docs/controller.md)
    energy_guard_margin: float = 0.1  # share of the allowance kept back for prediction error
    gain_ewma: float = 0.5  # smoothing of channel-gain and compute estimates
    snr_margin_sigmas: float = 0.0  # extra back-off: plan with the gain estimate minus this many std devs
    power_levels: int = 5
    share_levels: int = 10
    round_length_levels: int = 6
    price_iterations: int = 25
    greedy_top: int | None = None  # channel-greedy: how many devices take part (None: half)
    random_participation: float = 0.5  # random policy: chance that a device takes part


@dataclass(frozen=True)
class CodecConfig:
    uplink_dtype: Literal["fp16", "fp32"] = "fp16"
    downlink_dtype: Literal["fp16", "fp32"] = "fp32"
    # which part of a device's delta goes on the air (fedlora/sparsify, docs/soft.md); the share of rank
    # components comes from the plan's keep_fraction
    sparsifier: Literal["dense", "dense_fp16", "dense_fp32", "soft", "topk", "randomk", "b_only"] = "dense"
    error_feedback: bool = True  # soft/topk/randomk: carry what was not sent to the next round
    soft_lambda: float = 0.1  # weight of SOFT's orthogonality regulariser (0 = none)
    soft_score: Literal["trained", "update"] = "trained"
    soft_normalize: bool = True  # scale-free regulariser (per-module offdiag / diag)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)

    def check(self, where: str = "experiment") -> None:
        """Cross-field rules that the types alone cannot say."""
        _positive(where, "devices.count", self.devices.count)
        _positive(where, "devices.dirichlet_alpha", self.devices.dirichlet_alpha)
        _positive(where, "round.rounds", self.round.rounds)
        _positive(where, "round.deadline_s", self.round.deadline_s)
        if isinstance(self.round.stale_rounds, bool) or self.round.stale_rounds < 0:
            raise ConfigError(f"{where}: round.stale_rounds: must be an integer >= 0, got {self.round.stale_rounds!r}")
        _positive(where, "training.local_steps", self.training.local_steps)
        _positive(where, "training.batch_size", self.training.batch_size)
        _positive(where, "training.lr", self.training.lr)
        _positive(where, "model.max_rank", self.model.max_rank)
        _positive(where, "task.test_size", self.task.test_size)
        if not 0 <= self.codec.soft_lambda < float("inf"):
            raise ConfigError(
                f"{where}: codec.soft_lambda: must be a finite number >= 0, got {self.codec.soft_lambda!r}"
            )
        c = self.controller
        if (
            len(c.loss_weights) != 3
            or not all(0 <= w <= 1 for w in c.loss_weights)
            or c.loss_weights[0] + c.loss_weights[2] > 1
        ):
            raise ConfigError(
                f"{where}: controller.loss_weights: need three weights in [0, 1] (rank, depth, "
                f"sparsity), rank + sparsity <= 1, got {list(c.loss_weights)}"
            )
        bad = [m for m in c.modulations if m not in ("bpsk", "qpsk", "8psk")]
        if bad or not c.modulations:
            raise ConfigError(f"{where}: controller.modulations: unknown {bad}; known: bpsk, qpsk, 8psk")
        if not c.ranks or min(c.ranks) < 1 or not c.depths or min(c.depths) < 1:
            raise ConfigError(f"{where}: controller.ranks / controller.depths: need values >= 1")
        if not c.keep_fractions or not all(0 < f <= 1 for f in c.keep_fractions):
            raise ConfigError(f"{where}: controller.keep_fractions: every value must be in (0, 1]")
        for name in (
            "v",
            "power_levels",
            "share_levels",
            "round_length_levels",
            "price_iterations",
            "participation_iterations",
        ):
            _positive(where, f"controller.{name}", getattr(c, name))
        for name in ("energy_price", "energy_credit_rounds"):
            if not 0 <= getattr(c, name) < float("inf"):
                raise ConfigError(f"{where}: controller.{name}: must be a finite number >= 0, got {getattr(c, name)!r}")
        if not 0 <= c.energy_guard_margin < 1:
            raise ConfigError(
                f"{where}: controller.energy_guard_margin: must be in [0, 1), got {c.energy_guard_margin!r}"
            )
        if not 0 <= self.training.logit_adjustment < float("inf"):
            raise ConfigError(
                f"{where}: training.logit_adjustment: must be a finite number >= 0, got "
                f"{self.training.logit_adjustment!r}"
            )
        if not 0 < c.random_participation <= 1:
            raise ConfigError(f"{where}: controller.random_participation: must be in (0, 1]")
        if c.greedy_top is not None and c.greedy_top < 1:
            raise ConfigError(f"{where}: controller.greedy_top: must be >= 1 (or null for half the devices)")
        if not 0 <= self.controller.keep_fraction <= 1:
            raise ConfigError(
                f"{where}: controller.keep_fraction: must be within [0, 1], got {self.controller.keep_fraction!r}"
            )
        if self.controller.rank is not None and not 1 <= self.controller.rank <= self.model.max_rank:
            raise ConfigError(
                f"{where}: controller.rank: {self.controller.rank} is outside 1..model.max_rank ({self.model.max_rank})"
            )
        if self.controller.depth is not None and self.controller.depth < 1:
            raise ConfigError(f"{where}: controller.depth: must be >= 1, got {self.controller.depth}")
        if self.task.name in ("sst2", "qnli") and self.task.path is not None and not Path(self.task.path).is_dir():
            raise ConfigError(
                f"{where}: task.path: {self.task.path!r} is not a folder (expected a GLUE task "
                f"folder holding train.tsv and dev.tsv)"
            )


# ----------------------------------------------------------------------------------------------- bench
@dataclass(frozen=True)
class DeviceProfile:
    """One edge device of the bench: where it stands and what its hardware costs."""

    distance_m: float
    compute_watts_per_core: float = 12.0  # calibrated power of one busy core (CPU-seconds x this = joules)
    energy_budget_j: float | None = None  # long-term average energy per round (used by energy-aware policies)
    # EMULATION of slower hardware: 0.5 = a device half as fast. The edge stretches its measured training
    # time (it waits out the difference) and reports CPU-seconds and compute energy divided by this factor.
    compute_speed: float = 1.0


@dataclass(frozen=True)
class RadioConfig:
    total_bandwidth_hz: float = 1.0e6  # shared by the devices (FDMA)
    max_tx_power_dbm: float = 10.0
    min_tx_power_dbm: float = -10.0
    pa_efficiency: float = 0.3  # RF power out / DC power in of the transmit chain
    radio_on_power_w: float = 0.5  # baseband + RF circuits while transmitting
    frame_payload_bytes: int = 1000  # update bytes per PHY frame


@dataclass(frozen=True)
class ArqConfig:
    max_attempts: int = 4
    guard_s: float = 0.2  # BS waits this long after a burst ends for frames still in flight before it acks
    ack_timeout_s: float = 10.0  # edge gives up on an ack after this long
    airtime_budget_s: float | None = 60.0  # no new attempt would push the round's airtime past this


@dataclass(frozen=True)
class AddressConfig:
    control: str = "tcp://127.0.0.1:5755"  # BS control plane (ROUTER); edges connect here
    data: str = "tcp://127.0.0.1:5756"  # BS data-plane receiver (sim link)


@dataclass(frozen=True)
class AirConfig:
    """gr-zmq-iq: the air process (phy/air.py) between the edges and the BS (tcp://host:0 = a free port)."""

    address: str = "tcp://127.0.0.1:5757"  # air's ROUTER: edges send bursts here, the BS announces subbands
    medium: str = "tcp://127.0.0.1:5758"  # air's PUSH: the summed medium; the BS connects here
    max_cfo_hz: float = 300.0  # per-link carrier frequency offset, drawn uniform in +-this per device
    clock_speed: float = 1.0  # medium clock / real time (1 = real time; >1 runs the air faster, if CPU allows)
    hangover_s: float = 0.02  # noise after the last burst, so the receivers release the last packets
    filter_attenuation_db: float = 60.0  # stopband of the subband filters (air and BS channelizer)


@dataclass(frozen=True)
class RfConfig:
    """rf: the OFDM flowgraphs on radios (phy/rf.py); gr-uhd (USRP) or gr-soapy (HackRF and others)."""

    driver: Literal["uhd", "soapy"] = "uhd"
    bs_device_args: str = "type=b200"  # the BS's radio (uhd device address or SoapySDR args)
    edge_device_args: tuple[str, ...] = ("type=b200",)  # edge k uses entry k (cyclically)
    center_freq_hz: float = 2.45e9
    sample_rate_hz: float = 1.0e6  # the radios' rate (>= radio.total_bandwidth_hz)
    tx_gain_db: float = 60.0  # at radio.max_tx_power_dbm; a lower planned power lowers the gain dB for dB
    rx_gain_db: float = 40.0
    tx_antenna: str = ""  # "" = the driver's default
    rx_antenna: str = ""
    access: Literal["fdma", "tdma"] = "fdma"  # tdma: devices take turns in time slots over the whole band
    slot_s: float = 0.5  # tdma: one device's slot
    guard_s: float = 0.02  # tdma: silence at the end of a slot (clock error, TX/RX switching)
    digital_backoff_db: float = 6.0  # peak headroom of the OFDM samples below DAC full scale


@dataclass(frozen=True)
class BenchConfig:
    name: str = "sim"
    phy: Literal["sim", "gr-loopback", "gr-zmq-iq", "rf"] = "sim"
    radio: RadioConfig = field(default_factory=RadioConfig)
    arq: ArqConfig = field(default_factory=ArqConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)  # sim PHY only
    per_curve: str | None = None  # PER-vs-SNR calibration file for the sim PHY; None = built-in curves
    snr_offset_db: float = 0.0  # GNU Radio receivers: calibrated correction added to the SNR estimate
    addresses: AddressConfig = field(default_factory=AddressConfig)
    air: AirConfig = field(default_factory=AirConfig)  # gr-zmq-iq only
    rf: RfConfig = field(default_factory=RfConfig)  # rf only
    devices: tuple[DeviceProfile, ...] = (
        DeviceProfile(10.0),
        DeviceProfile(20.0),
        DeviceProfile(35.0),
        DeviceProfile(50.0),
    )

    def check(self, where: str = "bench") -> None:
        _positive(where, "radio.total_bandwidth_hz", self.radio.total_bandwidth_hz)
        _positive(where, "radio.pa_efficiency", self.radio.pa_efficiency)
        _positive(where, "radio.frame_payload_bytes", self.radio.frame_payload_bytes)
        _positive(where, "arq.max_attempts", self.arq.max_attempts)
        if self.radio.min_tx_power_dbm > self.radio.max_tx_power_dbm:
            raise ConfigError(f"{where}: radio.min_tx_power_dbm is above radio.max_tx_power_dbm")
        if not self.devices:
            raise ConfigError(f"{where}: devices: at least one device profile is needed")
        for i, dev in enumerate(self.devices):
            _positive(where, f"devices[{i}].distance_m", dev.distance_m)
            _positive(where, f"devices[{i}].compute_watts_per_core", dev.compute_watts_per_core)
            if not 0 < dev.compute_speed <= 1:
                raise ConfigError(
                    f"{where}: devices[{i}].compute_speed: an emulated slow-down factor in (0, 1], "
                    f"got {dev.compute_speed!r}"
                )
        if self.phy == "gr-zmq-iq":
            self._check_air(where)
        if self.phy == "rf":
            self._check_rf(where)

    def _check_rf(self, where: str) -> None:
        rf = self.rf
        _positive(where, "rf.center_freq_hz", rf.center_freq_hz)
        if not rf.sample_rate_hz >= self.radio.total_bandwidth_hz:
            raise ConfigError(
                f"{where}: rf.sample_rate_hz: must be >= radio.total_bandwidth_hz "
                f"({self.radio.total_bandwidth_hz:g}), got {rf.sample_rate_hz!r}"
            )
        if not rf.bs_device_args or not rf.edge_device_args or not all(rf.edge_device_args):
            raise ConfigError(f"{where}: rf.bs_device_args / rf.edge_device_args: every radio needs device args")
        if rf.driver == "soapy" and not all("driver=" in a for a in (rf.bs_device_args, *rf.edge_device_args)):
            raise ConfigError(
                f"{where}: rf.edge_device_args / rf.bs_device_args: SoapySDR args need driver=... (e.g. driver=hackrf)"
            )
        if not 0 <= rf.guard_s < rf.slot_s:
            raise ConfigError(f"{where}: rf.guard_s: must be within [0, rf.slot_s), got {rf.guard_s!r}")
        if not 0 <= rf.digital_backoff_db <= 30:
            raise ConfigError(
                f"{where}: rf.digital_backoff_db: must be within [0, 30] dB, got {rf.digital_backoff_db!r}"
            )

    def _check_air(self, where: str) -> None:
        air = self.air
        for name in ("address", "medium"):
            value = getattr(air, name)
            if not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(
                    f"{where}: air.{name}: a zmq address (tcp://host:port, ipc://path) is needed, got {value!r}"
                )
        if air.address == air.medium and not air.address.endswith(":0"):
            raise ConfigError(f"{where}: air.medium: must differ from air.address ({air.address!r})")
        if not 0 <= air.max_cfo_hz <= self.radio.total_bandwidth_hz / 2000:
            raise ConfigError(
                f"{where}: air.max_cfo_hz: must be within [0, radio.total_bandwidth_hz / 2000] = "
                f"[0, {self.radio.total_bandwidth_hz / 2000:g}] Hz (the subband filters' margin), "
                f"got {air.max_cfo_hz!r}"
            )
        _positive(where, "air.clock_speed", air.clock_speed)
        if not 0.005 <= air.hangover_s <= 10:
            raise ConfigError(
                f"{where}: air.hangover_s: must be within [0.005, 10] s (the receivers need a few "
                f"ms of samples after a burst), got {air.hangover_s!r}"
            )
        if not 40 <= air.filter_attenuation_db <= 120:
            raise ConfigError(
                f"{where}: air.filter_attenuation_db: must be within [40, 120] dB, got {air.filter_attenuation_db!r}"
            )

    def device(self, device_id: int) -> DeviceProfile:
        """Profile of a device; ids beyond the list reuse it cyclically (a bench of 4 can host 8 devices)."""
        return self.devices[device_id % len(self.devices)]


def _positive(where: str, name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: {name}: must be > 0, got {value!r}")


# ----------------------------------------------------------------------------------------------- loading
def from_mapping(cls: type, data: Any, where: str, path: str = "") -> Any:
    """Build dataclass `cls` from a YAML mapping, checking names and types; errors name `where` and the field."""
    label = f"{where}: {path or '<top>'}"
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{label}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: {_join(path, f.name)}: required field is missing")
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], where, _join(path, f.name))
    return cls(**kwargs)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    label = f"{where}: {path}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{label}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{label}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{label}: unsupported field type {tp!r}")


def _read_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """CLI overrides `a.b.c=value` (value parsed as YAML) applied onto a loaded mapping."""
    data = dict(data or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: override {item!r}: expected key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def validated(cls: type, data: Any, where: str) -> Any:
    """A config object built from a mapping and checked across fields (ExperimentConfig or BenchConfig)."""
    cfg = from_mapping(cls, data, where)
    cfg.check(where)
    return cfg


def _load(cls: type, path: Path, overrides: list[str]) -> Any:
    return validated(cls, apply_overrides(_read_yaml(path) or {}, list(overrides), str(path)), str(path))


def load_experiment(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    return _load(ExperimentConfig, Path(path) if path else DEFAULT_EXPERIMENT, overrides)


def load_bench(path: str | Path | None = None, overrides: list[str] = ()) -> BenchConfig:
    return _load(BenchConfig, Path(path) if path else DEFAULT_BENCH, overrides)


def to_mapping(cfg: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_mapping(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_mapping(v) for v in cfg]
    return cfg
