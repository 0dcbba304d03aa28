"""Update codec: the bytes a LoRA update (or the global adapter view) occupies on the air.

Layout (big-endian), version 1:

    header  magic "FLUP" | version u8 | dtype u8 (1 fp16, 2 fp32) | flags u8 (0) | reserved u8 (0)
            round u32 | device u16 | rank u8 | depth u8 | entries u16 | body_len u32
    entry   key_len u16 | key (utf-8) | kind u8 | ndim u8 | dims u32 x ndim
            kind 0 (dense):       values (dtype) of prod(dims)
            kind 1 (components):  n_kept u16 | kept component indices u8 x n_kept | values of the kept
                                  components only (rows of a `.lora_A`, columns of a `.lora_B`)
    trailer CRC-32 of header and body, u32

`decode_update` treats its input as hostile: the CRC is checked before parsing, every length is checked
against the bytes actually present before anything is allocated, shapes may be checked against what the
receiver expects, and NaN/Inf are refused. Every failure is a `CodecError` that says what and where.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from fedlora.lora import AdapterState, ModuleSpec

MAGIC = b"FLUP"
VERSION = 1
_HEADER = struct.Struct(">4sBBBBIHBBHI")
_CRC = struct.Struct(">I")
_DTYPES = {1: np.dtype(">f2"), 2: np.dtype(">f4")}
_DTYPE_CODES = {"fp16": 1, "fp32": 2}
KIND_DENSE, KIND_COMPONENTS = 0, 1
MAX_KEY_BYTES = 512
MAX_ENTRIES = 4096


class CodecError(ValueError):
    """Update bytes are malformed or do not match what the receiver expects."""


@dataclass
class DecodedUpdate:
    round_idx: int
    device_id: int
    spec: ModuleSpec
    dtype: str
    state: AdapterState  # full shapes for the spec; components that were not sent are zero
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> bool (rank,), LoRA keys only


def component_axis(key: str) -> int | None:
    """Axis that indexes rank components: rows of A, columns of B; None for dense (head) tensors."""
    if key.endswith(".lora_A"):
        return 0
    if key.endswith(".lora_B"):
        return 1
    return None


def module_path(key: str) -> str:
    return key.rsplit(".", 1)[0]


def encode_update(state: AdapterState, *, spec: ModuleSpec, round_idx: int, device_id: int,
                  dtype: str = "fp16", kept: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Serialise `state`; for LoRA keys whose module is in `kept`, only the kept rank components go out."""
    if dtype not in _DTYPE_CODES:
        raise CodecError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_CODES)}")
    np_dtype = _DTYPES[_DTYPE_CODES[dtype]]
    body = bytearray()
    for key, tensor in state.items():
        values = tensor.detach().to(torch.float32).cpu().numpy()
        if not np.isfinite(values).all():
            raise CodecError(f"{key}: refusing to encode NaN/Inf values")
        key_bytes = key.encode()
        axis = component_axis(key)
        mask = kept.get(module_path(key)) if (kept is not None and axis is not None) else None
        kind = KIND_DENSE if mask is None else KIND_COMPONENTS
        body += struct.pack(">H", len(key_bytes)) + key_bytes
        body += struct.pack(">BB", kind, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
        if mask is not None:
            idx = np.flatnonzero(mask.cpu().numpy().astype(bool))
            if len(mask) != values.shape[axis]:
                raise CodecError(f"{key}: kept mask has {len(mask)} entries for {values.shape[axis]} components")
            body += struct.pack(">H", len(idx)) + idx.astype(np.uint8).tobytes()
            values = np.take(values, idx, axis=axis)
        body += np.ascontiguousarray(values).astype(np_dtype).tobytes()
    header = _HEADER.pack(MAGIC, VERSION, _DTYPE_CODES[dtype], 0, 0, round_idx, device_id, spec.rank, spec.depth,
                          len(state), len(body))
    return header + bytes(body) + _CRC.pack(zlib.crc32(header + body))


def decode_update(data: bytes, *, expected_shapes: Mapping[str, tuple[int, ...]] | None = None
                  ) -> DecodedUpdate:
    """Parse untrusted update bytes. With `expected_shapes`, the key set and every shape must match exactly."""
    data = bytes(data)
    if len(data) < _HEADER.size + _CRC.size:
        raise CodecError(f"truncated: {len(data)} bytes is shorter than header and checksum")
    (magic, version, dtype_code, flags, _reserved, round_idx, device_id, rank, depth, n_entries,
     body_len) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a LoRA update")
    if version != VERSION:
        raise CodecError(f"update format version {version} is not supported (this build reads {VERSION})")
    if dtype_code not in _DTYPES:
        raise CodecError(f"unknown value dtype code {dtype_code}")
    if flags:
        raise CodecError(f"unknown flags 0x{flags:02x}")
    actual_body = len(data) - _HEADER.size - _CRC.size
    if body_len != actual_body:
        raise CodecError(f"length mismatch: header says body of {body_len} bytes, {actual_body} present "
                         f"({'truncated' if body_len > actual_body else 'trailing bytes'})")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[:-_CRC.size]) != crc:
        raise CodecError("checksum mismatch: the update was corrupted")
    if n_entries > MAX_ENTRIES:
        raise CodecError(f"{n_entries} entries exceed the limit of {MAX_ENTRIES}")
    if rank < 1 or depth < 1:
        raise CodecError(f"invalid module layout rank={rank} depth={depth}")
    np_dtype = _DTYPES[dtype_code]
    reader = _Reader(data, _HEADER.size, len(data) - _CRC.size)
    state: AdapterState = {}
    kept: dict[str, torch.Tensor] = {}
    for i in range(n_entries):
        key_len = reader.unpack(">H", f"entry {i} key length")[0]
        if key_len == 0 or key_len > MAX_KEY_BYTES:
            raise CodecError(f"entry {i}: key length {key_len} out of range 1..{MAX_KEY_BYTES}")
        try:
            key = reader.take(key_len, f"entry {i} key").decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"entry {i}: key is not UTF-8") from None
        if key in state:
            raise CodecError(f"{key}: appears twice")
        kind, ndim = reader.unpack(">BB", f"{key} kind/ndim")
        if ndim not in (1, 2):
            raise CodecError(f"{key}: {ndim} dimensions (only 1 or 2 are valid)")
        shape = reader.unpack(f">{ndim}I", f"{key} shape")
        if expected_shapes is not None:
            want = expected_shapes.get(key)
            if want is None:
                raise CodecError(f"{key}: not part of the expected module")
            if tuple(want) != tuple(shape):
                raise CodecError(f"{key}: shape {tuple(shape)} does not match the expected {tuple(want)}")
        axis = component_axis(key)
        if kind == KIND_DENSE:
            values = reader.array(np_dtype, shape, key)
        elif kind == KIND_COMPONENTS:
            if axis is None or ndim != 2:
                raise CodecError(f"{key}: component coding is only valid for 2-D .lora_A/.lora_B tensors")
            n_kept = reader.unpack(">H", f"{key} kept count")[0]
            n_comp = shape[axis]
            if n_kept > n_comp:
                raise CodecError(f"{key}: {n_kept} kept components of only {n_comp}")
            idx = np.frombuffer(reader.take(n_kept, f"{key} kept indices"), dtype=np.uint8).astype(np.int64)
            if (idx >= n_comp).any() or (len(idx) > 1 and (np.diff(idx) <= 0).any()):
                raise CodecError(f"{key}: kept component indices must be increasing and < {n_comp}")
            sent_shape = list(shape)
            sent_shape[axis] = n_kept
            sent = reader.array(np_dtype, tuple(sent_shape), key)
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
            raise CodecError(f"{key}: unknown entry kind {kind}")
        state[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if reader.pos != reader.end:
        raise CodecError(f"{reader.end - reader.pos} unparsed bytes after the last entry")
    if expected_shapes is not None and set(expected_shapes) != set(state):
        missing = sorted(set(expected_shapes) - set(state))
        raise CodecError(f"missing entries for the expected module: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    dtype_name = {v: k for k, v in _DTYPE_CODES.items()}[dtype_code]
    return DecodedUpdate(round_idx, device_id, ModuleSpec(rank, depth), dtype_name, state, kept)


class _Reader:
    """Bounds-checked cursor over the body: nothing is read or allocated past what is present."""

    def __init__(self, data: bytes, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise CodecError(f"truncated: {what} needs {n} bytes, {self.end - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def array(self, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if count * dtype.itemsize > self.end - self.pos:
            raise CodecError(f"truncated: {what} claims {count} values, {self.end - self.pos} bytes left")
        values = np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype).astype(np.float32)
        if not np.isfinite(values).all():
            raise CodecError(f"{what}: contains NaN or Inf")
        return values.reshape(shape)


def expected_shapes(state: AdapterState) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
