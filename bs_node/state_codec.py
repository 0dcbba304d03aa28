"""Python state as data: a JSON tree plus named tensors, for the BS's checkpoint (no pickle, nothing executed).

What the controller and the closer hold (numbers, strings, lists, tuples, dicts with int keys, numpy and torch
arrays, numpy scalars and generators, Python's `random` state, configuration models, dataclasses and plain objects
of this repository's packages) is encoded as JSON; arrays go to the tensors dict under a name the tree refers to.
Decoding builds objects only of classes already loaded from this repository's own packages, with
`object.__new__` and their attributes (no `__init__`, no `__reduce__`, no import): a tree names data, never code.
Anything else is refused at encoding, naming the path, so a policy that grows an unsupported attribute fails its
checkpoint test, not a resume.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

OUR_PACKAGES = ("bs_node", "config", "fedlora", "link", "phy", "proto", "trust")
BIT_GENERATORS = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")


class StateCodecError(ValueError):
    """A value that cannot be encoded, or a tree that does not decode; the message names the path."""


def encode(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`value` as a JSON tree; arrays are added to `tensors`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
    if isinstance(value, torch.Tensor):
        return {"$tensor": _put(tensors, value.detach().cpu().contiguous().clone())}
    if isinstance(value, np.ndarray):
        return _encode_ndarray(value, tensors, path)
    if isinstance(value, np.generic):
        return {"$np": value.dtype.str, "value": encode(value.item(), tensors, path)}
    return _encode_container(value, tensors, path)


def _encode_container(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if type(value) is list:
        return [encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"$tuple": [encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if type(value) is dict:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"$dict": [[encode(k, tensors, path), encode(v, tensors, f"{path}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, np.random.Generator):
        return {"$generator": encode(value.bit_generator.state, tensors, path)}
    if type(value) is random.Random:
        return {"$random": encode(value.getstate(), tensors, path)}
    name = _class_name(value, path)
    if isinstance(value, BaseModel):
        return {"$model": name, "value": value.model_dump(mode="json")}
    if not hasattr(value, "__dict__"):
        raise StateCodecError(f"{path or 'state'}: {name} has no attributes to save")
    attrs = {k: encode(v, tensors, f"{path}.{k}") for k, v in vars(value).items()}
    return {"$object": name, "attrs": attrs}


def _encode_ndarray(value: np.ndarray, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if value.dtype.hasobject:
        raise StateCodecError(f"{path}: a numpy array of Python objects")
    raw = np.ascontiguousarray(value).tobytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return {"$ndarray": _put(tensors, data), "dtype": value.dtype.str, "shape": list(value.shape)}


def _put(tensors: dict[str, torch.Tensor], t: torch.Tensor) -> str:
    name = f"state/{len(tensors)}"
    tensors[name] = t
    return name


def _class_name(value: Any, path: str) -> str:
    cls = type(value)
    if cls.__module__.split(".")[0] not in OUR_PACKAGES:
        raise StateCodecError(f"{path or 'state'}: {cls.__module__}.{cls.__qualname__} cannot be saved as data")
    return f"{cls.__module__}:{cls.__qualname__}"


def decode(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """The value `encode` made of `tree`; StateCodecError naming the path of anything that does not fit."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, dict):
        raise StateCodecError(f"{path or 'state'}: {type(tree).__name__} is not JSON")
    tag = next((k for k in tree if k.startswith("$")), None)
    if tag is None:
        return {k: decode(v, tensors, f"{path}.{k}") for k, v in tree.items()}
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise StateCodecError(f"{path or 'state'}: unknown tag {tag!r}")
    try:
        return decoder(tree, tensors, path)
    except StateCodecError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise StateCodecError(f"{path or 'state'}: {tag}: {type(exc).__name__}: {exc}") from None


def _tensor(tree: dict, tensors: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    name = tree["$tensor"]
    if name not in tensors:
        raise StateCodecError(f"{path}: tensor {name!r} is not in the tensors file")
    return tensors[name]


def _ndarray(tree: dict, tensors: dict[str, torch.Tensor], path: str) -> np.ndarray:
    data = _tensor({"$tensor": tree["$ndarray"]}, tensors, path)
    dtype = np.dtype(tree["dtype"])
    if dtype.hasobject:
        raise StateCodecError(f"{path}: a numpy array of Python objects")
    return np.frombuffer(data.numpy().tobytes(), dtype=dtype).reshape([int(n) for n in tree["shape"]]).copy()


def _float(tree: dict, _tensors: dict, path: str) -> float:
    if tree["$float"] not in ("nan", "inf", "-inf"):
        raise StateCodecError(f"{path}: $float is nan, inf or -inf, not {tree['$float']!r}")
    return float(tree["$float"])


def _np_scalar(tree: dict, tensors: dict, path: str) -> Any:
    dtype = np.dtype(tree["$np"])
    if dtype.hasobject:
        raise StateCodecError(f"{path}: a numpy object scalar")
    return dtype.type(decode(tree["value"], tensors, path))


def _generator(tree: dict, tensors: dict, path: str) -> np.random.Generator:
    state = decode(tree["$generator"], tensors, path)
    name = state["bit_generator"]
    if name not in BIT_GENERATORS:
        raise StateCodecError(f"{path}: bit generator {name!r} is not one of {BIT_GENERATORS}")
    bits = getattr(np.random, name)()
    bits.state = state
    return np.random.Generator(bits)


def _random(tree: dict, tensors: dict, path: str) -> random.Random:
    rng = random.Random()
    rng.setstate(_python_random_state(decode(tree["$random"], tensors, path)))
    return rng


def _python_random_state(state: Any) -> tuple:
    """random.getstate()'s shape: (version, tuple of 625 ints, gauss or None)."""
    if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], tuple)):
        raise ValueError("not a random.getstate() tuple")
    return state


def _model(tree: dict, _tensors: dict, path: str) -> BaseModel:
    cls = _our_class(tree["$model"], path)
    if not issubclass(cls, BaseModel):
        raise StateCodecError(f"{path}: {tree['$model']} is not a configuration model")
    return cls.model_validate(tree["value"])


def _object(tree: dict, tensors: dict, path: str) -> Any:
    cls = _our_class(tree["$object"], path)
    if issubclass(cls, (BaseModel, BaseException)) or not isinstance(tree["attrs"], dict):
        raise StateCodecError(f"{path}: {tree['$object']} is not a plain object")
    obj = object.__new__(cls)
    for key, value in tree["attrs"].items():
        object.__setattr__(obj, key, decode(value, tensors, f"{path}.{key}"))
    return obj


def _our_class(name: Any, path: str) -> type:
    """A class already loaded from one of our packages (nothing is imported here)."""
    module_name, _, qualname = str(name).partition(":")
    module = sys.modules.get(module_name)
    if module_name.split(".")[0] not in OUR_PACKAGES or module is None:
        raise StateCodecError(f"{path}: {name!r} is not a loaded class of this repository")
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not isinstance(cls, type) or cls.__module__ != module_name:
        raise StateCodecError(f"{path}: {name!r} is not a class of {module_name}")
    return cls


_DECODERS = {
    "$float": _float,
    "$tensor": _tensor,
    "$ndarray": _ndarray,
    "$np": _np_scalar,
    "$tuple": lambda tree, tensors, path: tuple(decode(tree["$tuple"], tensors, path)),
    "$dict": lambda tree, tensors, path: {
        _key(decode(k, tensors, path), path): decode(v, tensors, f"{path}[{k!r}]") for k, v in tree["$dict"]
    },
    "$generator": _generator,
    "$random": _random,
    "$model": _model,
    "$object": _object,
}


def _key(key: Any, path: str) -> Any:
    if isinstance(key, (list, dict)):
        raise StateCodecError(f"{path}: a dict key that is not hashable")
    return key
