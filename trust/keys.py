"""Device identities: Curve25519 key pairs for the BS and each device, and the public roster the BS trusts.

A key directory holds, for a lab of K devices::

    roster.json             public: the BS's key and every device's key (what the BS and the air load)
    bs.secret.json          the BS's key pair (mode 0600)
    device-<k>.secret.json  device k's key pair and the BS's public key (mode 0600): all an edge host needs

Keys are stored Z85-encoded, as ZeroMQ's CURVE takes them. The same key pair authenticates a peer on the
control plane (CURVE) and derives the frame-sealing keys (`trust.sealing`), each with its own key derivation.
Generation uses `cryptography`'s X25519 (OpenSSL); nothing here is hand-written cryptography.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from zmq.utils import z85

from config import BenchConfig
from trust.run_files import ownership_problem

ROSTER_FILE = "roster.json"
BS_SECRET_FILE = "bs.secret.json"
ROSTER_FORMAT: Final = "fedlora-roster/1"
KEY_FORMAT: Final = "fedlora-key/1"
MAX_DEVICES = 0xFFFF  # the frame header's device id is a u16


class KeyFileError(ValueError):
    """A key file or roster is missing, unreadable, malformed, or readable by others."""


def device_secret_file(device_id: int) -> str:
    return f"device-{device_id}.secret.json"


def _check_z85_key(value: str) -> str:
    if len(value) != 40:
        raise ValueError(f"a Curve25519 key is 40 Z85 characters, got {len(value)}")
    try:
        z85.decode(value)
    except Exception as exc:  # z85.decode raises KeyError/ValueError on bad characters
        raise ValueError("not Z85") from exc
    return value


Z85Key = Annotated[str, Field(min_length=40, max_length=40)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Roster(_Model):
    """The public keys a BS run trusts: its own, and device id -> key."""

    format: Literal["fedlora-roster/1"] = ROSTER_FORMAT
    bs: Z85Key
    devices: dict[int, Z85Key]

    @field_validator("bs")
    @classmethod
    def _bs_key(cls, v: str) -> str:
        return _check_z85_key(v)

    @field_validator("devices", mode="before")
    @classmethod
    def _device_keys(cls, v: object) -> object:
        if isinstance(v, dict):  # JSON object keys are strings; ids are ints
            try:
                v = {int(k): val for k, val in v.items()}
            except ValueError as exc:
                raise ValueError(f"device ids must be integers: {exc}") from None
            for k, val in v.items():
                if not 0 <= k <= MAX_DEVICES:
                    raise ValueError(f"device id {k} outside 0..{MAX_DEVICES}")
                if isinstance(val, str):
                    _check_z85_key(val)
            if len(set(v.values())) != len(v):
                raise ValueError("two devices share one key: a key must name one device")
        return v

    def public_bytes(self, device_id: int) -> bytes:
        return z85.decode(self.devices[device_id])


class KeyPair(_Model):
    """One party's key pair; a device's file also carries the BS's public key, so it needs nothing else."""

    format: Literal["fedlora-key/1"] = KEY_FORMAT
    role: Literal["bs", "device"]
    device_id: int | None = Field(None, ge=0, le=MAX_DEVICES)
    public: Z85Key
    secret: Z85Key
    bs_public: Z85Key | None = None

    @field_validator("public", "secret", "bs_public")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return None if v is None else _check_z85_key(v)

    @property
    def secret_bytes(self) -> bytes:
        return z85.decode(self.secret)

    @property
    def bs_public_bytes(self) -> bytes:
        if self.bs_public is None:
            raise KeyFileError("this key file carries no BS public key")
        return z85.decode(self.bs_public)


def run_keys_dir(bench: BenchConfig, run_dir: Path) -> Path:
    """Where a run's keys are: the bench's key directory, else the run's own (the BS provisions it at start-up)."""
    return Path(bench.security.keys_dir) if bench.security.keys_dir else Path(run_dir) / "keys"


@dataclass(frozen=True)
class RunKeys:
    """What a BS (or the air beside it) holds of a run's identities."""

    key_dir: Path
    roster: Roster
    bs: KeyPair
    provisioned: bool  # made for this run, just now

    def device_public(self, devices: int) -> dict[int, bytes]:
        return {k: self.roster.public_bytes(k) for k in range(devices)}


def open_run_keys(bench: BenchConfig, run_dir: Path, devices: int) -> RunKeys:
    """The bench's key directory, or the run's own, provisioned for `devices` if it has no roster yet; checked:
    the roster's BS key is the BS key file's, and it names every device of the experiment."""
    key_dir = run_keys_dir(bench, run_dir)
    provisioned = False
    if bench.security.keys_dir is None and not (key_dir / ROSTER_FILE).exists():
        provision(key_dir, devices)
        provisioned = True
    keys = load_run_keys(key_dir)
    roster = keys.roster
    missing = [k for k in range(devices) if k not in roster.devices]
    if missing:
        raise KeyFileError(
            f"{key_dir}/{ROSTER_FILE} has no key for device(s) {missing[:10]} of the experiment's {devices} "
            f"(provision them: fedlora-keys init DIR --devices {devices})"
        )
    return RunKeys(key_dir, roster, keys.bs, provisioned)


def load_run_keys(key_dir: Path) -> RunKeys:
    """A key directory's roster and BS key pair, checked to belong together."""
    key_dir = Path(key_dir)
    roster, bs = load_roster(key_dir), load_bs_key(key_dir)
    if roster.bs != bs.public:
        raise KeyFileError(f"{key_dir}: {ROSTER_FILE}'s BS key is not {BS_SECRET_FILE}'s")
    return RunKeys(key_dir, roster, bs, provisioned=False)


def generate_pair() -> tuple[str, str]:
    """(public, secret), Z85-encoded."""
    private = X25519PrivateKey.generate()
    secret = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return z85.encode(public).decode(), z85.encode(secret).decode()


def provision(key_dir: Path, devices: int, *, force: bool = False) -> Roster:
    """Make a BS key pair and one per device (ids 0..devices-1) in key_dir; refuses to overwrite keys."""
    if not 1 <= devices <= MAX_DEVICES + 1:
        raise KeyFileError(f"devices must be in 1..{MAX_DEVICES + 1}, got {devices}")
    key_dir = Path(key_dir)
    if (key_dir / ROSTER_FILE).exists() and not force:
        raise KeyFileError(f"{key_dir / ROSTER_FILE} exists: keys are not overwritten (pass force to make new ones)")
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    bs_public, bs_secret = generate_pair()
    _write_private(key_dir / BS_SECRET_FILE, KeyPair(role="bs", public=bs_public, secret=bs_secret))
    device_keys: dict[int, str] = {}
    for k in range(devices):
        public, secret = generate_pair()
        pair = KeyPair(role="device", device_id=k, public=public, secret=secret, bs_public=bs_public)
        _write_private(key_dir / device_secret_file(k), pair)
        device_keys[k] = public
    roster = Roster(bs=bs_public, devices=device_keys)
    _write_atomic(key_dir / ROSTER_FILE, roster.model_dump_json(indent=2).encode(), mode=0o644)
    return roster


def load_roster(key_dir: Path) -> Roster:
    path = Path(key_dir) / ROSTER_FILE
    raw = _read(path)
    if (problem := ownership_problem(path, secret=False)) is not None:
        raise KeyFileError(f"{path}: {problem}")
    return _parse(path, Roster, raw)


def load_key(path: Path, *, role: Literal["bs", "device"], device_id: int | None = None) -> KeyPair:
    """A private key file, checked: only its owner may read it, and it is the role (and device) asked for."""
    path = Path(path)
    raw = _read(path)
    if (problem := ownership_problem(path, secret=True)) is not None:
        raise KeyFileError(f"{path}: a private key {problem}")
    pair = _parse(path, KeyPair, raw)
    if pair.role != role:
        raise KeyFileError(f"{path}: a {pair.role} key, expected a {role} key")
    if role == "device":
        if pair.device_id is None or pair.bs_public is None:
            raise KeyFileError(f"{path}: a device key needs device_id and bs_public")
        if device_id is not None and pair.device_id != device_id:
            raise KeyFileError(f"{path}: the key of device {pair.device_id}, not of device {device_id}")
    return pair


def load_bs_key(key_dir: Path) -> KeyPair:
    return load_key(Path(key_dir) / BS_SECRET_FILE, role="bs")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


_M = TypeVar("_M", Roster, KeyPair)


def _parse(path: Path, model: type[_M], raw: bytes) -> _M:
    try:
        return model.model_validate(json.loads(raw), strict=False)
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) if first else ""
        what = first["msg"] if first else str(exc)
        raise KeyFileError(f"{path}: {where + ': ' if where else ''}{what}") from None


def _write_private(path: Path, pair: KeyPair) -> None:
    _write_atomic(path, pair.model_dump_json(indent=2, exclude_none=True).encode(), mode=0o600)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Created with its final mode (no window in which a secret is world-readable), fsynced, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
