"""Update codec: exact round trips, and untrusted bytes give a CodecError, never a crash or a huge allocation."""

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lora import ModuleSpec
from proto.codec import (
    _HEADER,
    _HEADER_V2,
    FLAG_DEFLATE,
    KIND_COMPONENTS,
    KIND_ZERO,
    MAX_BODY_BYTES,
    MAX_VALUES,
    CodecError,
    decode_update,
    encode_update,
    encoded_size,
    expected_shapes,
    largest_value,
)
from proto.codec_entries import encode_entry

SPEC = ModuleSpec(rank=4, depth=2)


def make_state(rank=4, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in (4, 5):
        for mod in ("query", "value"):
            base = f"bert.encoder.layer.{layer}.attention.self.{mod}"
            state[f"{base}.lora_A"] = torch.randn(rank, 16, generator=g)
            state[f"{base}.lora_B"] = torch.randn(12, rank, generator=g)
    state["head.classifier.weight"] = torch.randn(2, 12, generator=g)
    state["head.classifier.bias"] = torch.randn(2, generator=g)
    return state


def test_fp32_round_trip_is_exact():
    state = make_state()
    data = encode_update(state, spec=SPEC, round_idx=7, device_id=3, dtype="fp32")
    out = decode_update(data, expected_shapes=expected_shapes(state))
    assert (out.round_idx, out.device_id, out.spec, out.dtype) == (7, 3, SPEC, "fp32")
    assert out.kept == {}
    for k, v in state.items():
        assert torch.equal(out.state[k], v)


def test_fp16_round_trip_is_half_the_size_and_close():
    state = make_state()
    d32 = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp32")
    d16 = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp16")
    values = sum(v.numel() for v in state.values())
    assert len(d32) - len(d16) == 2 * values
    out = decode_update(d16)
    for k, v in state.items():
        torch.testing.assert_close(out.state[k], v, rtol=1e-3, atol=1e-3)


def test_kept_components_only_travel_and_come_back_in_place():
    state = make_state()
    mask = torch.tensor([True, False, False, True])
    kept = {k.rsplit(".", 1)[0]: mask for k in state if k.endswith(".lora_A")}
    dense = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp32")
    sparse = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp32", kept=kept)
    assert len(sparse) < len(dense)
    out = decode_update(sparse, expected_shapes=expected_shapes(state))
    assert set(out.kept) == set(kept) and all(torch.equal(m, mask) for m in out.kept.values())
    for k, v in state.items():
        if k.endswith(".lora_A"):
            assert torch.equal(out.state[k][mask], v[mask]) and not out.state[k][~mask].any()
        elif k.endswith(".lora_B"):
            assert torch.equal(out.state[k][:, mask], v[:, mask]) and not out.state[k][:, ~mask].any()
        else:
            assert torch.equal(out.state[k], v)


def test_encode_refuses_non_finite():
    state = make_state()
    state["head.classifier.bias"][0] = float("nan")
    with pytest.raises(CodecError, match="head.classifier.bias: refusing to encode NaN"):
        encode_update(state, spec=SPEC, round_idx=1, device_id=0)


def reseal(body_and_header: bytes) -> bytes:
    """Recompute the CRC so a test reaches the checks behind it."""
    return body_and_header + struct.pack(">I", zlib.crc32(body_and_header))


def test_specific_corruptions_are_named():
    state = make_state()
    good = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp32")
    with pytest.raises(CodecError, match="truncated"):
        decode_update(good[:10])
    with pytest.raises(CodecError, match="length mismatch"):
        decode_update(good[:-7])
    with pytest.raises(CodecError, match="length mismatch"):
        decode_update(good + b"\0")
    flipped = bytearray(good)
    flipped[40] ^= 0x10
    with pytest.raises(CodecError, match="checksum mismatch"):
        decode_update(bytes(flipped))
    with pytest.raises(CodecError, match="bad magic"):
        decode_update(reseal(b"XXXX" + good[4:-4]))
    with pytest.raises(CodecError, match="version 9 is not supported"):
        decode_update(reseal(good[:4] + bytes([9]) + good[5:-4]))
    with pytest.raises(CodecError, match="unknown value dtype"):
        decode_update(reseal(good[:5] + bytes([7]) + good[6:-4]))


def test_shape_mismatch_and_missing_entries_against_expected():
    state = make_state()
    data = encode_update(state, spec=SPEC, round_idx=1, device_id=0)
    wrong = expected_shapes(make_state(rank=2))
    with pytest.raises(CodecError, match="does not match the expected"):
        decode_update(data, expected_shapes=wrong)
    fewer = dict(list(state.items())[:3])
    data = encode_update(fewer, spec=SPEC, round_idx=1, device_id=0)
    with pytest.raises(CodecError, match="missing entries"):
        decode_update(data, expected_shapes=expected_shapes(state))
    extra = encode_update({"evil.weights": torch.zeros(3)}, spec=SPEC, round_idx=1, device_id=0)
    with pytest.raises(CodecError, match="not part of the expected module"):
        decode_update(extra, expected_shapes=expected_shapes(state))


def test_nan_in_payload_is_rejected():
    state = {"head.classifier.bias": torch.tensor([1.0, 2.0])}
    data = bytearray(encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp32"))
    nan = struct.pack(">f", float("nan"))
    data[-8:-4] = nan  # last value, just before the CRC
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode_update(reseal(bytes(data[:-4])))


def test_header_claiming_huge_tensor_does_not_allocate():
    key = b"head.x"
    body = struct.pack(">H", len(key)) + key + struct.pack(">BB", 0, 2) + struct.pack(">2I", 2**31, 2**31)
    header = _HEADER.pack(b"FLUP", 1, 2, 0, 0, 1, 0, 4, 2, 1, len(body))
    with pytest.raises(CodecError, match="claims 4611686018427387904 values"):
        decode_update(reseal(header + body))


@given(st.binary(max_size=2048))
@settings(max_examples=400, deadline=None)
def test_random_bytes_never_crash(data: bytes):
    with pytest.raises(CodecError):
        decode_update(data)


def sparse_b_only_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A v2 showcase: zero A tensors (kind 2) on one module, kept components on the other."""
    state = make_state()
    kept = {}
    for k in list(state):
        if k.endswith(".lora_A") and ".layer.4." in k:
            state[k] = torch.zeros_like(state[k])
        elif k.endswith(".lora_A"):
            kept[k.rsplit(".", 1)[0]] = torch.tensor([False, True, True, False])
    return state, kept


_STATE_Z, _KEPT_Z = sparse_b_only_state()
_GOODS = {
    "v1": encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, dtype="fp16", version=1),
    "v2": encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, dtype="fp16"),
    "v2-zero-kept": encode_update(_STATE_Z, spec=SPEC, round_idx=1, device_id=0, dtype="fp16", kept=_KEPT_Z),
    "v2-deflate": encode_update(
        _STATE_Z, spec=SPEC, round_idx=1, device_id=0, dtype="fp16", kept=_KEPT_Z, compress="always"
    ),
}
_GOOD = _GOODS["v2"]


@pytest.mark.parametrize("which", sorted(_GOODS))
def test_mutated_updates_decode_or_fail_cleanly(which: str):
    good = _GOODS[which]

    @given(
        st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=8), st.booleans()
    )
    @settings(max_examples=150, deadline=None)
    def check(mutations, fix_crc: bool):
        data = bytearray(good)
        for pos, value in mutations:
            data[pos] = value
        if fix_crc:  # reach the parser (and the inflater) behind the checksum
            data = bytearray(reseal(bytes(data[:-4])))
        try:
            out = decode_update(bytes(data))
        except CodecError:
            return
        for v in out.state.values():
            assert torch.isfinite(v).all()
        assert sum(v.numel() for v in out.state.values()) <= MAX_VALUES
        if which in ("v1", "v2") and not out.compressed:  # no zero entries to start from: bytes bound the values
            assert sum(v.numel() for v in out.state.values()) <= len(data)

    check()


def test_round_trip_property():
    @given(
        st.integers(1, 8),
        st.integers(1, 6),
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
        st.sampled_from(["fp16", "fp32"]),
    )
    @settings(max_examples=50, deadline=None)
    def check(rank, cols, round_idx, device_id, dtype):
        rng = np.random.default_rng(rank * 7 + cols)
        state = {
            "m.lora_A": torch.from_numpy(rng.standard_normal((rank, cols)).astype(np.float32)),
            "m.lora_B": torch.from_numpy(rng.standard_normal((cols, rank)).astype(np.float32)),
        }
        out = decode_update(
            encode_update(state, spec=ModuleSpec(rank, 1), round_idx=round_idx, device_id=device_id, dtype=dtype)
        )
        assert (out.round_idx, out.device_id) == (round_idx, device_id)
        tol = 1e-2 if dtype == "fp16" else 0
        for k in state:
            torch.testing.assert_close(out.state[k], state[k], rtol=tol, atol=tol)

    check()


# ------------------------------------------------------------------------------------------------ format version 2
def v2_message(
    body: bytes,
    *,
    entries: int,
    rank: int = 4,
    flags: int = 0,
    raw_len: int | None = None,
    reserved: int = 0,
    dtype_code: int = 2,
) -> bytes:
    """A sealed v2 update around a hand-made body (to reach checks a well-behaved encoder never trips)."""
    raw = len(body) if raw_len is None else raw_len
    header = _HEADER_V2.pack(b"FLUP", 2, dtype_code, flags, reserved, 1, 0, rank, 2, entries, len(body), raw)
    return reseal(header + body)


def entry_head(key: str, kind: int, *dims: int) -> bytes:
    k = key.encode()
    return struct.pack(">H", len(k)) + k + struct.pack(">BB", kind, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def deflate(raw: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(raw) + packer.flush()


def test_version_2_is_written_and_version_1_still_decodes():
    state = make_state()
    mask = torch.tensor([True, False, True, True])
    kept = {k.rsplit(".", 1)[0]: mask for k in state if k.endswith(".lora_A")}
    v1 = encode_update(state, spec=SPEC, round_idx=5, device_id=2, dtype="fp32", kept=kept, version=1)
    v2 = encode_update(state, spec=SPEC, round_idx=5, device_id=2, dtype="fp32", kept=kept)
    assert v1[4] == 1 and v2[4] == 2
    a, b = decode_update(v1, expected_shapes=expected_shapes(state)), decode_update(v2)
    assert (a.version, b.version) == (1, 2)
    assert (a.round_idx, a.device_id, a.spec) == (b.round_idx, b.device_id, b.spec) == (5, 2, SPEC)
    assert a.kept.keys() == b.kept.keys() and all(torch.equal(a.kept[p], b.kept[p]) for p in a.kept)
    for k in state:
        assert torch.equal(a.state[k], b.state[k])
    # per component entry v1 spends 2 + 3 bytes of count and indices, v2 one bitmask byte; v2's header is 4 longer
    assert len(v1) - len(v2) == 2 * len(kept) * (2 + 3 - 1) - 4


def test_version_1_cannot_compress():
    with pytest.raises(CodecError, match="version 1 has no compression"):
        encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, compress="always", version=1)
    with pytest.raises(CodecError, match="cannot write format version 3"):
        encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, version=3)
    with pytest.raises(CodecError, match="compress must be"):
        encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, compress="zstd")


def test_bitmask_is_one_byte_per_entry_at_rank_8_whatever_is_kept():
    spec = ModuleSpec(8, 1)
    state = {"m.lora_A": torch.randn(8, 5), "m.lora_B": torch.randn(3, 8)}
    sizes = set()
    for n in range(9):
        mask = torch.arange(8) < n
        data = encode_update(state, spec=spec, round_idx=1, device_id=0, dtype="fp32", kept={"m": mask})
        sizes.add(len(data) - 4 * n * (5 + 3))  # strip the values of the kept components
        out = decode_update(data)
        assert torch.equal(out.kept["m"], mask)
        assert torch.equal(out.state["m.lora_A"][mask], state["m.lora_A"][mask])
    assert len(sizes) == 1  # the mask costs the same, 1 byte per entry, from 0 to 8 kept


def test_bitmask_bit_order_and_padding():
    spec = ModuleSpec(10, 1)
    state = {"m.lora_A": torch.ones(10, 2)}
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 9]] = True
    data = encode_update(state, spec=spec, round_idx=1, device_id=0, dtype="fp32", kept={"m": mask})
    body = data[_HEADER_V2.size : -4]
    bitmask = body[len(entry_head("m.lora_A", 1, 10, 2)) :][:2]
    assert bitmask == bytes([0b0000_0001, 0b0000_0010])  # component i = bit i % 8 of byte i // 8, LSB first
    padded = entry_head("m.lora_A", KIND_COMPONENTS, 10, 2) + bytes([0x01, 0x06]) + struct.pack(">4f", 1, 1, 1, 1)
    with pytest.raises(CodecError, match="sets bits past its 10 components"):
        decode_update(v2_message(padded, entries=1, rank=10))


def test_all_zero_tensors_travel_as_shapes_only():
    state = make_state()
    a_keys = [k for k in state if k.endswith(".lora_A")]
    for k in a_keys:
        state[k] = torch.zeros_like(state[k])
    state[a_keys[0]][0, 0] = -0.0  # -0 is zero too
    dense = encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, dtype="fp16")
    zero = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp16")
    assert len(dense) - len(zero) == sum(2 * state[k].numel() for k in a_keys)
    out = decode_update(zero, expected_shapes=expected_shapes(state))
    assert out.kept == {}
    for k in a_keys:
        assert out.state[k].shape == state[k].shape and not out.state[k].any()
    v1 = encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp16", version=1)
    assert len(v1) == len(dense) - 4  # version 1 has no zero kind: the zeros travel as values


def test_component_coded_keys_stay_components_even_when_zero():
    """The mask says what was sent (aggregation needs it); kind 2 would lose it."""
    state = make_state()
    mask = torch.tensor([True, False, False, False])
    kept = {k.rsplit(".", 1)[0]: mask for k in state if k.endswith(".lora_A")}
    for k in state:
        if ".lora_" in k:
            state[k] = torch.zeros_like(state[k])
    out = decode_update(encode_update(state, spec=SPEC, round_idx=1, device_id=0, kept=kept))
    assert set(out.kept) == set(kept) and all(torch.equal(m, mask) for m in out.kept.values())


def test_zero_kind_is_a_version_2_kind_only():
    body = entry_head("head.x", KIND_ZERO, 3)
    header = _HEADER.pack(b"FLUP", 1, 2, 0, 0, 1, 0, 4, 2, 1, len(body))
    with pytest.raises(CodecError, match="unknown entry kind 2 for format version 1"):
        decode_update(reseal(header + body))
    assert not decode_update(v2_message(body, entries=1)).state["head.x"].any()


def test_zero_entries_cannot_claim_unbounded_memory():
    huge = entry_head("head.x", KIND_ZERO, 2**16, 2**16)
    with pytest.raises(CodecError, match=f"would exceed the limit of {MAX_VALUES}"):
        decode_update(v2_message(huge, entries=1))
    many = b"".join(entry_head(f"head.x{i}", KIND_ZERO, 2**12, 2**12) for i in range(3))  # 3 x 16 Mi values
    with pytest.raises(CodecError, match="head.x2: decoding 16777216 more values would exceed"):
        decode_update(v2_message(many, entries=3))
    # an empty kept mask with a huge other dimension: no values travel, only zeros would be made
    empty = entry_head("m.lora_A", KIND_COMPONENTS, 4, 2**30) + b"\0"
    with pytest.raises(CodecError, match="would exceed the limit"):
        decode_update(v2_message(empty, entries=1))


def test_version_2_component_axis_must_match_the_header_rank():
    body = entry_head("m.lora_B", KIND_ZERO, 3, 5)
    with pytest.raises(CodecError, match="does not have the header's rank 4"):
        decode_update(v2_message(body, entries=1, rank=4))
    body = entry_head("m.lora_A", KIND_ZERO, 4)
    with pytest.raises(CodecError, match="does not have the header's rank"):
        decode_update(v2_message(body, entries=1, rank=4))


def coded_per_key(state, masks, *, version=2) -> bytes:
    """A sealed fp32 update (rank 4) whose entries are coded one by one: `masks[key]` by components, else whole."""
    body = b"".join(
        encode_entry(k, v.numpy(), None if masks.get(k) is None else masks[k].numpy(), np.dtype(">f4"), version)
        for k, v in state.items()
    )
    if version == 2:
        return v2_message(body, entries=len(state))
    return reseal(_HEADER.pack(b"FLUP", 1, 2, 0, 0, 1, 0, 4, 2, len(state), len(body)) + body)


L5V = "bert.encoder.layer.5.attention.self.value"


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("masked", [".lora_A", ".lora_B"])
def test_a_module_with_one_factor_by_components_and_the_other_whole_is_refused(version, masked):
    """A mask on one factor only would be half a mask for aggregation: the codec names the module."""
    state = make_state()
    mask = torch.tensor([True, False, True, False])
    data = coded_per_key(state, {L5V + masked: mask}, version=version)
    with pytest.raises(CodecError, match=rf"{L5V}: lora_\w is sent .* but lora_\w .*must be coded alike"):
        decode_update(data, expected_shapes=expected_shapes(state))
    if version == 2:  # a zero factor is sent whole as well
        state[L5V + ({".lora_A": ".lora_B", ".lora_B": ".lora_A"}[masked])].zero_()
        with pytest.raises(CodecError, match=f"{L5V}: .*whole \\(dense or zero\\)"):
            decode_update(coded_per_key(state, {L5V + masked: mask}))


def test_modules_may_be_coded_differently_from_each_other():
    """One module by components, the others whole (dense or zero): valid; only the coded module has a mask."""
    state = make_state()
    state["bert.encoder.layer.4.attention.self.query.lora_A"].zero_()
    mask = torch.tensor([False, True, True, True])
    data = coded_per_key(state, {L5V + ".lora_A": mask, L5V + ".lora_B": mask})
    out = decode_update(data, expected_shapes=expected_shapes(state))
    assert list(out.kept) == [L5V] and torch.equal(out.kept[L5V], mask)
    assert data == encode_update(state, spec=SPEC, round_idx=1, device_id=0, dtype="fp32", kept={L5V: mask})


def test_encode_refuses_values_beyond_the_dtypes_range():
    """Finite as float32 but Inf in fp16: the receiver would refuse it, so the sender does (naming the key)."""
    assert (largest_value("fp16"), largest_value("fp32")) == (65504.0, float(np.finfo(np.float32).max))
    ok = {"head.x": torch.tensor([65504.0, -65504.0])}
    assert torch.equal(
        decode_update(encode_update(ok, spec=SPEC, round_idx=1, device_id=0)).state["head.x"], ok["head.x"]
    )
    with pytest.raises(CodecError, match=r"head.x: values beyond the range of float16 \(largest 65504\)"):
        encode_update({"head.x": torch.tensor([1.0, 7e4])}, spec=SPEC, round_idx=1, device_id=0)
    assert decode_update(
        encode_update({"head.x": torch.tensor([7e4])}, spec=SPEC, round_idx=1, device_id=0, dtype="fp32")
    )


def test_keys_must_be_printable():
    """An error that names a key is one line in the log and the live view, without control characters."""
    with pytest.raises(CodecError, match="unprintable"):
        encode_update({"head.x\n": torch.ones(2)}, spec=SPEC, round_idx=1, device_id=0)
    body = entry_head("head.\x1b[2J", 0, 1) + struct.pack(">f", 1.0)
    with pytest.raises(CodecError, match=r"entry 0: key 'head.\\x1b\[2J' has unprintable characters"):
        decode_update(v2_message(body, entries=1))


def test_version_2_header_fields_are_checked():
    body = entry_head("head.x", KIND_ZERO, 3)
    with pytest.raises(CodecError, match="unknown flags 0x80"):
        decode_update(v2_message(body, entries=1, flags=0x80))
    with pytest.raises(CodecError, match="reserved header byte"):
        decode_update(v2_message(body, entries=1, reserved=1))
    with pytest.raises(CodecError, match="raw length 99 differs"):
        decode_update(v2_message(body, entries=1, raw_len=99))
    with pytest.raises(CodecError, match="over the limit"):
        decode_update(v2_message(deflate(body), entries=1, flags=FLAG_DEFLATE, raw_len=MAX_BODY_BYTES + 1))
    v1_flagged = _HEADER.pack(b"FLUP", 1, 2, FLAG_DEFLATE, 0, 1, 0, 4, 2, 1, len(body))
    with pytest.raises(CodecError, match="unknown flags 0x01"):
        decode_update(reseal(v1_flagged + body))
    good = encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0)
    assert _HEADER_V2.size == _HEADER.size + 4 == 26
    with pytest.raises(CodecError, match="truncated: 29 bytes is shorter than the version 2 header"):
        decode_update(good[:29])


# ------------------------------------------------------------------------------------------------------ compression
def test_compress_modes():
    state = {k: torch.full_like(v, 0.25) for k, v in make_state().items()}  # very compressible
    never = encode_update(state, spec=SPEC, round_idx=1, device_id=0, compress="never")
    auto = encode_update(state, spec=SPEC, round_idx=1, device_id=0, compress="auto")
    assert never[6] == 0 and auto[6] == FLAG_DEFLATE and len(auto) < len(never)
    out = decode_update(auto, expected_shapes=expected_shapes(state))
    assert out.compressed and all(torch.equal(out.state[k], v) for k, v in state.items())
    assert not decode_update(never).compressed
    # auto takes whichever is smaller; on a tiny body deflate only adds bytes, so auto keeps the raw one
    rng = np.random.default_rng(0)
    for values in (rng.uniform(-1, 1, 4096), np.array([0.123, -4.56])):
        noise = {"h": torch.from_numpy(values.astype(np.float32))}
        auto, always, never = (
            encode_update(noise, spec=SPEC, round_idx=1, device_id=0, dtype="fp32", compress=c)
            for c in ("auto", "always", "never")
        )
        assert always[6] == FLAG_DEFLATE and len(auto) == min(len(never), len(always))
        assert torch.equal(decode_update(always).state["h"], noise["h"])
    assert auto == never and len(always) > len(never)


def test_sparse_update_with_zeros_and_kept_round_trips_compressed():
    out = decode_update(_GOODS["v2-deflate"], expected_shapes=expected_shapes(_STATE_Z))
    assert out.compressed and set(out.kept) == set(_KEPT_Z)
    for k, v in _STATE_Z.items():
        m = _KEPT_Z.get(k.rsplit(".", 1)[0])
        if m is None:
            torch.testing.assert_close(out.state[k], v, rtol=1e-3, atol=1e-3)
        elif k.endswith(".lora_A"):
            torch.testing.assert_close(out.state[k][m], v[m], rtol=1e-3, atol=1e-3)
            assert not out.state[k][~m].any()


def test_decompression_bomb_stops_at_the_claimed_size():
    import tracemalloc

    body = entry_head("head.x", 0, 250) + struct.pack(">250f", *([0.5] * 250))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(body) + b"".join(packer.compress(bytes(2**20)) for _ in range(32)) + packer.flush()
    assert len(bomb) < 64 * 1024  # 32 MiB of zeros after the real entry
    message = v2_message(bomb, entries=1, flags=FLAG_DEFLATE, raw_len=len(body))
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=f"inflates to more than the {len(body)} bytes the header claims"):
            decode_update(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # never near the 32 MiB the stream holds


def test_compressed_body_mismatches_are_named():
    body = entry_head("head.x", 0, 2) + struct.pack(">2f", 1.0, 2.0)
    packed = deflate(body)
    with pytest.raises(CodecError, match="cut short"):
        decode_update(v2_message(packed[:-3], entries=1, flags=FLAG_DEFLATE, raw_len=len(body)))
    with pytest.raises(CodecError, match="inflates to 22 bytes, the header claims 40"):
        decode_update(v2_message(packed, entries=1, flags=FLAG_DEFLATE, raw_len=40))
    with pytest.raises(CodecError, match="bytes after the end of the compressed body"):
        decode_update(v2_message(packed + b"junk", entries=1, flags=FLAG_DEFLATE, raw_len=len(body)))
    with pytest.raises(CodecError, match="does not inflate"):
        decode_update(v2_message(b"\xff" * 20, entries=1, flags=FLAG_DEFLATE, raw_len=len(body)))
    zero_claim = v2_message(deflate(b""), entries=0, flags=FLAG_DEFLATE, raw_len=0)
    assert decode_update(zero_claim).state == {}
    with pytest.raises(CodecError, match="inflates to more than the 0 bytes"):
        decode_update(v2_message(deflate(b"x"), entries=0, flags=FLAG_DEFLATE, raw_len=0))


@given(st.binary(max_size=600), st.sampled_from([0, FLAG_DEFLATE]), st.integers(0, 4096), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_random_bodies_behind_a_valid_v2_header_fail_cleanly(body: bytes, flags: int, raw_len: int, entries: int):
    """Random bytes rarely get past the CRC; these do, raw or as a 'deflated' body."""
    if flags == 0:
        raw_len = len(body)
    try:
        out = decode_update(v2_message(body, entries=entries, flags=flags, raw_len=raw_len))
    except CodecError:
        return
    assert all(torch.isfinite(v).all() for v in out.state.values())


@given(st.binary(min_size=1, max_size=400), st.integers(1, 3))
@settings(max_examples=150, deadline=None)
def test_deflated_random_bodies_fail_cleanly(raw: bytes, entries: int):
    """Valid deflate streams of garbage: the inflater succeeds, the entry parser must refuse cleanly."""
    try:
        out = decode_update(v2_message(deflate(raw), entries=entries, flags=FLAG_DEFLATE, raw_len=len(raw)))
    except CodecError:
        return
    assert all(torch.isfinite(v).all() for v in out.state.values())


def test_round_trip_property_v2():
    @given(
        st.integers(1, 12),
        st.integers(1, 6),
        st.sampled_from(["fp16", "fp32"]),
        st.sampled_from(["never", "auto", "always"]),
        st.integers(0, 2**12 - 1),
        st.booleans(),
        st.booleans(),
    )
    @settings(max_examples=60, deadline=None)
    def check(rank, cols, dtype, compress, mask_bits, use_kept, zero_a):
        rng = np.random.default_rng(rank * 7 + cols)
        state = {
            "layer.0.m.lora_A": torch.from_numpy(rng.standard_normal((rank, cols)).astype(np.float32)),
            "layer.0.m.lora_B": torch.from_numpy(rng.standard_normal((cols, rank)).astype(np.float32)),
            "head.w": torch.from_numpy(rng.standard_normal(cols).astype(np.float32)),
        }
        if zero_a:
            state["layer.0.m.lora_A"].zero_()
        mask = torch.tensor([bool(mask_bits >> i & 1) for i in range(rank)])
        kept = {"layer.0.m": mask} if use_kept else None
        spec = ModuleSpec(rank, 1)
        data = encode_update(state, spec=spec, round_idx=3, device_id=1, dtype=dtype, kept=kept, compress=compress)
        out = decode_update(data, expected_shapes=expected_shapes(state))
        assert out.compressed == (compress == "always" or (compress == "auto" and data[6] == FLAG_DEFLATE))
        tol = 1e-2 if dtype == "fp16" else 0
        for k, v in state.items():
            want = v
            if use_kept and k.endswith(".lora_A"):
                want = v * mask[:, None]
            elif use_kept and k.endswith(".lora_B"):
                want = v * mask[None, :]
            torch.testing.assert_close(out.state[k], want, rtol=tol, atol=tol)
        if use_kept:
            assert torch.equal(out.kept["layer.0.m"], mask)
        else:
            assert out.kept == {}

    check()


# --------------------------------------------------------------------------- size without encoding
def _minilm_like(rank: int, depth: int, layers: int = 6, hidden: int = 24) -> dict[str, torch.Tensor]:
    """A (rank, depth) view of a MiniLM-shaped adapter (q/v LoRA of the top `depth` layers, 2-class head)."""
    g = torch.Generator().manual_seed(rank * 10 + depth)
    state = {}
    for layer in range(layers - depth, layers):
        for mod in ("query", "value"):
            base = f"bert.encoder.layer.{layer}.attention.self.{mod}"
            state[f"{base}.lora_A"] = torch.randn(rank, hidden, generator=g)
            state[f"{base}.lora_B"] = torch.randn(hidden + 8, rank, generator=g)
    state["head.classifier.weight"] = torch.randn(2, hidden, generator=g)
    state["head.classifier.bias"] = torch.randn(2, generator=g)
    return state


def _random_masks(state: dict[str, torch.Tensor], rank: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    masks = {}
    for key in state:
        if key.endswith(".lora_A"):
            mask = torch.zeros(rank, dtype=torch.bool)
            mask[torch.from_numpy(rng.choice(rank, k, replace=False))] = True
            masks[key[: -len(".lora_A")]] = mask
    return masks


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("rank, depth", [(1, 1), (2, 6), (4, 2), (8, 6), (9, 3), (16, 4)])
def test_encoded_size_is_the_length_of_a_dense_update(rank, depth, dtype, version):
    state = _minilm_like(rank, depth)
    data = encode_update(state, spec=ModuleSpec(rank, depth), round_idx=1, device_id=2, dtype=dtype, version=version)
    assert encoded_size(expected_shapes(state), dtype=dtype, version=version) == len(data)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("rank, depth", [(2, 1), (4, 6), (8, 2), (8, 6), (13, 3)])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.125, 0.25, 0.5, 0.75, 1.0])
def test_encoded_size_is_the_length_of_a_component_sparse_update(rank, depth, keep_fraction, dtype, version):
    from fedlora.sparsify import n_keep

    state = _minilm_like(rank, depth)
    k = n_keep(keep_fraction, rank)
    masks = _random_masks(state, rank, k, seed=rank + depth)
    data = encode_update(
        state, spec=ModuleSpec(rank, depth), round_idx=1, device_id=2, dtype=dtype, kept=masks, version=version
    )
    shapes = expected_shapes(state)
    assert encoded_size(shapes, dtype=dtype, kept=k, version=version) == len(data)
    per_module = {path: int(m.sum()) for path, m in masks.items()}
    assert encoded_size(shapes, dtype=dtype, kept=per_module, version=version) == len(data)


def test_encoded_size_counts_zero_entries_and_modules_left_dense():
    state = _minilm_like(4, 2)
    zero_a = [k for k in state if k.endswith(".lora_A")]
    for k in zero_a:
        state[k].zero_()  # b_only: A travels as kind 2
    spec, shapes = ModuleSpec(4, 2), expected_shapes(state)
    data = encode_update(state, spec=spec, round_idx=1, device_id=0)
    assert encoded_size(shapes, zero_keys=zero_a) == len(data)
    assert encoded_size(shapes) > len(data)  # zeros not declared: an upper bound
    v1 = encode_update(state, spec=spec, round_idx=1, device_id=0, version=1)  # v1 has no kind 2
    assert encoded_size(shapes, zero_keys=zero_a, version=1) == len(v1)
    some = dict(list(_random_masks(state, 4, 3, seed=1).items())[:1])  # one module by components, the rest dense
    data = encode_update(state, spec=spec, round_idx=1, device_id=0, kept=some)
    assert encoded_size(shapes, zero_keys=zero_a, kept={p: 3 for p in some}) == len(data)


def test_encoded_size_bounds_auto_compression_and_refuses_what_encode_refuses():
    state = _minilm_like(8, 6)
    state["head.classifier.bias"].zero_()
    auto = encode_update(state, spec=ModuleSpec(8, 6), round_idx=1, device_id=0, compress="auto")
    assert len(auto) <= encoded_size(expected_shapes(state))
    with pytest.raises(CodecError, match="unknown dtype"):
        encoded_size(expected_shapes(state), dtype="bf16")
    with pytest.raises(CodecError, match="version"):
        encoded_size(expected_shapes(state), version=3)
    with pytest.raises(CodecError, match="kept components"):
        encoded_size(expected_shapes(state), kept=9)
    with pytest.raises(CodecError, match="key of"):
        encoded_size({"": (3,)})


@pytest.mark.parametrize("uplink_dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("sparsifier", ["dense", "dense_fp16", "dense_fp32", "soft", "topk", "randomk", "b_only"])
def test_the_cost_models_update_size_is_what_the_edge_encodes(sparsifier, uplink_dtype):
    """bs_node's size prediction (ModelShape + the codec config) == len(encode_update(sparsifier output))."""
    from bs_node.controllers.costs import ModelShape, UpdateEncoding
    from config import CodecConfig
    from fedlora.sparsify import sparsifier_from_config

    codec = CodecConfig(sparsifier=sparsifier, uplink_dtype=uplink_dtype)
    encoding = UpdateEncoding.from_codec(codec)
    full = _minilm_like(8, 6)
    shape = ModelShape.from_shapes(expected_shapes(full), 6)
    for rank, depth in [(2, 1), (4, 3), (8, 6), (5, 2)]:
        view = _minilm_like(rank, depth)
        g = torch.Generator().manual_seed(rank)
        delta = {k: torch.randn(v.shape, generator=g) for k, v in view.items()}
        trained = {k: view[k] + delta[k] for k in view}
        assert set(shape.view_shapes(rank, depth)) == set(view)
        for keep_fraction in (0.25, 0.5, 0.8, 1.0):
            edge = sparsifier_from_config(codec, seed=0, device_id=1)
            up = edge.sparsify(delta, trained, ModuleSpec(rank, depth), keep_fraction, round_idx=1)
            data = encode_update(
                up.delta, spec=ModuleSpec(rank, depth), round_idx=1, device_id=1, dtype=up.dtype, kept=up.kept
            )
            assert shape.update_bytes(rank, depth, keep_fraction, encoding) == len(data), (rank, depth, keep_fraction)
