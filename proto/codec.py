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
  kept masks, which airtime planning and byte-count tests rely on: `encoded_size` computes it without encoding
  anything (the controller's cost model asks it).  Measured on MiniLM deltas, deflate saves ~8 % of an fp16
  update (mostly the key strings and exponent bits) for ~7 ms per 150 kB; lzma saves ~10 % for 10x the CPU, so
  only deflate is offered.  `"auto"` keeps the deflated body only if it is strictly smaller.

`decode_update` treats its input as hostile: the CRC is checked before the body is parsed or inflated,
inflating is bounded by the header's raw_len (itself capped at MAX_BODY_BYTES), and the entries are parsed with
the bounds, budgets and pairing rules of proto.codec_entries (a module's two factors are both sent by components
with one kept mask, or both whole).  Every failure is a `CodecError` that says what and where.  Modules may be coded
differently from each other: a module sent whole has no mask in `kept`, and aggregation counts all its components.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from proto.codec_entries import KIND_COMPONENTS as KIND_COMPONENTS
from proto.codec_entries import KIND_DENSE as KIND_DENSE
from proto.codec_entries import KIND_ZERO as KIND_ZERO
from proto.codec_entries import MAX_BODY_BYTES as MAX_BODY_BYTES
from proto.codec_entries import MAX_KEY_BYTES as MAX_KEY_BYTES
from proto.codec_entries import MAX_VALUES as MAX_VALUES
from proto.codec_entries import CodecError as CodecError
from proto.codec_entries import component_axis as component_axis
from proto.codec_entries import encode_entry, entry_size, parse_entries
from proto.codec_entries import largest_value as largest_dtype_value
from proto.codec_entries import module_path as module_path

MAGIC = b"FLUP"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
_PREFIX = struct.Struct(">4sB")
_HEADER = struct.Struct(">4sBBBBIHBBHI")  # version 1
_HEADER_V2 = struct.Struct(">4sBBBBIHBBHII")  # version 2: + raw_len
_HEADERS = {1: _HEADER, 2: _HEADER_V2}
_CRC = struct.Struct(">I")
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype(">f2"), 2: np.dtype(">f4")}
_DTYPE_CODES = {"fp16": 1, "fp32": 2}
FLAG_DEFLATE = 0x01  # v2: body is raw deflate (RFC 1951) of raw_len bytes of entries
_KNOWN_FLAGS = FLAG_DEFLATE
MAX_ENTRIES = 4096
_DEFLATE_LEVEL = 9  # 150 kB in ~7 ms; lower levels are no faster on float data and compress less
Compress = Literal["never", "auto", "always"]
AdapterState = dict[str, torch.Tensor]  # key -> tensor, fedlora.lora's name for it


@dataclass(frozen=True)
class ModuleSpec:
    """A device's LoRA module, as the header carries it: a view of the global adapter (fedlora.lora)."""

    rank: int  # r, 1..R: keeps rank components 0..r-1
    depth: int  # LoRA only on the top `depth` layers (layer index >= L - depth); 1..L


@dataclass
class DecodedUpdate:
    round_idx: int
    device_id: int
    spec: ModuleSpec
    dtype: str
    state: AdapterState  # full shapes for the spec; components that were not sent are zero
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> bool (rank,): modules by components
    version: int = VERSION
    compressed: bool = False


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
    np_dtype = _check_format(dtype, version, len(state))
    if compress not in ("never", "auto", "always"):
        raise CodecError(f"compress must be 'never', 'auto' or 'always', got {compress!r}")
    if version == 1 and compress == "always":
        raise CodecError("format version 1 has no compression; use version 2 or compress='never'")
    body = bytearray()
    for key, tensor in state.items():
        values = tensor.detach().to(torch.float32).cpu().numpy()
        if not np.isfinite(values).all():
            raise CodecError(f"{key}: refusing to encode NaN/Inf values")
        mask = kept.get(module_path(key)) if (kept is not None and component_axis(key) is not None) else None
        flags = None if mask is None else mask.detach().cpu().numpy().astype(bool).reshape(-1)
        body += encode_entry(key, values, flags, np_dtype, version)
    if len(body) > MAX_BODY_BYTES:
        raise CodecError(f"body of {len(body)} bytes exceeds the receivers' limit of {MAX_BODY_BYTES}")
    layout = (spec.rank, spec.depth, len(state), len(body))
    if version == 1:
        header = _HEADER.pack(MAGIC, 1, _DTYPE_CODES[dtype], 0, 0, round_idx, device_id, *layout)
        return header + bytes(body) + _CRC.pack(zlib.crc32(header + body))
    raw, flags_byte = bytes(body), 0
    stored = raw
    if compress != "never":
        packer = zlib.compressobj(_DEFLATE_LEVEL, zlib.DEFLATED, -15)  # raw deflate: the CRC already guards it
        deflated = packer.compress(raw) + packer.flush()
        if compress == "always" or len(deflated) < len(raw):
            stored, flags_byte = deflated, FLAG_DEFLATE
    header = _HEADER_V2.pack(
        MAGIC, 2, _DTYPE_CODES[dtype], flags_byte, 0, round_idx, device_id, *layout[:3], len(stored), len(raw)
    )
    return header + stored + _CRC.pack(zlib.crc32(header + stored))


def encoded_size(
    shapes: Mapping[str, Sequence[int]],
    *,
    dtype: str = "fp16",
    kept: int | Mapping[str, int] | None = None,
    zero_keys: Collection[str] = (),
    version: int = VERSION,
) -> int:
    """len(encode_update(...)) of an update with these entries, from the shapes alone (nothing is encoded).

    `shapes`: every entry's full shape (LoRA keys at the update's rank).  `kept`: the components sent per LoRA
    module -- one count for every module, a count per module path (modules left out go dense), or None (dense,
    no masks).  `zero_keys`: keys sent dense whose values are all zero (version 2 writes their shape only).
    Exact for compress="never" (the default).  An upper bound where the values decide: for compress="auto"
    (deflate is kept only if smaller) and for a dense tensor that turns out all zero without being in
    `zero_keys`.  With compress="always" incompressible values can come out a few bytes larger than this."""
    itemsize = _check_format(dtype, version, len(shapes)).itemsize
    size = _HEADERS[version].size + _CRC.size
    for key, shape in shapes.items():
        n_kept = None
        if component_axis(key) is not None:
            n_kept = kept.get(module_path(key)) if isinstance(kept, Mapping) else kept
        size += entry_size(key, shape, itemsize, version, n_kept=n_kept, zero=key in zero_keys)
    return size


def largest_value(dtype: str) -> float:
    """The largest magnitude a value encoded as `dtype` ("fp16", "fp32") can carry; encode_update refuses more."""
    return largest_dtype_value(_check_format(dtype, VERSION, 0))


def _check_format(dtype: str, version: int, n_entries: int) -> np.dtype[Any]:
    """The value dtype of a writable (dtype, version, entry count); CodecError otherwise."""
    if dtype not in _DTYPE_CODES:
        raise CodecError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_CODES)}")
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(f"cannot write format version {version}; supported: {SUPPORTED_VERSIONS}")
    if n_entries > MAX_ENTRIES:
        raise CodecError(f"{n_entries} entries exceed the limit of {MAX_ENTRIES}")
    return _DTYPES[_DTYPE_CODES[dtype]]


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
    state, kept = parse_entries(body, version, _DTYPES[dtype_code], rank, n_entries, expected_shapes)
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


def expected_shapes(state: AdapterState) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
