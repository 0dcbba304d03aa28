"""Run files that hold model state: written private and crash-atomic, and the BS checkpoint's integrity key.

A checkpoint, the adapter and an edge's error-feedback file say what a run learned; they are written with mode
0600 from the moment they exist (created with it, never chmod-ed afterwards), fsynced, renamed over the old one,
and the folder fsynced: a crash at any moment leaves the old file or the new one, never half of one.

The checkpoint's tag is HMAC-SHA256 (python's hmac) under a per-run 32-byte key, `<run dir>/keys/checkpoint.key`
(0600 in a 0700 folder; docs/security.md "Checkpoint and resume"): whoever can edit the run folder's files but not
read that key cannot make a checkpoint a resume accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

CHECKPOINT_KEY_FILE = "checkpoint.key"
KEY_BYTES = 32


class RunFileError(ValueError):
    """A run file or key that cannot be used; the message names the file and what is wrong."""


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data`: created with `mode` (0600 by default), fsynced, renamed over the old file, the
    folder fsynced."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a stale tmp file of another mode keeps its mode under O_CREAT
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ownership_problem(path: Path, *, secret: bool) -> str | None:
    """Why a key or roster file cannot be trusted, or None. It must be this process's user's: whoever can write
    the folder above `keys/` could otherwise put a folder of their own there (a rename needs no access to the old
    one), with a roster that admits their key or a checkpoint key they know. A secret must also be unreadable by
    others, a roster unwritable by them."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this process's user (uid {os.geteuid()}): not trusted"
    mode = st.st_mode & 0o777
    if secret and mode & 0o077:
        return f"must be readable by its owner only (mode {mode:o}; chmod 600 it)"
    if not secret and mode & 0o022:
        return f"must be writable by its owner only (mode {mode:o}; chmod 644 it)"
    return None


def checkpoint_key_path(run_dir: Path) -> Path:
    return Path(run_dir) / "keys" / CHECKPOINT_KEY_FILE


def checkpoint_key(run_dir: Path, *, create: bool) -> bytes:
    """The run's checkpoint key; made (32 random bytes, 0600, its folder 0700) when `create` and there is none."""
    path = checkpoint_key_path(run_dir)
    if not path.exists():
        if not create:
            raise RunFileError(f"{path}: missing: the checkpoint's integrity tag cannot be checked")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        write_atomic(path, secrets.token_bytes(KEY_BYTES))
    problem = ownership_problem(path, secret=True)
    if problem is not None:
        raise RunFileError(f"{path}: {problem}")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise RunFileError(f"{path}: {len(key)} bytes, a checkpoint key has {KEY_BYTES}")
    return key


def tag(key: bytes, data: bytes) -> str:
    """HMAC-SHA256 of `data` under `key`, hex."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def tag_matches(key: bytes, data: bytes, expected: str) -> bool:
    """Whether `expected` is the tag of `data` (compared in constant time)."""
    return hmac.compare_digest(tag(key, data), expected)
