"""Sealed frames: every uplink fragment is encrypted and authenticated with ChaCha20-Poly1305 (`cryptography`).

Key: per device and per registration. When device k registers, the BS draws a fresh 16-byte salt and sends it in
the welcome; both ends compute

    key_k = HKDF-SHA256(ikm = X25519(own secret, peer public), salt, info = "fedlora frame key/2" | run_id | k)

so the key is never sent, only the holders of device k's or the BS's secret key can compute it, and a
re-registration (an edge restart, a resumed BS) gets a key never used before.

Nonce (12 bytes): device u16 | round u32 | seq u16 | attempt u16 | direction u8 | 0 u8. Under one key each
(round, seq, attempt) is sent once, so a nonce is never reused with other bytes. The frame's header is the
associated data: a frame cannot be moved to another device, round, seq or attempt, or given another total.

The BS's `FrameGate` opens frames before reassembly. A forged, mis-keyed, unsealed (when sealing is on) or
replayed frame is rejected and counted per claimed device; it never reaches reassembly, so it cannot displace a
genuine frame. Replays are caught per round: the gate remembers the (seq, attempt) it opened in the current round,
at most `max_window` per device (a genuine device sends at most frames x ARQ attempts).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proto.framing import SEAL_TAG_BYTES, Frame

SALT_BYTES = 16
UPLINK = 0  # the nonce's direction byte; the downlink (a later issue) uses 1
_NONCE = struct.Struct(">HIHHBx")
_INFO = b"fedlora frame key/2|"
assert SEAL_TAG_BYTES == 16  # ChaCha20-Poly1305's tag: framing counts it in every sealed frame's airtime


class FrameRejected(ValueError):
    """A frame that did not pass the gate; `reason` is one word for the counters (forged, replayed, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def frame_key(own_secret: bytes, peer_public: bytes, *, device_id: int, run_id: str, salt: bytes) -> bytes:
    """The 32-byte frame key of one device for one registration (the same at the edge and at the BS)."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes, got {len(salt)}")
    shared = X25519PrivateKey.from_private_bytes(own_secret).exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = _INFO + run_id.encode() + b"|" + device_id.to_bytes(2, "big")
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=info).derive(shared)


def _nonce(frame: Frame, direction: int) -> bytes:
    return _NONCE.pack(frame.device_id, frame.round_idx, frame.seq, frame.attempt, direction)


class FrameSealer:
    """The edge's side: seals each frame it sends, per ARQ attempt."""

    def __init__(self, key: bytes, device_id: int, direction: int = UPLINK):
        self._aead = ChaCha20Poly1305(key)
        self.device_id = device_id
        self.direction = direction

    def seal(self, frame: Frame, attempt: int) -> bytes:
        if frame.sealed:
            raise ValueError("frame is sealed already")
        if frame.device_id != self.device_id:
            raise ValueError(f"this sealer holds device {self.device_id}'s key, not device {frame.device_id}'s")
        shell = replace(frame, attempt=attempt, sealed=True, payload=bytes(len(frame.payload) + SEAL_TAG_BYTES))
        sealed = self._aead.encrypt(_nonce(shell, self.direction), frame.payload, shell.header_bytes())
        return replace(shell, payload=sealed).to_bytes()


@dataclass
class _Window:
    round_idx: int
    seen: set[tuple[int, int]]


class FrameGate:
    """The BS's side: opens sealed frames with each registered device's key, drops everything else, counts it."""

    def __init__(self, *, sealed: bool, direction: int = UPLINK, max_window: int = 1 << 17):
        self.sealed = sealed
        self.direction = direction
        self.max_window = max_window
        self._keys: dict[int, tuple[bytes, ChaCha20Poly1305]] = {}
        self._windows: dict[int, _Window] = {}
        self.round_idx = 0  # frames of an earlier round are stale, whatever the device's window has seen
        self.rejected: Counter[int] = Counter()  # claimed device id -> frames rejected, over the run
        self.reasons: Counter[str] = Counter()

    def admit(self, device_id: int, key: bytes) -> None:
        """Device (re-)registered: from now on only frames under this key are its (the same key again, from a
        repeated registration of the same process, keeps its replay window)."""
        known = self._keys.get(device_id)
        if known is not None and known[0] == key:
            return
        self._keys[device_id] = (key, ChaCha20Poly1305(key))
        self._windows.pop(device_id, None)

    def begin_round(self, round_idx: int) -> None:
        """The BS opened round `round_idx`: a frame of an earlier round, recorded off the air and played back, is
        stale even when it is one the device's window never saw (lost on the air in its own round)."""
        self.round_idx = round_idx

    def open(self, frame: Frame) -> Frame:
        """The frame with its fragment in the clear, or FrameRejected (counted against the claimed device)."""
        try:
            return self._open(frame)
        except FrameRejected as exc:
            self.rejected[frame.device_id] += 1
            self.reasons[exc.reason] += 1
            raise

    def _open(self, frame: Frame) -> Frame:
        if not self.sealed:
            if frame.sealed:
                raise FrameRejected("unexpected_seal", "a sealed frame, but this run does not seal frames")
            return frame
        if not frame.sealed:
            raise FrameRejected("unsealed", "an unsealed frame: this run seals every frame")
        known = self._keys.get(frame.device_id)
        if known is None:
            raise FrameRejected("no_key", f"no key for device {frame.device_id}: it is not registered")
        try:
            fragment = known[1].decrypt(_nonce(frame, self.direction), frame.payload, frame.header_bytes())
        except InvalidTag:
            raise FrameRejected("forged", "the seal does not verify (forged, corrupted or under another key)") from None
        if frame.round_idx < self.round_idx:
            raise FrameRejected("stale_round", f"a frame of round {frame.round_idx} in round {self.round_idx}")
        window = self._windows.get(frame.device_id)
        if window is None or window.round_idx != frame.round_idx:
            if window is not None and frame.round_idx < window.round_idx:
                raise FrameRejected("stale_round", f"a frame of round {frame.round_idx} after round {window.round_idx}")
            window = self._windows[frame.device_id] = _Window(frame.round_idx, set())
        tag = (frame.seq, frame.attempt)
        if tag in window.seen:
            raise FrameRejected("replayed", f"seq {frame.seq} attempt {frame.attempt} was received already")
        if len(window.seen) >= self.max_window:
            raise FrameRejected("window_full", f"more than {self.max_window} frames in round {frame.round_idx}")
        window.seen.add(tag)
        return replace(frame, payload=fragment, sealed=False)


class FrameKeyring:
    """The BS's side of key agreement: a fresh salt per registration and the frame key it gives with the roster."""

    def __init__(self, bs_secret: bytes, device_public: Mapping[int, bytes], run_id: str):
        self._secret = bs_secret
        self._public = dict(device_public)
        self.run_id = run_id

    def knows(self, device_id: int) -> bool:
        return device_id in self._public

    def issue(self, device_id: int) -> tuple[bytes, bytes]:
        """(salt for the welcome, frame key for the gate) of a new registration of device_id."""
        salt = new_salt()
        key = frame_key(self._secret, self._public[device_id], device_id=device_id, run_id=self.run_id, salt=salt)
        return salt, key
