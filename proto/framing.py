"""Data-plane framing: how an uplink message becomes packets on the air.

One frame = one PHY packet. The format is fixed-size big-endian so it is the
same bytes on the sim link and on the GNU Radio link (whose packet limit is
4091 bytes, so header + MAX_FRAME_PAYLOAD + CRC must stay below it).

Layout (version 2)::

    magic(2) version(1) flags(1) device_id u16  round_idx u32
    seq u16  total u16  attempt u16  payload_len u16  | payload | CRC32(header+payload)

`attempt` is the ARQ attempt that sent the frame (1, 2, ...; 0 for a frame not sent through ARQ). Flag bit 0
says the payload is sealed: an AEAD ciphertext of the fragment followed by its SEAL_TAG_BYTES tag, with the header
as associated data (`trust.sealing`). payload_len stays the header's last field: the GNU Radio receiver reads it
there to trim the modem's padding. The CRC catches noise; only the seal tells a genuine frame from a forged one.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"FL"
VERSION = 2
_HEADER = struct.Struct(">2sBBHIHHHH")
_CRC = struct.Struct(">I")
HEADER_BYTES = _HEADER.size  # 18
CRC_BYTES = _CRC.size  # 4
OVERHEAD_BYTES = HEADER_BYTES + CRC_BYTES
SEAL_TAG_BYTES = 16  # the AEAD's tag (ChaCha20-Poly1305), carried after the sealed fragment
FLAG_SEALED = 0x01
MAX_FRAME_PAYLOAD = 4000  # fragment bytes (before sealing)
MAX_FRAME_BYTES = OVERHEAD_BYTES + MAX_FRAME_PAYLOAD + SEAL_TAG_BYTES  # 4038 <= 4091 (GNU Radio limit)
MAX_FRAMES_PER_MESSAGE = 0xFFFF
BS_DEVICE_ID = 0xFFFF  # the sender of the downlink (the adapter view): no edge has this id


def frame_overhead_bytes(sealed: bool) -> int:
    """Bytes a frame adds to its fragment on the air: header, CRC and, when sealed, the tag."""
    return OVERHEAD_BYTES + (SEAL_TAG_BYTES if sealed else 0)


_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


class FrameError(ValueError):
    """A frame (or a set of frames) is malformed or inconsistent."""


@dataclass(frozen=True)
class Frame:
    """One fragment of a device's uplink message for one round (its payload sealed or in the clear)."""

    device_id: int
    round_idx: int
    seq: int
    total: int
    payload: bytes
    attempt: int = 0
    sealed: bool = False

    def __post_init__(self) -> None:
        # Accept bytearray/memoryview but store immutable bytes (frame is hashable).
        if not isinstance(self.payload, bytes):
            object.__setattr__(self, "payload", bytes(self.payload))
        _check_range("device_id", self.device_id, _U16)
        _check_range("round_idx", self.round_idx, _U32)
        _check_range("seq", self.seq, _U16)
        _check_range("total", self.total, _U16)
        _check_range("attempt", self.attempt, _U16)
        if self.total < 1:
            raise FrameError(f"total must be >= 1, got {self.total}")
        if self.seq >= self.total:
            raise FrameError(f"seq {self.seq} out of range for total {self.total}")
        limit = MAX_FRAME_PAYLOAD + (SEAL_TAG_BYTES if self.sealed else 0)
        if len(self.payload) > limit:
            raise FrameError(f"payload of {len(self.payload)} bytes exceeds the limit of {limit}")
        if self.sealed and len(self.payload) < SEAL_TAG_BYTES:
            raise FrameError(f"a sealed payload of {len(self.payload)} bytes is shorter than its tag")

    def header_bytes(self) -> bytes:
        """The header as sent: what a seal authenticates as associated data."""
        flags = FLAG_SEALED if self.sealed else 0
        return _HEADER.pack(
            MAGIC, VERSION, flags, self.device_id, self.round_idx, self.seq, self.total, self.attempt, len(self.payload)
        )

    def to_bytes(self) -> bytes:
        body = self.header_bytes() + self.payload
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Frame:
        """Parse and verify; raises FrameError (only) on anything malformed."""
        try:
            data = bytes(data)
        except (TypeError, ValueError) as exc:
            raise FrameError(f"frame data is not bytes-like: {type(data).__name__}") from exc
        if len(data) < OVERHEAD_BYTES:
            raise FrameError(f"frame too short: {len(data)} bytes < {OVERHEAD_BYTES} (header+CRC)")
        magic, version, flags, device_id, round_idx, seq, total, attempt, payload_len = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise FrameError(f"unsupported version {version}, expected {VERSION}")
        expected_len = OVERHEAD_BYTES + payload_len
        if len(data) != expected_len:
            raise FrameError(
                f"length mismatch: header says payload_len={payload_len} "
                f"({expected_len} bytes total), got {len(data)} bytes"
            )
        body = data[:-CRC_BYTES]
        (crc_rx,) = _CRC.unpack_from(data, len(body))
        crc_calc = zlib.crc32(body)
        if crc_rx != crc_calc:
            raise FrameError(f"CRC mismatch: received {crc_rx:#010x}, computed {crc_calc:#010x}")
        # CRC-valid from here on: remaining checks catch a buggy/foreign sender, not noise.
        if flags & ~FLAG_SEALED:
            raise FrameError(f"unsupported flags {flags:#04x} (only bit 0, sealed, is defined)")
        sealed = bool(flags & FLAG_SEALED)
        if total < 1 or seq >= total:
            raise FrameError(f"bad seq/total: seq={seq} total={total}")
        return cls(device_id, round_idx, seq, total, body[HEADER_BYTES:], attempt=attempt, sealed=sealed)


def _check_range(name: str, value: int, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError(f"{name} must be int, got {type(value).__name__}")
    if not 0 <= value <= upper:
        raise FrameError(f"{name}={value} out of range [0, {upper}]")


def fragment(message: bytes, device_id: int, round_idx: int, frame_payload_bytes: int) -> list[Frame]:
    """Split a message into frames of frame_payload_bytes (last one shorter).

    An empty message still yields one (empty) frame so the receiver learns it
    is complete.
    """
    if isinstance(frame_payload_bytes, bool) or not isinstance(frame_payload_bytes, int):
        raise ValueError(f"frame_payload_bytes must be int, got {type(frame_payload_bytes).__name__}")
    if not 1 <= frame_payload_bytes <= MAX_FRAME_PAYLOAD:
        raise ValueError(f"frame_payload_bytes={frame_payload_bytes} out of range [1, {MAX_FRAME_PAYLOAD}]")
    message = bytes(message)
    total = max(1, math.ceil(len(message) / frame_payload_bytes))
    if total > MAX_FRAMES_PER_MESSAGE:
        raise ValueError(
            f"message of {len(message)} bytes needs {total} frames of {frame_payload_bytes} bytes "
            f"(max {MAX_FRAMES_PER_MESSAGE}); use larger frames"
        )
    return [
        Frame(device_id, round_idx, seq, total, message[seq * frame_payload_bytes : (seq + 1) * frame_payload_bytes])
        for seq in range(total)
    ]


class _Partial:
    __slots__ = ("total", "frag_bytes", "parts", "nbytes")

    def __init__(self, total: int) -> None:
        self.total = total
        self.frag_bytes: int | None = None  # payload size of every non-last frame
        self.parts: dict[int, bytes] = {}
        self.nbytes = 0


class Reassembler:
    """BS side: collects frames per (device_id, round_idx).

    Memory is bounded: a frame whose header implies a message larger than
    max_message_bytes is rejected before anything is stored, and (optionally)
    max_total_bytes caps all buffered partial messages together. Duplicates
    (retransmissions) are ignored; a frame disagreeing with earlier frames of
    the same message (total, fragment size) raises FrameError. A popped
    message is remembered (just its frame count) until discard_round, so late
    duplicates don't start a new partial and acks after pop() still report
    every seq as received.
    """

    def __init__(self, max_message_bytes: int = 64 * 2**20, *, max_total_bytes: int | None = None) -> None:
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        self.max_message_bytes = max_message_bytes
        self.max_total_bytes = max_total_bytes
        self._partials: dict[tuple[int, int], _Partial] = {}
        self._limits: dict[tuple[int, int], int] = {}  # (device, round) -> its plan's largest update
        self._popped: dict[tuple[int, int], int] = {}  # key -> total, for messages already delivered
        self._buffered_bytes = 0

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes

    def expect(self, device_id: int, round_idx: int, max_bytes: int) -> None:
        """A device's plan: its message of this round is at most max_bytes (else max_message_bytes applies)."""
        self._limits[(device_id, round_idx)] = min(max_bytes, self.max_message_bytes)

    def add(self, frame: Frame) -> bool:
        """Store a frame; True if it was new, False for a duplicate."""
        if frame.sealed:
            raise FrameError(f"device {frame.device_id} frame {frame.seq}: a sealed frame reached reassembly unopened")
        key = (frame.device_id, frame.round_idx)
        if key in self._popped:
            return False
        n = len(frame.payload)
        is_last = frame.seq == frame.total - 1
        limit = self._limits.get(key, self.max_message_bytes)
        allows = "its plan allows" if key in self._limits else "max_message_bytes allows"
        # Non-last frames are all full-size, the last one is no larger: lower bound on the message size.
        min_message_bytes = frame.total * n if is_last else (frame.total - 1) * n
        if min_message_bytes > limit:
            raise FrameError(
                f"device {frame.device_id} round {frame.round_idx}: total={frame.total} frames of "
                f"{n} bytes implies >= {min_message_bytes} bytes > the {limit} {allows}"
            )
        part = self._partials.get(key)
        if part is not None:
            if part.total != frame.total:
                raise FrameError(
                    f"device {frame.device_id} round {frame.round_idx}: conflicting total "
                    f"{frame.total} (earlier frames said {part.total})"
                )
            if frame.seq in part.parts:
                return False
        else:
            part = _Partial(frame.total)
        if not is_last:
            if part.frag_bytes is not None and part.frag_bytes != n:
                raise FrameError(
                    f"device {frame.device_id} round {frame.round_idx}: conflicting fragment size "
                    f"{n} (earlier frames had {part.frag_bytes})"
                )
        elif part.frag_bytes is not None and n > part.frag_bytes:
            raise FrameError(
                f"device {frame.device_id} round {frame.round_idx}: last frame ({n} bytes) larger "
                f"than fragment size {part.frag_bytes}"
            )
        if part.nbytes + n > limit:
            raise FrameError(
                f"device {frame.device_id} round {frame.round_idx}: message exceeds the {limit} bytes {allows}"
            )
        if self.max_total_bytes is not None and self._buffered_bytes + n > self.max_total_bytes:
            raise FrameError(f"reassembly buffer full ({self._buffered_bytes} bytes buffered)")
        if not is_last:
            part.frag_bytes = n
        part.parts[frame.seq] = frame.payload
        part.nbytes += n
        self._buffered_bytes += n
        self._partials[key] = part
        return True

    def received_seqs(self, device_id: int, round_idx: int) -> set[int]:
        key = (device_id, round_idx)
        if key in self._popped:
            return set(range(self._popped[key]))
        part = self._partials.get(key)
        return set(part.parts) if part is not None else set()

    def is_complete(self, device_id: int, round_idx: int) -> bool:
        """True once all frames arrived (stays True after pop() until discard_round)."""
        key = (device_id, round_idx)
        part = self._partials.get(key)
        return key in self._popped or (part is not None and len(part.parts) == part.total)

    def pop(self, device_id: int, round_idx: int) -> bytes:
        """Return the reassembled message and forget it.

        KeyError if nothing was received for the key or it was already popped,
        FrameError if incomplete (state is kept so more frames can still arrive).
        """
        key = (device_id, round_idx)
        if key in self._popped:
            raise KeyError(f"device {device_id} round {round_idx}: message already popped")
        part = self._partials[key]
        if len(part.parts) != part.total:
            missing = part.total - len(part.parts)
            raise FrameError(f"device {device_id} round {round_idx}: incomplete, {missing}/{part.total} frames missing")
        del self._partials[key]
        self._popped[key] = part.total
        self._buffered_bytes -= part.nbytes
        return b"".join(part.parts[seq] for seq in range(part.total))

    def discard_round(self, round_idx: int) -> None:
        """Drop every (possibly partial) message of a round, e.g. after its deadline."""
        for key in [k for k in self._partials if k[1] == round_idx]:
            self._buffered_bytes -= self._partials.pop(key).nbytes
        for key in [k for k in self._popped if k[1] == round_idx]:
            del self._popped[key]
        for key in [k for k in self._limits if k[1] == round_idx]:
            del self._limits[key]
