"""The air before authentication and before numeric work (issue 24, items 2 and 9; docs/security.md, "The air
before authentication"): a stranger's raw TCP connection that declares a huge CURVE handshake frame is closed at
its header, on both of the air's sockets, and the air's memory stays flat; a handshake left half done is dropped;
a burst the plan does not allow is refused from its header, before any of its chunks is stored or looked at."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from phy.air_chunks import burst_messages
from proto.air import BurstHeader, IqChunk, chunk_count, decode_reply
from tests.test_zmq_iq import GOOD_BURST, GOOD_PLAN
from trust.keys import load_run_keys, provision

pytest.importorskip("scipy")

MIB = 1 << 20
# ZMTP 3.0 greeting of a client naming CURVE: signature, version 3.0, mechanism, as-server 0, filler
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def _command_header(size: int) -> bytes:
    return b"\x06" + struct.pack(">Q", size)  # flags: command | long size, then the size, big-endian


@pytest.fixture
def sealed_air(tmp_path: Path):
    from phy.air_server import Air

    provision(tmp_path / "keys", 2)
    ctx = zmq.Context()
    air = Air(
        address="tcp://127.0.0.1:0",
        medium_address="tcp://127.0.0.1:0",
        context=ctx,
        keys=load_run_keys(tmp_path / "keys"),
    )
    yield air
    air.close()
    ctx.term()


def _stranger(address: str, declared: int, body: int = 0) -> socket.socket:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(GREETING + _command_header(declared))
    try:
        sock.sendall(b"\x00" * body)
    except (BrokenPipeError, ConnectionResetError):  # closed already: what the test wants to see
        pass
    return sock


def _closed_within(sock: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the peer closed the connection (EOF or reset), reading what it sends; None: it did not."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - t0 < timeout_s:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def test_a_strangers_oversize_handshake_frame_closes_its_connection_and_costs_no_memory(sealed_air):
    """16 keyless connections per socket, each declaring a 256 MiB CURVE command and sending 4 MiB of it: each is
    closed at the frame's header; the process (the air's sockets live in it) grows by a few MB at most. Before the
    chunked protocol the request socket took frames up to 512 MB and the medium socket had no limit: the
    connections stayed open and the air held every byte sent."""
    process = psutil.Process()
    rss_before = process.memory_info().rss
    strangers = [_stranger(a, 256 * MIB, 4 * MIB) for a in (sealed_air.address, sealed_air.medium_address) * 16]
    try:
        closed = [_closed_within(s, 2.0) for s in strangers]
        assert all(c is not None for c in closed), closed
        assert process.memory_info().rss - rss_before < 16e6
    finally:
        for s in strangers:
            s.close()


def test_the_air_sockets_take_no_part_above_their_largest_legitimate_one(sealed_air):
    from phy.air_sockets import MEDIUM_MAX_PART_BYTES, REQUEST_MAX_PART_BYTES
    from proto.air import CHUNK_BYTES
    from trust.curve import HANDSHAKE_TIMEOUT_MS as HANDSHAKE_IVL_MS

    assert sealed_air.router.getsockopt(zmq.MAXMSGSIZE) == REQUEST_MAX_PART_BYTES == CHUNK_BYTES + 33
    assert sealed_air.medium_push.getsockopt(zmq.MAXMSGSIZE) == MEDIUM_MAX_PART_BYTES <= 512
    assert sealed_air.router.getsockopt(zmq.HANDSHAKE_IVL) == sealed_air.medium_push.getsockopt(zmq.HANDSHAKE_IVL)
    assert sealed_air.router.getsockopt(zmq.HANDSHAKE_IVL) == HANDSHAKE_IVL_MS == 5000
    # one byte over the limit is closed at once; a frame within it is held only until the handshake times out
    over = _stranger(sealed_air.medium_address, MEDIUM_MAX_PART_BYTES + 1)
    within = _stranger(sealed_air.medium_address, MEDIUM_MAX_PART_BYTES)
    try:
        assert _closed_within(over, 2.0) is not None
        held_s = _closed_within(within, HANDSHAKE_IVL_MS / 1000 + 3.0)
        assert held_s is not None and held_s > 2.0
    finally:
        over.close()
        within.close()


def test_the_bs_and_a_device_still_get_through_with_real_curve(sealed_air, tmp_path):
    """The limits let every legitimate message through: the BS's plan and a device's largest chunks (CURVE boxes
    each part in 33 more bytes), and the medium's handshake."""
    from trust.curve import make_client
    from trust.keys import load_bs_key, load_key

    bs_key = load_bs_key(tmp_path / "keys")
    device = load_key(tmp_path / "keys" / "device-0.secret.json", role="device")
    assert device.bs_public is not None
    ctx = zmq.Context.instance()
    bs, edge, medium = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER), ctx.socket(zmq.PULL)
    for sock, key, address in (
        (bs, bs_key, sealed_air.address),
        (edge, device, sealed_air.address),
        (medium, bs_key, sealed_air.medium_address),
    ):
        sock.setsockopt(zmq.LINGER, 0)
        make_client(sock, key, bs_key.public)
        sock.connect(address)
    try:
        bs.send(GOOD_PLAN.encode())
        _serve(sealed_air, 1)
        assert decode_reply(_recv(bs)).type == "plan_ok"
        iq = np.full(300_000, 0.1, dtype=np.complex64)  # three chunks, two of them full
        header = GOOD_BURST.model_copy(update={"samples": len(iq), "chunks": chunk_count(len(iq))})
        for message in burst_messages(header, iq):
            edge.send_multipart(message)
        _serve(sealed_air, 4)
        assert len(sealed_air.medium.queues[0]) == 1 and sealed_air.stats["malformed"] == 0
        sealed_air.medium_push.send_multipart([b"x", b"y"])  # PUSH waits for the PULL's finished handshake
        assert medium.poll(5000)
    finally:
        for sock in (bs, edge, medium):
            sock.close(0)


def test_a_burst_the_plan_does_not_allow_is_refused_before_any_numeric_work(monkeypatch):
    """An unplanned device, another round, or more samples than the plan allows: one error from the header, every
    chunk dropped unstored, and neither the IQ checks nor the resampler run. A planned burst does reach them."""
    import phy.air_server as air_server

    numeric: list[str] = []
    medium_signal = air_server.MediumSignal

    def spy(iq, *args, **kwargs):
        numeric.append("MediumSignal")
        return medium_signal(iq, *args, **kwargs)

    ctx = zmq.Context()
    air = air_server.Air(address="tcp://127.0.0.1:0", medium_address="tcp://127.0.0.1:0", context=ctx)
    monkeypatch.setattr(air_server, "MediumSignal", spy)
    monkeypatch.setattr(air_server.np, "isfinite", _counting(np.isfinite, numeric, "isfinite"))
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(air.address)
    iq = np.full(3 * 131_072, 0.1, dtype=np.complex64)  # 3 chunks
    try:
        peer.send(GOOD_PLAN.encode())  # device 0 only, round 1, 250 kHz of 1 MHz
        _serve(air, 1)
        assert decode_reply(_recv(peer)).type == "plan_ok"
        refused = [
            ({"device_id": 1}, "device 1 has no subband in the BS's plan for round 1"),
            ({"round": 2}, "field 'round': 2, the BS's plan is for round 1"),
            ({"samples": 9_000_000, "chunks": chunk_count(9_000_000)}, "more than 33554432"),
        ]
        for burst_id, (fields, error) in enumerate(refused, start=1):
            header = BurstHeader(
                **{**GOOD_BURST.model_dump(), "burst_id": burst_id, "samples": len(iq), "chunks": 3, **fields}
            )
            peer.send(header.encode())
            for index in range(3):
                peer.send_multipart([IqChunk(burst_id=burst_id, index=index).encode(), iq[:131_072].data])
            _serve(air, 4)
            assert error in decode_reply(_recv(peer)).error
            assert not peer.poll(100)  # one error for the burst, none for its chunks
        assert numeric == [] and air.chunks.pending_bytes() == 0
        assert air.chunks.stats == {"chunks": 0, "chunks_dropped": 9} and air.stats["refused"] == 3
        # the control case: the same burst from the planned device is checked and resampled
        header = GOOD_BURST.model_copy(update={"burst_id": 9, "samples": len(iq), "chunks": 3})
        for message in burst_messages(header, iq):
            peer.send_multipart(message)
        _serve(air, 4)
        assert numeric[0] == "isfinite" and "MediumSignal" in numeric and len(air.medium.queues[0]) == 1
    finally:
        air.close()
        peer.close(0)
        ctx.term()


def test_a_new_burst_of_a_device_replaces_the_one_in_reassembly():
    """At most one burst per device in reassembly (an edge restarted on a new socket starts afresh), so what the air
    holds is bounded by one admitted burst per planned device; a chunk out of order ends its burst."""
    from phy.air_chunks import BurstAssembler
    from proto.air import AirMessageError, ChunkFrames

    assembler = BurstAssembler()
    header = GOOD_BURST.model_copy(update={"samples": 300_000, "chunks": 3})
    chunk = np.zeros(131_072, np.complex64).tobytes()
    assembler.start(b"old", header, 0)
    assert assembler.add(b"old", ChunkFrames(IqChunk(burst_id=1, index=0), chunk)) is None
    assembler.start(b"new", header, 0)
    assert assembler.pending_bytes() == 300_000 * 8
    with pytest.raises(AirMessageError, match="no burst announced by this peer"):
        assembler.add(b"old", ChunkFrames(IqChunk(burst_id=1, index=1), chunk))
    with pytest.raises(AirMessageError, match="chunk: field 'index': 1, expected 0 of 3"):
        assembler.add(b"new", ChunkFrames(IqChunk(burst_id=1, index=1), chunk))
    assert assembler.pending_bytes() == 0  # that burst is over; its other chunks are dropped
    assert assembler.add(b"new", ChunkFrames(IqChunk(burst_id=1, index=2), chunk)) is None
    assert assembler.stats["chunks_dropped"] == 1


def _counting(fn, calls: list[str], name: str):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


def _serve(air, messages: int, timeout_s: float = 10.0) -> None:
    """What the air's loop does with its request socket, for `messages` messages."""
    deadline = time.monotonic() + timeout_s
    while messages and time.monotonic() < deadline:
        if air.router.poll(100):
            frames = air.router.recv_multipart(copy=False)
            air.on_message([f.bytes for f in frames], _sender(air, frames[-1]))
            messages -= 1
    assert messages == 0, "the air did not get every message"


def _sender(air, frame: zmq.Frame) -> str | None:
    from trust.curve import sender_of

    return sender_of(frame) if air.secure else None


def _recv(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(5000), "no answer from the air"
    return sock.recv_multipart()
