"""The air's two bound sockets and what each takes from a peer before and after authentication.

ZeroMQ reads the CURVE handshake's commands with the same decoder as messages, so a socket's MAXMSGSIZE is also
what a stranger with no key can make the air hold per connection, and HANDSHAKE_IVL how long (docs/security.md,
"The air before authentication"). Each limit is the largest part a legitimate peer sends on that socket: a chunk of
a burst on the request socket (proto.air: bursts go in chunks for this), the handshake alone on the medium.
"""

from __future__ import annotations

import zmq

from proto.air import CHUNK_BYTES, MAX_HEADER_BYTES, MEDIUM_QUEUE_CHUNKS
from trust.curve import BS_ONLY_DOMAIN, HANDSHAKE_TIMEOUT_MS, make_server
from trust.keys import KeyPair

CURVE_BOX_BYTES = 33  # a CURVE MESSAGE command around a part: name, nonce, MAC, flags (libzmq checks this size)
REQUEST_MAX_PART_BYTES = max(CHUNK_BYTES, MAX_HEADER_BYTES) + CURVE_BOX_BYTES  # a chunk's IQ, boxed
REQUEST_RCVHWM = 16  # messages ZeroMQ queues per peer before it stops reading that peer's connection
# the medium's peer (the BS) sends nothing but the CURVE handshake: HELLO (200 bytes) and INITIATE (257 + its
# metadata: 277 bytes from a libzmq 4.3 PULL, measured); the slack is for longer metadata
MEDIUM_MAX_PART_BYTES = 512


def request_socket(ctx: zmq.Context, address: str, bs_key: KeyPair | None) -> zmq.Socket:
    """ROUTER for the edges and the BS, bound (bs_key: CURVE server admitting the roster; None: no security)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, REQUEST_MAX_PART_BYTES)  # a bigger part closes the connection at its header
    sock.setsockopt(zmq.RCVHWM, REQUEST_RCVHWM)
    return _bound(sock, address, bs_key)


def medium_socket(ctx: zmq.Context, address: str, bs_key: KeyPair | None) -> zmq.Socket:
    """PUSH of the medium to the BS, bound (bs_key: CURVE server admitting the BS's key alone)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, MEDIUM_QUEUE_CHUNKS)
    sock.setsockopt(zmq.MAXMSGSIZE, MEDIUM_MAX_PART_BYTES)
    return _bound(sock, address, bs_key, BS_ONLY_DOMAIN)


def _bound(sock: zmq.Socket, address: str, bs_key: KeyPair | None, *domain: str) -> zmq.Socket:
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)  # also without CURVE (make_server sets it with)
    if bs_key is not None:
        make_server(sock, bs_key, *domain)
    sock.bind(bindable(address))
    return sock


def bindable(address: str) -> str:
    """tcp://host:0 (any free port, as the bench writes it) in zmq's spelling, tcp://host:*."""
    return address[:-2] + ":*" if address.startswith("tcp://") and address.endswith(":0") else address
