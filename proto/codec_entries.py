"""One entry of an update's body: its kinds and limits, how it is written, how many bytes it takes, and how it
is read back from untrusted bytes (the layout is in proto.codec's docstring; proto.codec assembles the message).

Reading treats the body as hostile: every length is checked against the bytes actually present before anything
is allocated, the values a message may decode to are capped at MAX_VALUES (kind 2 costs no bytes), in version 2
the component axis of every LoRA key must equal the header's rank (so every kept mask is (rank,), as aggregation
needs), both factors of a module are coded alike (by components with one kept mask, or whole: dense or zero), shapes
may be checked against what the receiver expects, keys are printable (an error naming one stays one line), and NaN/Inf
are refused. Every failure is a `CodecError` that says what and where.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

KIND_DENSE, KIND_COMPONENTS, KIND_ZERO = 0, 1, 2
MAX_KEY_BYTES = 512
MAX_BODY_BYTES = 64 * 2**20  # largest body, stored or inflated, a receiver accepts
MAX_VALUES = 2 * MAX_BODY_BYTES // 4  # values a message may decode to (128 MiB as float32); kind 2 costs no bytes
_KEY_LEN = struct.Struct(">H")
_KIND_NDIM = struct.Struct(">BB")
_DIM_BYTES = 4  # u32 per dimension
_V1_COUNT = struct.Struct(">H")  # version 1: kept count before the kept indices (u8 each)


class CodecError(ValueError):
    """Update bytes are malformed or do not match what the receiver expects."""


def component_axis(key: str) -> int | None:
    """Axis that indexes rank components: rows of A, columns of B; None for dense (head) tensors."""
    if key.endswith(".lora_A"):
        return 0
    if key.endswith(".lora_B"):
        return 1
    return None


def module_path(key: str) -> str:
    return key.rsplit(".", 1)[0]


def key_bytes(key: str) -> bytes:
    """The key as written (UTF-8); CodecError if it is empty or longer than MAX_KEY_BYTES."""
    raw = key.encode()
    if not 1 <= len(raw) <= MAX_KEY_BYTES:
        raise CodecError(f"{key!r}: key of {len(raw)} bytes, outside 1..{MAX_KEY_BYTES}")
    if not key.isprintable():
        raise CodecError(f"{key!r}: key has unprintable characters")
    return raw


def mask_bytes(n_components: int, n_kept: int, version: int) -> int:
    """Bytes that say which components were kept: a bitmask (v2) or a count and an index list (v1)."""
    return (n_components + 7) // 8 if version >= 2 else _V1_COUNT.size + n_kept


def encode_entry(
    key: str, values: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_] | None, dtype: np.dtype[Any], version: int
) -> bytes:
    """One entry: dense, only the components `mask` keeps (LoRA keys), or (v2) zero when sent dense and all zero."""
    axis = component_axis(key)
    if mask is not None and axis is None:
        raise CodecError(f"{key}: only .lora_A/.lora_B tensors can be sent by components")
    kind = KIND_COMPONENTS if mask is not None else KIND_ZERO if version >= 2 and not values.any() else KIND_DENSE
    raw_key = key_bytes(key)
    out = bytearray(_KEY_LEN.pack(len(raw_key)) + raw_key)
    out += _KIND_NDIM.pack(kind, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
    if kind == KIND_ZERO:
        return bytes(out)
    if mask is not None and axis is not None:
        if len(mask) != values.shape[axis]:
            raise CodecError(f"{key}: kept mask has {len(mask)} entries for {values.shape[axis]} components")
        idx = np.flatnonzero(mask)
        if version == 1:
            out += _V1_COUNT.pack(len(idx)) + idx.astype(np.uint8).tobytes()
        else:
            out += np.packbits(mask, bitorder="little").tobytes()
        values = np.take(values, idx, axis=axis)
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the key
        stored = np.ascontiguousarray(values).astype(dtype)
    if not np.isfinite(stored).all():  # finite as float32, but not in this dtype: the receiver would refuse it
        raise CodecError(f"{key}: values beyond the range of {dtype.name} (largest {largest_value(dtype):g})")
    out += stored.tobytes()
    return bytes(out)


def largest_value(dtype: np.dtype[Any]) -> float:
    """The largest magnitude a value of `dtype` can carry."""
    return float(np.finfo(dtype).max)


def entry_size(key: str, shape: Sequence[int], itemsize: int, version: int, *, n_kept: int | None, zero: bool) -> int:
    """len(encode_entry(...)) from the shape alone: n_kept components sent (None: dense), zero: all-zero values."""
    dims = tuple(int(d) for d in shape)
    size = _KEY_LEN.size + len(key_bytes(key)) + _KIND_NDIM.size + _DIM_BYTES * len(dims)
    axis = component_axis(key)
    if n_kept is not None:
        if axis is None or len(dims) != 2:
            raise CodecError(f"{key}: only 2-D .lora_A/.lora_B tensors can be sent by components")
        if not 0 <= n_kept <= dims[axis]:
            raise CodecError(f"{key}: {n_kept} kept components of {dims[axis]}")
        return size + mask_bytes(dims[axis], n_kept, version) + n_kept * dims[1 - axis] * itemsize
    if zero and version >= 2:
        return size
    return size + math.prod(dims) * itemsize


def parse_entries(
    body: bytes,
    version: int,
    dtype: np.dtype[Any],
    rank: int,
    n_entries: int,
    expected: Mapping[str, tuple[int, ...]] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The entries of an inflated body: full-shape tensors (unsent components zero) and the kept masks."""
    reader = _Reader(body, 0, len(body))
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    coding: dict[str, tuple[str, bool]] = {}  # module path -> (its first factor's key, sent by components)
    budget = MAX_VALUES  # values this message may still decode to
    for i in range(n_entries):
        key_len = reader.unpack(">H", f"entry {i} key length")[0]
        if key_len == 0 or key_len > MAX_KEY_BYTES:
            raise CodecError(f"entry {i}: key length {key_len} out of range 1..{MAX_KEY_BYTES}")
        try:
            key = reader.take(key_len, f"entry {i} key").decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"entry {i}: key is not UTF-8") from None
        if not key.isprintable():
            raise CodecError(f"entry {i}: key {key!r} has unprintable characters")
        if key in state:
            raise CodecError(f"{key}: appears twice")
        kind, ndim = reader.unpack(">BB", f"{key} kind/ndim")
        if ndim not in (1, 2):
            raise CodecError(f"{key}: {ndim} dimensions (only 1 or 2 are valid)")
        shape = reader.unpack(f">{ndim}I", f"{key} shape")
        if expected is not None:
            want = expected.get(key)
            if want is None:
                raise CodecError(f"{key}: not part of the expected module")
            if tuple(want) != tuple(shape):
                raise CodecError(f"{key}: shape {tuple(shape)} does not match the expected {tuple(want)}")
        axis = component_axis(key)
        if version >= 2 and axis is not None and (ndim != 2 or shape[axis] != rank):
            raise CodecError(
                f"{key}: shape {tuple(shape)} does not have the header's rank {rank} on its component axis"
            )
        count = math.prod(shape)
        if kind == KIND_DENSE:
            values = reader.array(dtype, shape, key)  # bounded by the bytes present
            budget = _spend(budget, count, key)
        elif kind == KIND_ZERO and version >= 2:
            budget = _spend(budget, count, key)  # no bytes back a zero entry: only the budget bounds it
            values = np.zeros(shape, dtype=np.float32)
        elif kind == KIND_COMPONENTS:
            if axis is None or ndim != 2:
                raise CodecError(f"{key}: component coding is only valid for 2-D .lora_A/.lora_B tensors")
            n_comp = shape[axis]
            idx = _read_v1_indices(reader, key, n_comp) if version == 1 else _read_bitmask(reader, key, n_comp)
            sent_shape = list(shape)
            sent_shape[axis] = len(idx)
            sent = reader.array(dtype, tuple(sent_shape), key)
            budget = _spend(budget, count, key)  # the unsent components are zeros nobody paid bytes for
            values = np.zeros(shape, dtype=np.float32)
            if axis == 0:
                values[idx, :] = sent
            else:
                values[:, idx] = sent
            mask = torch.zeros(n_comp, dtype=torch.bool)
            mask[torch.from_numpy(idx)] = True
            path = module_path(key)
            if path in kept and not torch.equal(kept[path], mask):
                raise CodecError(f"{key}: kept components differ from its pair's")
            kept[path] = mask
        else:
            raise CodecError(f"{key}: unknown entry kind {kind} for format version {version}")
        if axis is not None:
            _check_coded_alike(coding, key, kind == KIND_COMPONENTS)
        state[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if reader.pos != reader.end:
        raise CodecError(f"{reader.end - reader.pos} unparsed bytes after the last entry")
    if expected is not None and set(expected) != set(state):
        missing = sorted(set(expected) - set(state))
        raise CodecError(f"missing entries for the expected module: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return state, kept


def _check_coded_alike(coding: dict[str, tuple[str, bool]], key: str, components: bool) -> None:
    """Both factors of a module by components (one kept mask) or both whole: a mask on one factor only would make
    aggregation count the other factor's components as unsent, or its unsent components as sent."""
    path = module_path(key)
    first, first_components = coding.setdefault(path, (key, components))
    if first_components != components:
        coded = {True: "by kept components", False: "whole (dense or zero)"}
        raise CodecError(
            f"{path}: {first.rsplit('.', 1)[1]} is sent {coded[first_components]} but {key.rsplit('.', 1)[1]} "
            f"{coded[components]}; both factors of a module must be coded alike"
        )


def _spend(budget: int, count: int, key: str) -> int:
    """What is left of the message's value budget after `count` more values; CodecError past the limit."""
    if count > budget:
        raise CodecError(f"{key}: decoding {count} more values would exceed the limit of {MAX_VALUES} per update")
    return budget - count


def _read_v1_indices(reader: _Reader, key: str, n_comp: int) -> npt.NDArray[np.int64]:
    """Version 1: n_kept u16, then that many increasing u8 indices."""
    n_kept = reader.unpack(">H", f"{key} kept count")[0]
    if n_kept > n_comp:
        raise CodecError(f"{key}: {n_kept} kept components of only {n_comp}")
    idx = np.frombuffer(reader.take(n_kept, f"{key} kept indices"), dtype=np.uint8).astype(np.int64)
    if (idx >= n_comp).any() or (len(idx) > 1 and (np.diff(idx) <= 0).any()):
        raise CodecError(f"{key}: kept component indices must be increasing and < {n_comp}")
    return idx


def _read_bitmask(reader: _Reader, key: str, n_comp: int) -> npt.NDArray[np.int64]:
    """Version 2: ceil(n_comp / 8) bytes, LSB first; bits past n_comp must be 0 (one encoding per mask)."""
    raw = reader.take((n_comp + 7) // 8, f"{key} kept bitmask")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[n_comp:].any():
        raise CodecError(f"{key}: kept bitmask sets bits past its {n_comp} components")
    return np.flatnonzero(bits[:n_comp]).astype(np.int64)


class _Reader:
    """Bounds-checked cursor over the body: nothing is read or allocated past what is present."""

    def __init__(self, data: bytes, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise CodecError(f"truncated: {what} needs {n} bytes, {self.end - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return tuple(struct.unpack(fmt, self.take(struct.calcsize(fmt), what)))

    def array(self, dtype: np.dtype[Any], shape: tuple[int, ...], what: str) -> npt.NDArray[np.float32]:
        count = math.prod(shape)
        if count * dtype.itemsize > self.end - self.pos:
            raise CodecError(f"truncated: {what} claims {count} values, {self.end - self.pos} bytes left")
        values = np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype).astype(np.float32)
        if not np.isfinite(values).all():
            raise CodecError(f"{what}: contains NaN or Inf")
        return values.reshape(shape)
