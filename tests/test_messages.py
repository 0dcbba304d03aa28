"""Control-plane messages: what we send validates, and what a peer sends is checked field by field."""

import json

import pytest

from proto import control as messages
from proto.control import MessageError, decode, encode

PLAN = dict(
    round=3,
    deadline_s=60.0,
    participate=True,
    rank=8,
    depth=6,
    tx_power_dbm=10.0,
    bandwidth_hz=2.5e5,
    modulation="qpsk",
    keep_fraction=1.0,
    local_steps=25,
)


def test_round_trip_every_type():
    samples = {
        "register": dict(device_id=1, host="h", pid=5),
        "heartbeat": dict(device_id=1, state="training", round=2, step=3, steps=25, loss=0.7),
        "burst_end": dict(device_id=1, round=2, attempt=1, seqs=[0, 1, 2], total=3),
        "report": dict(device_id=1, round=2, status="ok", measurements={"energy_j": 3.0}, error=None),
        "bye": dict(device_id=1, reason="x"),
        "welcome": dict(device_id=1, experiment={}, bench={}, run_id="r", data_address="tcp://h:1"),
        "plan": PLAN,
        "ack": dict(round=2, attempt=1, received=[0, 2]),
        "report_ack": dict(round=2),
        "reject": dict(reason="no"),
        "shutdown": dict(reason="done"),
    }
    assert set(samples) == set(messages.SCHEMAS)
    for kind, fields in samples.items():
        msg = decode(encode(kind, **fields))
        assert msg["type"] == kind and all(msg[k] == v for k, v in fields.items())


def raw(**msg) -> bytes:
    return json.dumps({"v": 1, **msg}).encode()


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"\xff\xfe", "not a JSON message"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"v": 9, "type": "plan"}).encode(), "protocol version 9"),
        (raw(type="launch_missiles"), "unknown message type"),
        (raw(type="register", device_id=1, host="h"), "register: missing field 'pid'"),
        (raw(type="register", device_id="1", host="h", pid=3), "register.device_id: expected int"),
        (raw(type="register", device_id=True, host="h", pid=3), "got a boolean"),
        (raw(type="register", device_id=1, host="h", pid=3, admin=True), "unknown field(s) ['admin']"),
        (raw(type="ack", round=1, attempt=1, received=[1, -4]), "frame sequence number"),
        (b'{"v": 1, "type": "plan", "deadline_s": NaN}', "non-finite"),
        (b"x" * (messages.MAX_MESSAGE_BYTES + 1), "exceeds"),
    ],
)
def test_bad_messages_are_named(data: bytes, needle: str):
    with pytest.raises(MessageError) as info:
        decode(data)
    assert needle in str(info.value)


def test_encode_refuses_what_decode_would_reject():
    with pytest.raises(MessageError):
        encode("plan", **{**PLAN, "rank": "eight"})
    with pytest.raises(ValueError):
        encode("heartbeat", device_id=1, state="x", loss=float("nan"))
