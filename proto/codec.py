"""Update codec: the bytes a LoRA update (or the global adapter view) occupies on the air.

Layout (big-endian), version 2 (written by default):

    header  magic "FLUP" | version u8 (2) | dtype u8 (1 fp16, 2 fp32) | flags u8 | reserved u8 (0)
            round u32 | device u16 | rank u8 | depth u8 | entries u16 | body_len u32 | raw_len u32
    body    the entries, deflated (raw deflate, no zlib header) when flags bit 0 is set, else as is;
            body_len = bytes stored, raw_len = bytes of entries once inflated (== body_len if not deflated)
    entry   key_len u16 | key (utf-8) | kind u8 | ndim u8 | dims u32 x ndim
            kind 0 (dense):       values (dtype) of prod(dims)
            kind 1 (components):  kept bitmask, ceil(rank / 8) bytes (component i = bit i % 8 of byte i // 8,
                                  least significant bit first; padding bits 0) | values of the kept components
                                  only (rows of a `.lora_A`, columns of a `.lora_B`)
            kind 2 (zero):        nothing: the tensor is all zero (b_only's frozen A)
    trailer CRC-32 of header and stored body, u32

Version 1 (still decoded; `encode_update(version=1)` writes it for old receivers): the header has no raw_len,
flags must be 0, there is no kind 2, and kind 1 is `n_kept u16 | kept indices u8 x n_kept | values`.

Why these choices:
* Kept components as a bitmask, always: for rank <= 16 it is never larger than v1's count + index list
  (rank 8: 1 byte instead of 2 + k), and at the largest rank the header allows (255) it costs at most 29 bytes
  more than the list per entry -- less than one fp16 value row of any real layer.  One representation means
  one decoder path to harden, and sortedness / no duplicates hold by construction.
* Kind 2 is written only for tensors sent densely that are entirely zero (+0 and -0 alike; they decode to +0).
  A component-coded key stays kind 1 even when its kept values are zero: its mask says which components the
  device *sent*, which aggregation needs, while kind 2 says "sent, and the change is zero".
* Compression is off by default (`compress="never"`): the size is then a pure function of the shapes and the
  kept masks, which airtime planning and byte-count tests can rely on.  Measured on MiniLM deltas, deflate saves
  ~8 % of an fp16 update (mostly the key strings and exponent bits) for ~7 ms per 150 kB; lzma saves ~10 % for
  10x the CPU, so only deflate is offered.  `"auto"` keeps the deflated body only if it is strictly smaller.

`decode_update` treats its input as hostile: the CRC is checked before the body is parsed or inflated, every
length is checked against the bytes actually present before anything is allocated, inflating is bounded by
the header's raw_len (itself capped at MAX_BODY_BYTES), the values a message may decode to are capped at
MAX_VALUES (kind 2 costs no bytes), in v2 the component axis of every LoRA key must equal the header's rank
(so every kept mask is (rank,), as aggregation needs), shapes may be checked against what the receiver
expects, and NaN/Inf are refused.  Every failure is a `CodecError` that says what and where.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from fedlora.lora import AdapterState, ModuleSpec

MAGIC = b"FLUP"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
_PREFIX = struct.Struct(">4sB")
_HEADER = struct.Struct(">4sBBBBIHBBHI")  # version 1
_HEADER_V2 = struct.Struct(">4sBBBBIHBBHII")  # version 2: + raw_len
_HEADERS = {1: _HEADER, 2: _HEADER_V2}
_CRC = struct.Struct(">I")
_DTYPES = {1: np.dtype(">f2"), 2: np.dtype(">f4")}
_DTYPE_CODES = {"fp16": 1, "fp32": 2}
KIND_DENSE, KIND_COMPONENTS, KIND_ZERO = 0, 1, 2
FLAG_DEFLATE = 0x01  # v2: body is raw deflate (RFC 1951) of raw_len bytes of entries
_KNOWN_FLAGS = FLAG_DEFLATE
MAX_KEY_BYTES = 512
MAX_ENTRIES = 4096
MAX_BODY_BYTES = 64 * 2**20  # largest body, stored or inflated, a receiver accepts
MAX_VALUES = 2 * MAX_BODY_BYTES // 4  # values a message may decode to (128 MiB as float32); kind 2 costs no bytes
_DEFLATE_LEVEL = 9  # 150 kB in ~7 ms; lower levels are no faster on float data and compress less
Compress = Literal["never", "auto", "always"]


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
    version: int = VERSION
    compressed: bool = False


def component_axis(key: str) -> int | None:
    """Axis that indexes rank components: rows of A, columns of B; None for dense (head) tensors."""
    if key.endswith(".lora_A"):
        return 0
    if key.endswith(".lora_B"):
        return 1
    return None


def module_path(key: str) -> str:
    return key.rsplit(".", 1)[0]


def encode_update(
    state: AdapterState,
    *,
    spec: ModuleSpec,
    round_idx: int,
    device_id: int,
    dtype: str = "fp16",
    kept: Mapping[str, torch.Tensor] | None = None,
    compress: Compress = "never",
    version: int = VERSION,
) -> bytes:
    """Serialise `state`; for LoRA keys whose module is in `kept`, only the kept rank components go out.

    `compress`: "never" (size depends on shapes only), "always" (deflate even if it grows), "auto" (deflate
    only if strictly smaller).  `version=1` writes the old format for receivers that predate version 2."""
    if dtype not in _DTYPE_CODES:
        raise CodecError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_CODES)}")
    if compress not in ("never", "auto", "always"):
        raise CodecError(f"compress must be 'never', 'auto' or 'always', got {compress!r}")
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(f"cannot write format version {version}; supported: {SUPPORTED_VERSIONS}")
    if version == 1 and compress == "always":
        raise CodecError("format version 1 has no compression; use version 2 or compress='never'")
    if len(state) > MAX_ENTRIES:
        raise CodecError(f"{len(state)} entries exceed the limit of {MAX_ENTRIES}")
    np_dtype = _DTYPES[_DTYPE_CODES[dtype]]
    body = bytearray()
    for key, tensor in state.items():
        values = tensor.detach().to(torch.float32).cpu().numpy()
        if not np.isfinite(values).all():
            raise CodecError(f"{key}: refusing to encode NaN/Inf values")
        key_bytes = key.encode()
        if not 1 <= len(key_bytes) <= MAX_KEY_BYTES:
            raise CodecError(f"{key!r}: key of {len(key_bytes)} bytes, outside 1..{MAX_KEY_BYTES}")
        axis = component_axis(key)
        mask = kept.get(module_path(key)) if (kept is not None and axis is not None) else None
        if mask is not None:
            kind = KIND_COMPONENTS
        elif version >= 2 and not values.any():
            kind = KIND_ZERO
        else:
            kind = KIND_DENSE
        body += struct.pack(">H", len(key_bytes)) + key_bytes
        body += struct.pack(">BB", kind, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
        if kind == KIND_ZERO:
            continue
        if mask is not None:
            flags = mask.detach().cpu().numpy().astype(bool).reshape(-1)
            if len(flags) != values.shape[axis]:
                raise CodecError(f"{key}: kept mask has {len(flags)} entries for {values.shape[axis]} components")
            idx = np.flatnonzero(flags)
            if version == 1:
                body += struct.pack(">H", len(idx)) + idx.astype(np.uint8).tobytes()
            else:
                body += np.packbits(flags, bitorder="little").tobytes()
            values = np.take(values, idx, axis=axis)
        body += np.ascontiguousarray(values).astype(np_dtype).tobytes()
    if len(body) > MAX_BODY_BYTES:
        raise CodecError(f"body of {len(body)} bytes exceeds the receivers' limit of {MAX_BODY_BYTES}")
    if version == 1:
        header = _HEADER.pack(
            MAGIC, 1, _DTYPE_CODES[dtype], 0, 0, round_idx, device_id, spec.rank, spec.depth, len(state), len(body)
        )
        return header + bytes(body) + _CRC.pack(zlib.crc32(header + body))
    raw, flags_byte = bytes(body), 0
    stored = raw
    if compress != "never":
        packer = zlib.compressobj(_DEFLATE_LEVEL, zlib.DEFLATED, -15)  # raw deflate: the CRC already guards it
        deflated = packer.compress(raw) + packer.flush()
        if compress == "always" or len(deflated) < len(raw):
            stored, flags_byte = deflated, FLAG_DEFLATE
    header = _HEADER_V2.pack(
        MAGIC,
        2,
        _DTYPE_CODES[dtype],
        flags_byte,
        0,
        round_idx,
        device_id,
        spec.rank,
        spec.depth,
        len(state),
        len(stored),
        len(raw),
    )
    return header + stored + _CRC.pack(zlib.crc32(header + stored))


def decode_update(data: bytes, *, expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> DecodedUpdate:
    """Parse untrusted update bytes (version 1 or 2). With `expected_shapes`, the key set and every shape
    must match exactly."""
    data = bytes(data)
    if len(data) < _HEADER.size + _CRC.size:
        raise CodecError(f"truncated: {len(data)} bytes is shorter than header and checksum")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a LoRA update")
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(
            f"update format version {version} is not supported (this build reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    header_struct = _HEADERS[version]
    if len(data) < header_struct.size + _CRC.size:
        raise CodecError(f"truncated: {len(data)} bytes is shorter than the version {version} header and checksum")
    fields = header_struct.unpack_from(data)
    (_magic, _version, dtype_code, flags, reserved, round_idx, device_id, rank, depth, n_entries, body_len) = fields[
        :11
    ]
    raw_len = fields[11] if version >= 2 else body_len
    if dtype_code not in _DTYPES:
        raise CodecError(f"unknown value dtype code {dtype_code}")
    if version == 1 and flags:
        raise CodecError(f"unknown flags 0x{flags:02x}")
    if flags & ~_KNOWN_FLAGS:
        raise CodecError(f"unknown flags 0x{flags & ~_KNOWN_FLAGS:02x}")
    if version >= 2 and reserved:
        raise CodecError(f"reserved header byte is 0x{reserved:02x}, must be 0")
    actual_body = len(data) - header_struct.size - _CRC.size
    if body_len != actual_body:
        raise CodecError(
            f"length mismatch: header says body of {body_len} bytes, {actual_body} present "
            f"({'truncated' if body_len > actual_body else 'trailing bytes'})"
        )
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise CodecError("checksum mismatch: the update was corrupted")
    if n_entries > MAX_ENTRIES:
        raise CodecError(f"{n_entries} entries exceed the limit of {MAX_ENTRIES}")
    if rank < 1 or depth < 1:
        raise CodecError(f"invalid module layout rank={rank} depth={depth}")
    stored = data[header_struct.size : len(data) - _CRC.size]
    compressed = bool(flags & FLAG_DEFLATE)
    if raw_len > MAX_BODY_BYTES:
        raise CodecError(f"header claims a body of {raw_len} bytes, over the limit of {MAX_BODY_BYTES}")
    if compressed:
        body = _inflate(stored, raw_len)
    elif raw_len != body_len:
        raise CodecError(f"uncompressed body: raw length {raw_len} differs from the stored {body_len}")
    else:
        body = stored
    state, kept = _parse_entries(body, version, _DTYPES[dtype_code], rank, n_entries, expected_shapes)
    dtype_name = {v: k for k, v in _DTYPE_CODES.items()}[dtype_code]
    return DecodedUpdate(round_idx, device_id, ModuleSpec(rank, depth), dtype_name, state, kept, version, compressed)


def _inflate(stored: bytes, raw_len: int) -> bytes:
    """Inflate at most `raw_len` bytes (already capped): a bomb stops at the claimed size, not at memory's end."""
    inflater = zlib.decompressobj(-15)
    try:
        # one byte over the claim is enough to know it lies (and max_length=0 would mean "unbounded")
        out = inflater.decompress(stored, raw_len + 1)
    except zlib.error as e:
        raise CodecError(f"compressed body does not inflate: {e}") from None
    if len(out) > raw_len:
        raise CodecError(f"compressed body inflates to more than the {raw_len} bytes the header claims")
    if not inflater.eof:
        raise CodecError(f"compressed body is cut short: {len(out)} of the claimed {raw_len} bytes inflate")
    if inflater.unused_data:
        raise CodecError(f"{len(inflater.unused_data)} bytes after the end of the compressed body")
    if len(out) != raw_len:
        raise CodecError(f"compressed body inflates to {len(out)} bytes, the header claims {raw_len}")
    return out


def _parse_entries(
    body: bytes,
    version: int,
    np_dtype: np.dtype,
    rank: int,
    n_entries: int,
    expected: Mapping[str, tuple[int, ...]] | None,
) -> tuple[AdapterState, dict[str, torch.Tensor]]:
    reader = _Reader(body, 0, len(body))
    state: AdapterState = {}
    kept: dict[str, torch.Tensor] = {}
    budget = MAX_VALUES  # values this message may still decode to
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
        count = int(np.prod(shape, dtype=object))
        if kind == KIND_DENSE:
            values = reader.array(np_dtype, shape, key)  # bounded by the bytes present
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
            sent = reader.array(np_dtype, tuple(sent_shape), key)
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
        state[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if reader.pos != reader.end:
        raise CodecError(f"{reader.end - reader.pos} unparsed bytes after the last entry")
    if expected is not None and set(expected) != set(state):
        missing = sorted(set(expected) - set(state))
        raise CodecError(f"missing entries for the expected module: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return state, kept


def _spend(budget: int, count: int, key: str) -> int:
    """What is left of the message's value budget after `count` more values; CodecError past the limit."""
    if count > budget:
        raise CodecError(f"{key}: decoding {count} more values would exceed the limit of {MAX_VALUES} per update")
    return budget - count


def _read_v1_indices(reader: _Reader, key: str, n_comp: int) -> np.ndarray:
    """Version 1: n_kept u16, then that many increasing u8 indices."""
    n_kept = reader.unpack(">H", f"{key} kept count")[0]
    if n_kept > n_comp:
        raise CodecError(f"{key}: {n_kept} kept components of only {n_comp}")
    idx = np.frombuffer(reader.take(n_kept, f"{key} kept indices"), dtype=np.uint8).astype(np.int64)
    if (idx >= n_comp).any() or (len(idx) > 1 and (np.diff(idx) <= 0).any()):
        raise CodecError(f"{key}: kept component indices must be increasing and < {n_comp}")
    return idx


def _read_bitmask(reader: _Reader, key: str, n_comp: int) -> np.ndarray:
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
