"""100,000 mutated frames through the BS's whole receive path in-process (frames -> gate -> reassembly -> codec ->
aggregation, the round logic on an in-memory transport): bit flips, rewritten header fields with a valid CRC,
truncations, replays, frames of other devices and rounds, random bytes. Zero uncaught exceptions, the genuine
updates are aggregated, and every mutated frame that parses is refused by the gate and counted."""

from __future__ import annotations

import random
import struct
import zlib
from collections import Counter

from bs_node.rounds import FrameReceived
from proto.framing import HEADER_BYTES, Frame
from tests.bs_fakes import make_station, sends_update, update_frames
from trust.sealing import FrameSealer

FRAMES = 100_000
_HEADER = struct.Struct(">2sBBHIHHHH")


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def mutate(rng: random.Random, genuine: list[bytes], round_idx: int) -> tuple[str, bytes]:
    """One hostile frame made from a genuine one; its kind."""
    data = bytearray(rng.choice(genuine))
    kind = rng.choice(("flip", "header", "truncate", "replay", "foreign", "random", "payload"))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return kind, bytes(data)
    if kind == "header":  # a rewritten field, the CRC made valid again: only the seal can tell
        fields = list(_HEADER.unpack_from(data))
        i = rng.choice((3, 4, 5, 6, 7))  # device, round, seq, total, attempt
        limit = 0xFFFFFFFF if i == 4 else 0xFFFF
        fields[i] = rng.choice((0, 1, round_idx + 1, limit, rng.randrange(limit)))
        fields[5] = min(fields[5], fields[6] - 1) if fields[6] else 0
        body = _HEADER.pack(*fields) + bytes(data[HEADER_BYTES:-4])
        return kind, _with_crc(body)
    if kind == "truncate":
        return kind, bytes(data[: rng.randrange(len(data))])
    if kind == "replay":
        return kind, bytes(data)
    if kind == "foreign":  # sealed under a key of its own, for a planned device
        frame = Frame.from_bytes(bytes(data))
        return kind, FrameSealer(rng.randbytes(32), frame.device_id).seal(
            Frame(frame.device_id, frame.round_idx, frame.seq, frame.total, rng.randbytes(40)), frame.attempt
        )
    if kind == "payload":  # the ciphertext changed, the CRC valid
        frame = Frame.from_bytes(bytes(data))
        cut = bytearray(frame.payload)
        cut[rng.randrange(len(cut))] ^= 0xFF
        return kind, _with_crc(frame.header_bytes() + bytes(cut))
    return kind, rng.randbytes(rng.randint(0, 1200))


def test_a_hundred_thousand_hostile_frames_through_the_receive_path(tmp_path):
    bs = make_station(tmp_path / "run", ["devices.count=2", "round.rounds=1"])
    t = bs.transport
    genuine: list[bytes] = []
    rng = random.Random(7)
    kinds: Counter[str] = Counter()

    def device0(plan, attachment):
        frames = update_frames(plan, attachment, 0, 0.01)
        genuine.extend(frames)
        sends_update(t, 0, 0.01)(plan, attachment)
        for _ in range(FRAMES):  # all of them before the genuine ones arrive, and some after
            kind, data = mutate(rng, frames, plan.round)
            kinds[kind] += 1
            t.deliver(FrameReceived(data, 20.0), rng.choice((0.5, 1.5)))

    t.join(0, device0)
    t.join(1, sends_update(t, 1, 0.02))
    bs.runner.wait_for_devices()
    record = bs.runner.run_round(1)
    rows = {d.device_id: d for d in record.devices}
    assert rows[0].status == "ok" and rows[1].status == "ok", (rows[0].error, rows[1].error)
    assert rows[0].frames_received == len(genuine)
    for kind in kinds:
        assert kinds[kind] > FRAMES // 10, kinds
    gate = bs.runner.gate
    # every frame that parsed (CRC, header) was refused by the gate; the rest were counted as bad frames
    parsed = sum(gate.rejected.values())
    assert parsed + bs.runner.bad_frames == FRAMES
    assert gate.reasons["replayed"] >= kinds["replay"] and gate.reasons["forged"] > kinds["foreign"]
    assert record.frames_rejected == sum(bs.runner.rejected.values()) == parsed
