"""Config files in, typed configs out: YAML reading, dotted KEY=VALUE overrides, and one-line errors.

Every failure is a ConfigError whose message is one line naming the file, the dotted key path, the bad value
and what is allowed (`hw_configs/sim.yaml: channel.fading = 'bogus': expected one of 'rayleigh', 'rician',
'none'`), so a CLI can print it as is and a typo in a lab's bench file points at itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from config.base import REPO_ROOT, ConfigError, ConfigModel, RuleError
from config.bench import BenchConfig
from config.experiment import ExperimentConfig
from config.per_curve import PerCurveTable

DEFAULT_EXPERIMENT = REPO_ROOT / "experiments" / "default.yaml"
DEFAULT_BENCH = REPO_ROOT / "hw_configs" / "sim.yaml"

M = TypeVar("M", bound=BaseModel)


# ----------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where 1e6 and 1.0e6 are strings; in a config they are numbers, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as a config means it (safe loading; 1e6 is a number)."""
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def read_yaml(path: Path) -> Any:
    """A config file's content; an unreadable or malformed file is a one-line ConfigError."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {_yaml_problem(exc)}") from None


# ----------------------------------------------------------------------------------------------- overrides
def _with(node: Any, parts: Sequence[str], value: Any) -> Any:
    """`node` with `value` at the key path `parts`, copied along the path (a list takes an integer index)."""
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(node, list) and head.isdigit() and int(head) < len(node):
        items = list(node)
        items[int(head)] = _with(items[int(head)], rest, value)
        return items
    mapping = dict(node) if isinstance(node, Mapping) else {}
    mapping[head] = _with(mapping.get(head), rest, value)
    return mapping


def apply_overrides(data: Any, overrides: Sequence[str], where: str) -> Any:
    """CLI overrides `a.b.c=value` (the value read as YAML; `devices.1.distance_m=30` indexes a list)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not all(key.split(".")):
            raise ConfigError(f"{where}: override {item!r}: expected KEY=VALUE with a dotted key, e.g. round.rounds=3")
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: {key} = {raw!r}: not a YAML value: {_yaml_problem(exc)}") from None
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{where}: top level = {_show(data)}: expected a mapping")
        data = _with(data, key.split("."), value)
    return data


def _override_paths(overrides: Sequence[str]) -> frozenset[str]:
    paths = set()
    for item in overrides:
        parts = item.partition("=")[0].split(".")
        paths.add(_path([int(p) if p.isdigit() else p for p in parts]))
    return frozenset(paths)


# ----------------------------------------------------------------------------------------------- errors
_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "finite_number": "expected a finite number",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _path(loc: Sequence[int | str]) -> str:
    """('devices', 1, 'distance_m') -> devices[1].distance_m; pydantic's '[key]' marker (a bad mapping key) drops."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":
            text += f".{part}" if text else part
    return text or "top level"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unwrap(tp: Any) -> Any:
    """The type under Annotated[...] and Optional[...]."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or type(tp).__name__ == "UnionType":
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def _keys_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys the model section at `loc` allows (for naming them after an unknown one)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        else:
            args = get_args(tp)
            if get_origin(tp) is dict and len(args) == 2:
                tp = args[1]
            elif get_origin(tp) is tuple and args:
                tp = args[0] if args[-1] is Ellipsis or not isinstance(part, int) else args[min(part, len(args) - 1)]
            else:
                return []
    tp = _unwrap(tp)
    return sorted(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _allowed(error: ErrorDetails, model: type[BaseModel]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind in _BOUNDS:
        bound = ctx.get(_BOUND_KEYS[kind])
        return f"expected {_BOUNDS[kind]} {f'{bound:g}' if isinstance(bound, float) else bound}"
    if kind == "literal_error":
        return f"expected one of {str(ctx.get('expected', '')).replace(' or ', ', ')}"
    if kind == "extra_forbidden":
        keys = _keys_at(model, error["loc"][:-1])
        return "unknown key" + (f"; allowed: {', '.join(keys)}" if keys else "")
    if kind in ("too_short", "string_too_short"):
        what = "character" if kind == "string_too_short" else "item"
        return f"expected at least {ctx.get('min_length')} {what}(s)"
    if kind in ("too_long", "string_too_long"):
        what = "character" if kind == "string_too_long" else "item"
        return f"expected at most {ctx.get('max_length')} {what}(s)"
    message = " ".join(str(error["msg"]).split())
    return "expected " + message.removeprefix("Input should be ") if message.startswith("Input should be ") else message


def describe(exc: ValidationError, model: type[BaseModel], where: str, overridden: Collection[str] = ()) -> str:
    """One line for the first problem pydantic found: file, dotted key path, bad value, what is allowed."""
    error = exc.errors()[0]
    loc = error["loc"]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, RuleError):
        path, value, allowed = _path([*loc, *cause.key.split(".")]), cause.value, cause.allowed
    else:
        path, value, allowed = _path(loc), error["input"], _allowed(error, model)
    origin = ""
    if any(path == p or path.startswith((f"{p}.", f"{p}[")) for p in overridden):
        origin = " (set by an override)"
    if error["type"] == "missing":
        return f"{where}: {path}: required {'item' if loc and isinstance(loc[-1], int) else 'key'} is missing{origin}"
    return f"{where}: {path} = {_show(value)}: {allowed}{origin}"


def validated(cls: type[M], data: object, where: str, overridden: Collection[str] = ()) -> M:
    """A config object built from a mapping (YAML, a BS's welcome) and checked; errors name `where` and the key."""
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate({} if data is None else data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, cls, where, overridden)) from None


def to_mapping(cfg: ConfigModel) -> dict[str, Any]:
    """Config -> plain YAML/JSON-able mapping with the YAML key names (tuples become lists)."""
    return cfg.model_dump(mode="json")


# bench keys that say where a run's processes meet and where its files are, not what it measures: a resumed run's
# checkpoint and a sweep's finished trial are compared without them (a run binds fresh ports; keys are per run)
BENCH_WIRING_KEYS: tuple[tuple[str, ...], ...] = (
    ("addresses",),
    ("air", "address"),
    ("air", "medium"),
    ("security", "keys_dir"),
    ("per_curve",),
    ("channel", "true_per_curve"),
)


def drop_keys(mapping: dict[str, Any], paths: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """The mapping without the keys at these dotted paths (in place; missing ones are fine): what a comparison of
    configurations leaves out because it does not change what runs (file paths, addresses)."""
    for path in paths:
        parent: Any = mapping
        for key in path[:-1]:
            parent = parent.get(key, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return mapping


# ----------------------------------------------------------------------------------------------- files
def read_per_curve(path: str | Path) -> PerCurveTable:
    """A PER-curve file (YAML, or JSON by its suffix): the one reader of that format."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read PER curve file: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else parse_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:
        problem = _yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else " ".join(str(exc).split())
        raise ConfigError(f"{path}: cannot parse PER curve file: {problem}") from None
    return validated(PerCurveTable, doc, str(path))


def _read_bench_curve(given: str, source: Path, key: str) -> tuple[str, PerCurveTable]:
    """A PER-curve path the bench names (relative: from the bench file's folder), resolved, and its table."""
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = source.parent / path
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(
            f"{source}: {key} = {given!r}: no such file ({path}; a relative path starts at the bench file's folder)"
        )
    try:
        return str(path), read_per_curve(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the {key} of {source})") from None


def _with_per_curve_table(data: Any, source: Path) -> Any:
    """Resolve the bench's per_curve (the controller's and the link's) and channel.true_per_curve (the sim link's
    only) from the bench file's folder and carry each file's content along."""
    if not isinstance(data, Mapping):
        return data  # a wrong type that validation names
    if isinstance(data.get("per_curve"), str):
        path, table = _read_bench_curve(data["per_curve"], source, "per_curve")
        data = {**data, "per_curve": path, "per_curve_table": table}
    channel = data.get("channel")
    if isinstance(channel, Mapping) and isinstance(channel.get("true_per_curve"), str):
        path, table = _read_bench_curve(channel["true_per_curve"], source, "channel.true_per_curve")
        data = {**data, "channel": {**channel, "true_per_curve": path, "true_per_curve_table": table}}
    return data


def _with_bs_paths(data: Any, source: Path) -> Any:
    """security.keys_dir and replay.trace, relative to the bench file's folder, resolved (the BS reads them; edges
    never do); a trace that is not there is named now, not when the run starts."""
    for section, key in (("security", "keys_dir"), ("replay", "trace")):
        part = data.get(section) if isinstance(data, Mapping) else None
        if isinstance(part, Mapping) and isinstance(part.get(key), str):
            path = Path(part[key]).expanduser()
            path = (path if path.is_absolute() else source.parent / path).resolve()
            if key == "trace" and not path.is_file():
                raise ConfigError(f"{source}: replay.trace = {part[key]!r}: no such file ({path})")
            data = {**data, section: {**part, key: str(path)}}
    return data


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    source = Path(path) if path else DEFAULT_EXPERIMENT
    data = apply_overrides(read_yaml(source), overrides, str(source))
    return validated(ExperimentConfig, data, str(source), _override_paths(overrides))


def load_bench(path: str | Path | None = None, overrides: Sequence[str] = ()) -> BenchConfig:
    source = Path(path) if path else DEFAULT_BENCH
    data = _with_per_curve_table(apply_overrides(read_yaml(source), overrides, str(source)), source)
    data = _with_bs_paths(data, source)
    return validated(BenchConfig, data, str(source), _override_paths(overrides))
