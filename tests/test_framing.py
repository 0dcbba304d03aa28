import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.framing import (
    MAX_FRAME_BYTES,
    MAX_FRAME_PAYLOAD,
    OVERHEAD_BYTES,
    SEAL_TAG_BYTES,
    Frame,
    FrameError,
    Reassembler,
    fragment,
)

FAST = settings(max_examples=150, deadline=None)


@st.composite
def frames(draw, max_payload: int = 300) -> Frame:
    total = draw(st.integers(1, 0xFFFF))
    return Frame(
        device_id=draw(st.integers(0, 0xFFFF)),
        round_idx=draw(st.integers(0, 0xFFFFFFFF)),
        seq=draw(st.integers(0, total - 1)),
        total=total,
        payload=draw(st.binary(max_size=max_payload)),
    )


@FAST
@given(frames())
def test_round_trip(frame):
    data = frame.to_bytes()
    assert len(data) == OVERHEAD_BYTES + len(frame.payload)
    assert Frame.from_bytes(data) == frame


def test_layout_is_big_endian_struct():
    f = Frame(device_id=0x0102, round_idx=0x03040506, seq=7, total=9, payload=b"xyz", attempt=2)
    data = f.to_bytes()
    assert data[:2] == b"FL" and data[2] == 2 and data[3] == 0
    assert struct.unpack(">HIHHHH", data[4:18]) == (0x0102, 0x03040506, 7, 9, 2, 3)
    assert data[18:21] == b"xyz"
    assert Frame.from_bytes(data) == f
    assert struct.unpack(">I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_max_frame_fits_gnuradio_packet():
    sealed = Frame(1, 1, 0, 1, bytes(MAX_FRAME_PAYLOAD + SEAL_TAG_BYTES), sealed=True)
    assert len(sealed.to_bytes()) == MAX_FRAME_BYTES <= 4091
    assert len(Frame(1, 1, 0, 1, bytes(MAX_FRAME_PAYLOAD)).to_bytes()) == MAX_FRAME_BYTES - SEAL_TAG_BYTES
    with pytest.raises(FrameError, match="limit"):
        Frame(1, 1, 0, 1, bytes(MAX_FRAME_PAYLOAD + 1))


def test_crc_catches_every_single_bit_flip():
    data = Frame(3, 17, 2, 5, bytes(range(256)) * 2).to_bytes()
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FrameError):
            Frame.from_bytes(bytes(mutated))


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: b"XX" + d[2:], "magic"),
        (lambda d: d[:2] + b"\x09" + d[3:], "version"),
        (lambda d: d[:-1], "length"),
        (lambda d: d + b"\x00", "length"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "CRC"),
        (lambda d: d[:5], "short"),
    ],
)
def test_error_messages_say_what_is_wrong(mutate, words):
    data = Frame(1, 2, 0, 1, b"hello").to_bytes()
    with pytest.raises(FrameError, match=words):
        Frame.from_bytes(mutate(data))


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def test_crc_valid_but_inconsistent_fields_rejected():
    bad_seq = _with_crc(struct.pack(">2sBBHIHHHH", b"FL", 2, 0, 1, 1, 5, 5, 1, 0))
    with pytest.raises(FrameError, match="seq"):
        Frame.from_bytes(bad_seq)
    zero_total = _with_crc(struct.pack(">2sBBHIHHHH", b"FL", 2, 0, 1, 1, 0, 0, 1, 0))
    with pytest.raises(FrameError):
        Frame.from_bytes(zero_total)
    too_long = _with_crc(struct.pack(">2sBBHIHHHH", b"FL", 2, 0, 1, 1, 0, 1, 1, 4001) + bytes(4001))
    with pytest.raises(FrameError, match="limit"):
        Frame.from_bytes(too_long)
    flags = _with_crc(struct.pack(">2sBBHIHHHH", b"FL", 2, 4, 1, 1, 0, 1, 1, 0))
    with pytest.raises(FrameError, match="flags"):
        Frame.from_bytes(flags)


@FAST
@given(st.binary(max_size=200))
def test_from_bytes_random_input_only_frame_error(data):
    try:
        Frame.from_bytes(data)
    except FrameError:
        pass


@FAST
@given(frames(max_payload=64), st.data())
def test_from_bytes_truncated_or_mutated_only_frame_error(frame, data):
    raw = bytearray(frame.to_bytes())
    op = data.draw(st.sampled_from(["truncate", "mutate", "insert", "header_fix_crc"]))
    if op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "mutate":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif op == "insert":
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    else:  # arbitrary header, correct CRC: exercises the checks after the CRC
        header = data.draw(st.binary(min_size=16, max_size=16))
        raw = bytearray(_with_crc(b"FL\x01" + header[3:] + bytes(raw[16:-4])))
    try:
        parsed = Frame.from_bytes(bytes(raw))
    except FrameError:
        return
    assert parsed.to_bytes() == bytes(raw)


def test_from_bytes_non_bytes_input_is_frame_error():
    for junk in (None, 42, "text", [1, 2]):
        with pytest.raises(FrameError):
            Frame.from_bytes(junk)  # type: ignore[arg-type]


def test_frame_field_validation():
    with pytest.raises(ValueError):
        Frame(0x10000, 0, 0, 1, b"")
    with pytest.raises(ValueError):
        Frame(0, -1, 0, 1, b"")
    with pytest.raises(ValueError):
        Frame(0, 0, 1, 1, b"")
    with pytest.raises(ValueError):
        Frame(0, 0, 0, 1, bytes(MAX_FRAME_PAYLOAD + 1))
    assert Frame(0, 0, 0, 1, bytearray(b"ab")).payload == b"ab"


def test_fragment_sizes_and_limits():
    fr = fragment(b"a" * 10, 1, 2, 4)
    assert [len(f.payload) for f in fr] == [4, 4, 2]
    assert {f.total for f in fr} == {3} and [f.seq for f in fr] == [0, 1, 2]
    assert len(fragment(b"", 1, 2, 100)) == 1
    with pytest.raises(ValueError):
        fragment(b"x", 1, 2, 0)
    with pytest.raises(ValueError):
        fragment(b"x", 1, 2, MAX_FRAME_PAYLOAD + 1)
    with pytest.raises(ValueError, match="65535"):
        fragment(bytes(65536), 1, 2, 1)
    assert len(fragment(bytes(65535), 1, 2, 1)) == 65535


@FAST
@given(
    message=st.binary(max_size=3000),
    frame_payload_bytes=st.integers(1, 400),
    seed=st.integers(0, 2**32 - 1),
)
def test_fragment_reassemble_shuffled_with_duplicates(message, frame_payload_bytes, seed):
    rng = random.Random(seed)
    fr = fragment(message, 7, 3, frame_payload_bytes)
    wire = [f.to_bytes() for f in fr] + [f.to_bytes() for f in rng.sample(fr, k=len(fr) // 2)]
    rng.shuffle(wire)
    r = Reassembler()
    new = [r.add(Frame.from_bytes(w)) for w in wire]
    assert sum(new) == len(fr)  # duplicates reported as not new
    assert r.is_complete(7, 3)
    assert r.received_seqs(7, 3) == set(range(len(fr)))
    assert r.pop(7, 3) == message
    assert r.buffered_bytes == 0
    with pytest.raises(KeyError):
        r.pop(7, 3)


def test_after_pop_late_duplicates_ignored_and_acks_stay_full():
    r = Reassembler()
    fr = fragment(b"x" * 50, 1, 4, 10)
    for f in fr:
        r.add(f)
    assert r.pop(1, 4) == b"x" * 50
    assert not r.add(fr[2])  # late retransmission does not start a new partial
    assert r.buffered_bytes == 0
    assert r.is_complete(1, 4) and r.received_seqs(1, 4) == set(range(5))
    with pytest.raises(KeyError, match="already popped"):
        r.pop(1, 4)
    r.discard_round(4)
    assert not r.is_complete(1, 4) and r.received_seqs(1, 4) == set()


def test_reassembler_incomplete_and_keys_separate():
    r = Reassembler()
    a = fragment(b"A" * 30, 1, 5, 10)
    b = fragment(b"B" * 30, 2, 5, 10)
    r.add(a[0])
    r.add(a[2])
    r.add(b[1])
    assert r.received_seqs(1, 5) == {0, 2}
    assert r.received_seqs(2, 5) == {1}
    assert r.received_seqs(3, 5) == set()
    assert not r.is_complete(1, 5)
    with pytest.raises(FrameError, match="incomplete"):
        r.pop(1, 5)
    r.add(a[1])  # state survived the failed pop
    assert r.pop(1, 5) == b"A" * 30


def test_reassembler_conflicting_total():
    r = Reassembler()
    r.add(Frame(1, 1, 0, 3, b"abc"))
    with pytest.raises(FrameError, match="total"):
        r.add(Frame(1, 1, 1, 4, b"abc"))
    with pytest.raises(FrameError, match="fragment size"):
        r.add(Frame(1, 1, 1, 3, b"abcd"))


def test_reassembler_rejects_oversize_claimed_total():
    r = Reassembler(max_message_bytes=10_000)
    with pytest.raises(FrameError, match="max_message_bytes"):
        r.add(Frame(1, 1, 0, 1000, bytes(100)))  # claims >= 99,900 bytes
    with pytest.raises(FrameError, match="max_message_bytes"):
        r.add(Frame(1, 1, 999, 1000, bytes(100)))  # last frame: >= 100,000 bytes
    assert r.buffered_bytes == 0 and r.received_seqs(1, 1) == set()
    assert r.add(Frame(1, 1, 0, 100, bytes(100)))  # exactly 10,000 bytes fits


def test_reassembler_total_buffer_cap():
    r = Reassembler(max_message_bytes=1000, max_total_bytes=250)
    r.add(Frame(1, 1, 0, 2, bytes(100)))
    r.add(Frame(2, 1, 0, 2, bytes(100)))
    with pytest.raises(FrameError, match="buffer full"):
        r.add(Frame(3, 1, 0, 2, bytes(100)))
    r.discard_round(1)
    assert r.buffered_bytes == 0
    assert r.add(Frame(3, 1, 0, 2, bytes(100)))


def test_discard_round_only_that_round():
    r = Reassembler()
    r.add(Frame(1, 1, 0, 2, b"x"))
    r.add(Frame(1, 2, 0, 2, b"y"))
    r.discard_round(1)
    assert r.received_seqs(1, 1) == set()
    assert r.received_seqs(1, 2) == {0}


def test_a_planned_device_may_not_buffer_more_than_its_plan_allows():
    r = Reassembler(max_message_bytes=1_000_000)
    r.expect(1, 1, 2_500)
    with pytest.raises(FrameError, match="its plan allows"):
        r.add(Frame(1, 1, 0, 30, bytes(100)))  # claims >= 2,900 bytes
    r.add(Frame(1, 1, 0, 25, bytes(100)))  # 2,500 bytes fit
    r.add(Frame(2, 1, 0, 30, bytes(100)))  # another device, no plan: the general limit
    r.discard_round(1)
    r.add(Frame(1, 1, 0, 30, bytes(100)))  # the plan was of round 1 only
