"""Control-plane messages between the BS and the edges: small, versioned, schema-checked JSON.

Every message is a JSON object with `v` (protocol version), `type` and the fields its schema lists. A
message may carry one binary attachment (the global adapter view in a plan) as a second zmq frame.
`decode` never trusts the peer: unknown types, missing or mistyped fields and wrong versions raise
`MessageError` with the field named, and the caller logs it with the peer and carries on.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # the JSON part; attachments are checked by their own codec

_num = (int, float)
_opt_num = (int, float, type(None))

# type -> {field: (allowed python types, required)}
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    # edge -> BS
    "register": {"device_id": ((int,), True), "host": ((str,), True), "pid": ((int,), True)},
    "heartbeat": {
        "device_id": ((int,), True),
        "state": ((str,), True),
        "round": ((int,), False),
        "step": ((int,), False),
        "steps": ((int,), False),
        "loss": (_opt_num, False),
    },
    "burst_end": {
        "device_id": ((int,), True),
        "round": ((int,), True),
        "attempt": ((int,), True),
        "seqs": ((list,), True),
        "total": ((int,), True),
    },
    "report": {
        "device_id": ((int,), True),
        "round": ((int,), True),
        "status": ((str,), True),
        "measurements": ((dict,), True),
        "error": ((str, type(None)), False),
    },
    "bye": {"device_id": ((int,), True), "reason": ((str,), False)},
    # BS -> edge
    "welcome": {
        "device_id": ((int,), True),
        "experiment": ((dict,), True),
        "bench": ((dict,), True),
        "run_id": ((str,), True),
        "data_address": ((str,), True),
    },
    "plan": {
        "round": ((int,), True),
        "deadline_s": (_num, True),
        "participate": ((bool,), True),
        "rank": ((int,), True),
        "depth": ((int,), True),
        "tx_power_dbm": (_num, True),
        "bandwidth_hz": (_num, True),
        "modulation": ((str,), True),
        "keep_fraction": (_num, True),
        "local_steps": ((int,), True),
    },
    "ack": {"round": ((int,), True), "attempt": ((int,), True), "received": ((list,), True)},
    "report_ack": {"round": ((int,), True)},
    "reject": {"reason": ((str,), True)},
    "shutdown": {"reason": ((str,), True)},
}


class MessageError(ValueError):
    """A control message is malformed; the text names the field (the caller adds the peer)."""


def encode(msg_type: str, **fields: Any) -> bytes:
    """Serialise a message after checking it against its schema (so we never send what we would reject)."""
    msg = {"v": PROTOCOL_VERSION, "type": msg_type, **fields}
    validate(msg)
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        msg = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"not a JSON message: {exc}") from None
    validate(msg)
    return msg


def _reject_constant(name: str) -> Any:
    raise MessageError(f"non-finite number {name} in message")


def validate(msg: Any) -> None:
    if not isinstance(msg, dict):
        raise MessageError(f"message must be a JSON object, got {type(msg).__name__}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {msg.get('v')!r} is not supported (expected {PROTOCOL_VERSION})")
    msg_type = msg.get("type")
    schema = SCHEMAS.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise MessageError(f"unknown message type {msg_type!r}")
    for name, (types_, required) in schema.items():
        if name not in msg:
            if required:
                raise MessageError(f"{msg_type}: missing field {name!r}")
            continue
        value = msg[name]
        if isinstance(value, bool) and bool not in types_:
            raise MessageError(f"{msg_type}.{name}: expected {_names(types_)}, got a boolean")
        if not isinstance(value, types_):
            raise MessageError(f"{msg_type}.{name}: expected {_names(types_)}, got {type(value).__name__}")
    extra = set(msg) - set(schema) - {"v", "type"}
    if extra:
        raise MessageError(f"{msg_type}: unknown field(s) {sorted(extra)}")
    if msg_type in ("burst_end", "ack"):
        key = "seqs" if msg_type == "burst_end" else "received"
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 65536 for s in msg[key]):
            raise MessageError(f"{msg_type}.{key}: every entry must be a frame sequence number 0..65535")


def _names(types_: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types_)
