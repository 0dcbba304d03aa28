"""Update codec: exact round trips, and untrusted bytes give a CodecError, never a crash or a huge allocation."""
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedlora.codec import _HEADER, CodecError, decode_update, encode_update, expected_shapes
from fedlora.lora import ModuleSpec

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


_GOOD = encode_update(make_state(), spec=SPEC, round_idx=1, device_id=0, dtype="fp16")


@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())
@settings(max_examples=400, deadline=None)
def test_mutated_updates_decode_or_fail_cleanly(mutations, fix_crc: bool):
    data = bytearray(_GOOD)
    for pos, value in mutations:
        data[pos] = value
    if fix_crc:  # reach the parser behind the checksum
        data = bytearray(reseal(bytes(data[:-4])))
    try:
        out = decode_update(bytes(data))
    except CodecError:
        return
    for v in out.state.values():
        assert torch.isfinite(v).all()
    assert sum(v.numel() for v in out.state.values()) <= len(data)


def test_round_trip_property():
    @given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(0, 65535),
           st.sampled_from(["fp16", "fp32"]))
    @settings(max_examples=50, deadline=None)
    def check(rank, cols, round_idx, device_id, dtype):
        rng = np.random.default_rng(rank * 7 + cols)
        state = {"m.lora_A": torch.from_numpy(rng.standard_normal((rank, cols)).astype(np.float32)),
                 "m.lora_B": torch.from_numpy(rng.standard_normal((cols, rank)).astype(np.float32))}
        out = decode_update(encode_update(state, spec=ModuleSpec(rank, 1), round_idx=round_idx,
                                          device_id=device_id, dtype=dtype))
        assert (out.round_idx, out.device_id) == (round_idx, device_id)
        tol = 1e-2 if dtype == "fp16" else 0
        for k in state:
            torch.testing.assert_close(out.state[k], state[k], rtol=tol, atol=tol)
    check()
