"""ZeroMQ CURVE on our sockets: a server admits only the roster's keys, and each message says whose key sent it.

One `RosterAuthenticator` per process (ZeroMQ allows one ZAP handler per context) runs pyzmq's
`ThreadAuthenticator` with a callback that admits a key only if the roster names it, and gives each admitted
connection a User-Id, "device:<k>" or "bs", that every message received on it carries. A socket that reads
messages asks `sender_of(frame)` and compares it with the device id the message claims: a peer holding device
1's key cannot speak as device 2. An unknown key is refused and logged once (at most `MAX_LOGGED_KEYS` are
remembered, so a flood of fresh keys costs bounded memory and one line each up to that bound).
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from trust.keys import KeyPair, Roster

ZAP_DOMAIN = "fedlora"  # devices and the BS (the BS's control socket, the air's request socket)
BS_ONLY_DOMAIN = "fedlora-bs"  # the BS alone (the air's medium)
BS_USER = "bs"
MAX_LOGGED_KEYS = 1024

log = logging.getLogger("trust")


def device_user(device_id: int) -> str:
    return f"device:{device_id}"


def user_device(user: str | None) -> int | None:
    """The device id of a User-Id ("device:3" -> 3), None for the BS or no User-Id."""
    if user is None or not user.startswith("device:"):
        return None
    return int(user.split(":", 1)[1])


class _Domain:
    """pyzmq's credentials provider for one ZAP domain: which of the roster's keys it admits."""

    def __init__(self, owner: RosterAuthenticator, keys: set[str]):
        self.owner, self.keys = owner, keys

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode() if isinstance(key, bytes) else str(key)
        return text in self.keys or self.owner.refuse(text, domain)


class RosterAuthenticator:
    """The process's ZAP handler. Domain ZAP_DOMAIN admits the roster's device keys and the BS's key,
    BS_ONLY_DOMAIN the BS's key alone; `make_server(..., domain=...)` says which a socket uses."""

    def __init__(self, context: zmq.Context, roster: Roster):
        self._users = {key: device_user(k) for k, key in roster.devices.items()} | {roster.bs: BS_USER}
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("trust.zap"))
        self._auth.curve_user_id = self._user_id  # type: ignore[method-assign]
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_Domain(self, set(self._users)))
        self._auth.configure_curve_callback(BS_ONLY_DOMAIN, credentials_provider=_Domain(self, {roster.bs}))

    def refuse(self, text: str, domain: str) -> bool:
        """Count and log (once per key) a refused key; always False."""
        with self._lock:
            if text not in self._logged and len(self._logged) < MAX_LOGGED_KEYS:
                self._logged.add(text)
                known = "an unknown key" if text not in self._users else f"the key of {self._users[text]}"
                log.warning("CURVE: refused a peer with %s %s on %s (logged once per key)", known, text, domain)
        return False

    def _user_id(self, client_public_key: bytes) -> str:
        return self._users.get(z85.encode(client_public_key).decode(), "unknown")

    def stop(self) -> None:
        self._auth.stop()


HANDSHAKE_TIMEOUT_MS = 5000  # a CURVE handshake not finished by then is dropped, with what it made us buffer


def make_server(
    sock: zmq.Socket, own: KeyPair, domain: str = ZAP_DOMAIN, *, max_message_bytes: int | None = None
) -> None:
    """Before bind: this socket accepts only CURVE clients that the process's authenticator admits in domain.

    max_message_bytes: the socket's largest legitimate message part. libzmq reads the handshake's commands with
    the same decoder as messages, so this is also what a stranger can make us buffer per connection before any
    key is checked (a bigger declared frame closes the connection at its header), for at most
    HANDSHAKE_TIMEOUT_MS. None leaves libzmq's default (no limit): only for sockets whose callers set it."""
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
    sock.curve_server = True
    sock.curve_secretkey = own.secret.encode()
    sock.curve_publickey = own.public.encode()
    sock.zap_domain = domain.encode()


def make_client(sock: zmq.Socket, own: KeyPair, server_public: str) -> None:
    """Before connect: this socket talks CURVE to the server whose public key is server_public (Z85)."""
    sock.curve_secretkey = own.secret.encode()
    sock.curve_publickey = own.public.encode()
    sock.curve_serverkey = server_public.encode()


def routing_id(device_id: int) -> bytes:
    """A device's control-socket routing id: its name, then 16 random bytes. A ROUTER ignores a second connection
    that claims an id in use, so a guessable id (the pid) let an insider connect first and lock the device out;
    this one cannot be guessed, and CURVE carries it encrypted (the handshake's INITIATE), so it is never seen."""
    return f"device-{device_id}:".encode() + secrets.token_bytes(16)


def routing_id_device(identity: bytes) -> int | None:
    """The device a routing id names ("device-3:..." -> 3); None for any other id."""
    head, sep, _ = identity.partition(b":")
    if not sep or not head.startswith(b"device-") or not head[7:].isdigit() or len(head) > 12:
        return None
    return int(head[7:])


def recv_bounded(sock: zmq.Socket, max_parts: int, flags: int = 0) -> tuple[list[zmq.Frame], int]:
    """One message, keeping at most max_parts of its parts: (the kept parts, how many it had).

    libzmq holds every part of a message before the first can be read, and no socket option bounds how many there
    are, so a peer's 40,000-part message is in memory once it is readable; this reads it without a second copy,
    releasing each part beyond max_parts as it goes, and hands what it freed back to the system."""
    kept: list[zmq.Frame] = [sock.recv(flags, copy=False)]
    count = 1
    while sock.getsockopt(zmq.RCVMORE):
        part = sock.recv(copy=False)
        count += 1
        if len(kept) < max_parts:
            kept.append(part)
    if count > max_parts:
        release_freed_memory()
    return kept, count


def release_freed_memory() -> None:
    """glibc keeps freed small blocks in its arenas: after a flood of parts, hand them back (a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sender_of(frame: zmq.Frame) -> str | None:
    """The User-Id the authenticator gave the connection a received frame came on (None without CURVE)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None
