"""Mutated but well-formed LoRA updates for the BS's receive path, and the path they go through.

`UpdateFuzzer` makes, from a seed, sealed update messages that parse structurally (magic, lengths, CRC and
compression are right) but say things a well-behaved edge never says: a subset of the planned module's keys, keys
outside it, shapes off by one, the two factors of a module coded differently, random kept masks, fp16 or fp32,
format version 1 or 2, deflate, zero entries, extreme but finite values, NaN/Inf, a header naming another round,
device or module. `push` runs one through what the BS does with an update (`bs_node.global_model.receive_update`:
decode against the plan, `fedlora.aggregation.check_update`; then `aggregate` with other devices' updates) and
returns how it ended: aggregated, or rejected with a `CodecError` or an `UpdateError`. Anything else propagates:
that is a bug the fuzz test exists to find.

Reuse (trust and security work): pass your own `others` (e.g. a poisoned majority), `max_abs`, or read
`FuzzCase.mutations` to know what each case claims to break; `MUST_BE_DECODE_ERRORS` lists the mutations the
decoder must refuse by itself.
"""

from __future__ import annotations

import math
import random
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from bs_node.global_model import receive_update
from fedlora.aggregation import FLOAT32_MAX, Absent, ClientUpdate, UpdateError
from fedlora.aggregators.base import Aggregator
from fedlora.aggregators.fedavg import FedAvgAggregator
from fedlora.aggregators.flexlora import FlexLoraAggregator
from fedlora.lora import GlobalAdapter, ModuleSpec, layer_index
from proto.codec import _HEADER, _HEADER_V2, FLAG_DEFLATE, KIND_ZERO, CodecError, component_axis, module_path
from proto.codec_entries import encode_entry

Outcome = Literal["aggregated", "codec", "check"]
ROUND, DEVICE = 7, 3  # what the BS planned for every case
_NP_DTYPES: dict[str, np.dtype[Any]] = {"fp16": np.dtype(">f2"), "fp32": np.dtype(">f4")}
_DTYPE_CODES = {"fp16": 1, "fp32": 2}
# mutations the decoder refuses on its own, against the plan's shapes and header
MUST_BE_DECODE_ERRORS = frozenset(
    [
        *("drop_keys", "extra_key", "shape", "rank_axis"),  # keys and shapes against the plan's
        *("factor_coding", "non_finite"),  # the entries themselves
        *("header_round", "header_device", "header_module"),  # not what the plan named
    ]
)


@dataclass(frozen=True)
class FuzzCase:
    payload: bytes
    spec: ModuleSpec  # the module the BS planned for the device
    round_idx: int
    device_id: int
    mutations: tuple[str, ...]  # what differs from a well-behaved edge's update; () for none


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    error: str = ""  # the rejection's message


class UpdateFuzzer:
    """Seeded generator of mutated, structurally valid update messages for views of `adapter`."""

    def __init__(self, adapter: GlobalAdapter, seed: int):
        self.adapter = adapter
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.full = {k: tuple(v.shape) for k, v in adapter.state.items()}

    def cases(self, n: int) -> Iterator[FuzzCase]:
        for _ in range(n):
            yield self.case()

    def shapes(self, rank: int, depth: int) -> dict[str, tuple[int, ...]]:
        """The shapes of a (rank, depth) view, for any rank and depth a header can carry."""
        first = self.adapter.num_layers - depth
        out: dict[str, tuple[int, ...]] = {}
        for k, shape in self.full.items():
            layer = layer_index(k)
            if layer is not None and layer < first:
                continue
            axis = component_axis(k)
            out[k] = shape if axis is None else ((rank, shape[1]) if axis == 0 else (shape[0], rank))
        return out

    def case(self) -> FuzzCase:
        rng, muts = self.rng, []
        plan = ModuleSpec(rng.randint(1, self.adapter.max_rank), rng.randint(1, self.adapter.num_layers))
        header, round_idx, device_id = plan, ROUND, DEVICE
        if rng.random() < 0.03:
            header = ModuleSpec(rng.choice([r for r in range(1, 17) if r != plan.rank]), plan.depth)
            muts.append("header_module")
        if rng.random() < 0.02:
            round_idx = ROUND + rng.choice([-1, 1, 1000])
            muts.append("header_round")
        if rng.random() < 0.02:
            device_id = rng.choice([0, DEVICE + 1, 0xFFFF])
            muts.append("header_device")
        shapes = self._mutate_keys(self.shapes(header.rank, header.depth), header, muts)
        dtype = rng.choice(["fp16", "fp32"])
        version = 1 if rng.random() < 0.2 else 2
        masks = self._masks(shapes, muts)
        np_dtype = _NP_DTYPES[dtype]
        encoded = [
            encode_entry(k, self._values(shape, dtype, muts), masks.get(k), np_dtype, version)
            for k, shape in shapes.items()
        ]
        if encoded and rng.random() < 0.02:
            self._poison(encoded, [_values_sent(shape, masks.get(k)) for k, shape in shapes.items()], np_dtype, muts)
        entries = b"".join(encoded)
        payload = seal(entries, len(shapes), header, round_idx, device_id, dtype, version, deflate=rng.random() < 0.2)
        return FuzzCase(payload, plan, ROUND, DEVICE, tuple(dict.fromkeys(muts)))

    # ------------------------------------------------------------------------------------------ mutations
    def _mutate_keys(
        self, shapes: dict[str, tuple[int, ...]], header: ModuleSpec, muts: list[str]
    ) -> dict[str, tuple[int, ...]]:
        rng = self.rng
        keys = list(shapes)
        view = set(keys)
        if rng.random() < 0.06:  # a subset of the module
            for k in rng.sample(keys, rng.randint(1, len(keys))):
                del shapes[k]
            muts.append("drop_keys")
        if rng.random() < 0.05:  # a key the plan did not name: a lower layer, another module, another head
            outside = [k for k in self.full if k not in view]
            foreign = {
                "bert.encoder.layer.0.attention.self.key.lora_A": (header.rank, 32),
                "head.classifier.extra": (3,),
            }
            name = rng.choice(outside + list(foreign))
            shapes[name] = self.shapes(header.rank, 255)[name] if name in outside else foreign[name]
            muts.append("extra_key")
        if shapes and rng.random() < 0.05:  # one dimension off by one (not the component axis)
            k = rng.choice(list(shapes))
            shape, axis = list(shapes[k]), component_axis(k)
            d = 0 if axis is None else 1 - axis
            shape[d] += rng.choice([-1, 1]) if shape[d] > 1 else 1
            shapes[k] = tuple(shape)
            muts.append("shape")
        lora = [k for k in shapes if component_axis(k) is not None]
        if lora and rng.random() < 0.03:  # the component axis is not the rank
            k = rng.choice(lora)
            shape, axis = list(shapes[k]), component_axis(k)
            assert axis is not None
            shape[axis] += 1
            shapes[k] = tuple(shape)
            muts.append("rank_axis")
        return shapes

    def _masks(self, shapes: dict[str, tuple[int, ...]], muts: list[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Per key: a kept mask (by components) or none (whole); modules pick a coding each, both factors alike."""
        rng = self.rng
        masks: dict[str, np.ndarray[Any, Any]] = {}
        paths: dict[str, list[str]] = {}
        for k in shapes:
            if component_axis(k) is not None and len(shapes[k]) == 2:
                paths.setdefault(module_path(k), []).append(k)
        mismatched = (
            rng.choice([p for p, ks in paths.items() if len(ks) == 2] or [None]) if rng.random() < 0.05 else None
        )
        for keys in paths.values():
            if rng.random() < 0.5:
                continue  # whole
            n = shapes[keys[0]][component_axis(keys[0]) or 0]
            mode = rng.random()
            mask = np.zeros(n, bool) if mode < 0.1 else np.ones(n, bool) if mode < 0.2 else self.np_rng.random(n) < 0.5
            for k in keys:
                axis = component_axis(k)
                assert axis is not None
                masks[k] = mask if shapes[k][axis] == n else self.np_rng.random(shapes[k][axis]) < 0.5
        if mismatched is not None:  # one factor by components, the other whole
            one = rng.choice(paths[mismatched])
            if one in masks:
                del masks[one]
            else:
                axis = component_axis(one)
                assert axis is not None
                masks[one] = self.np_rng.random(shapes[one][axis]) < 0.5
            muts.append("factor_coding")
        return masks

    def _values(self, shape: tuple[int, ...], dtype: str, muts: list[str]) -> np.ndarray[Any, Any]:
        """Small normal values, or all zero, or with extreme finite values of the dtype mixed in."""
        values = (self.np_rng.standard_normal(shape) * 0.02).astype(np.float32)
        roll = self.rng.random()
        if roll < 0.1:
            values[...] = 0.0  # a zero entry (kind 2 in version 2, unless by components)
        elif roll < 0.25 and values.size:
            top = float(np.finfo(_NP_DTYPES[dtype]).max)
            tiny = float(np.finfo(_NP_DTYPES[dtype]).smallest_subnormal)
            extremes = np.array([top, -top, tiny, -tiny, -0.0, 1e4, -1e4], dtype=np.float32)
            flat = values.reshape(-1)
            idx = self.np_rng.integers(0, flat.size, size=max(1, flat.size // 4))
            flat[idx] = self.np_rng.choice(extremes, size=idx.size)
            muts.append("extreme")
        return values

    def _poison(self, encoded: list[bytes], sent: list[int], dtype: np.dtype[Any], muts: list[str]) -> None:
        """Overwrite one value that is on the wire with NaN or Inf, as a hostile encoder would (ours refuses to).
        An entry's values are its last `sent` items; one that carries none (zero, nothing kept) is left alone."""
        i = self.rng.randrange(len(encoded))
        entry = encoded[i]
        key_len = struct.unpack_from(">H", entry)[0]
        if entry[2 + key_len] == KIND_ZERO or sent[i] == 0:
            return
        at = len(entry) - self.rng.randrange(1, sent[i] + 1) * dtype.itemsize
        bad = np.array([self.rng.choice([np.nan, np.inf, -np.inf])], dtype=dtype).tobytes()
        encoded[i] = entry[:at] + bad + entry[at + dtype.itemsize :]
        muts.append("non_finite")


# ---------------------------------------------------------------------------------------------- hand-made messages
def seal(
    entries: bytes,
    n: int,
    spec: ModuleSpec,
    round_idx: int,
    device_id: int,
    dtype: str,
    version: int = 2,
    *,
    deflate: bool = False,
) -> bytes:
    """Header, body (raw deflate if asked, version 2) and CRC around `n` encoded entries, as proto.codec lays
    them out: a message any entries can go in, which encode_update would not write."""
    code, layout = _DTYPE_CODES[dtype], (round_idx, device_id, spec.rank, spec.depth, n)
    if version == 1:
        header = _HEADER.pack(b"FLUP", 1, code, 0, 0, *layout, len(entries))
        stored = entries
    else:
        flags, stored = 0, entries
        if deflate:
            packer = zlib.compressobj(6, zlib.DEFLATED, -15)
            flags, stored = FLAG_DEFLATE, packer.compress(entries) + packer.flush()
        header = _HEADER_V2.pack(b"FLUP", 2, code, flags, 0, *layout, len(stored), len(entries))
    return header + stored + struct.pack(">I", zlib.crc32(header + stored))


def raw_entry(key: str, values: np.ndarray[Any, Any], mask: np.ndarray[Any, Any] | None, dtype: str) -> bytes:
    """A version 2 entry as proto.codec_entries.encode_entry writes it, but NaN/Inf go out as they are."""
    if np.isfinite(values).all():
        return encode_entry(key, values.astype(np.float32), mask, _NP_DTYPES[dtype], 2)
    finite = np.where(np.isfinite(values), values, 1.0).astype(np.float32)  # not all zero: no kind 2, values follow
    entry = encode_entry(key, finite, mask, _NP_DTYPES[dtype], 2)
    axis = component_axis(key)
    sent = values if mask is None or axis is None else np.take(values, np.flatnonzero(mask), axis=axis)
    tail = np.ascontiguousarray(sent, dtype=np.float32).astype(_NP_DTYPES[dtype]).tobytes()
    return entry[: len(entry) - len(tail)] + tail


def hostile_update(
    state: Mapping[str, torch.Tensor],
    *,
    spec: ModuleSpec,
    round_idx: int,
    device_id: int,
    masks: Mapping[str, torch.Tensor] | None = None,
    dtype: str = "fp32",
) -> bytes:
    """A version 2 update whose entries are coded key by key (`masks[key]`: by components, else whole) and may
    carry NaN/Inf: what a foreign or faulty edge can put on the air."""
    masks = masks or {}
    entries = b"".join(
        raw_entry(k, v.detach().numpy(), None if k not in masks else masks[k].numpy(), dtype) for k, v in state.items()
    )
    return seal(entries, len(state), spec, round_idx, device_id, dtype)


def _values_sent(shape: tuple[int, ...], mask: np.ndarray[Any, Any] | None) -> int:
    """How many values an entry carries: all of them, or those of its kept components."""
    if mask is None:
        return math.prod(shape)
    return int(mask.sum()) * math.prod(shape) // len(mask)


def push(
    adapter: GlobalAdapter,
    case: FuzzCase,
    *,
    others: Sequence[ClientUpdate] = (),
    absent: Sequence[Absent] = (),
    aggregator: Aggregator | None = None,
    max_abs: float = FLOAT32_MAX,
) -> Result:
    """Decode and check `case` as the BS does, then aggregate it with `others` (by default the component-wise
    rule). A rejection is a Result. An aggregator whose step is a convex combination of the updates' factors
    (fedavg, hetlora) must step the adapter within max_abs (AssertionError otherwise); one that re-factors
    (flexlora) may instead be refused, as the BS's guard refuses it (`GlobalModel.aggregate`)."""
    try:
        update = receive_update(
            adapter,
            case.payload,
            spec=case.spec,
            round_idx=case.round_idx,
            device_id=case.device_id,
            weight=1.0,
            max_abs=max_abs,
        )
    except CodecError as exc:
        return Result("codec", str(exc))
    except UpdateError as exc:
        return Result("check", str(exc))
    aggregator = aggregator or FedAvgAggregator()
    delta = aggregator.aggregate(adapter, [update, *others], absent)
    for k, d in delta.items():
        stepped = adapter.state[k] + d
        if not bool((stepped.abs() <= max_abs).all()):
            assert isinstance(aggregator, FlexLoraAggregator), (
                f"{case.mutations}: the aggregate takes {k} beyond {max_abs}"
            )
            return Result("refused", f"the aggregate would take {k} beyond {max_abs:g}")
    return Result("aggregated")


def dense_update(adapter: GlobalAdapter, spec: ModuleSpec, seed: int, weight: float = 1.0) -> ClientUpdate:
    """A well-behaved device's dense update, to aggregate a fuzz case with."""
    g = torch.Generator().manual_seed(seed)
    return ClientUpdate(
        spec, {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in adapter.view(spec).items()}, weight
    )
