"""Control-plane messages: every typed message round-trips, and any bad bytes become one MessageError naming the
message type and the field."""

import json
import math

import pytest

from proto.control import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    BurstEnd,
    Bye,
    Heartbeat,
    Measurements,
    MessageError,
    Plan,
    Register,
    Reject,
    Report,
    ReportAck,
    Shutdown,
    ViewStatus,
    Welcome,
    decode_control,
    encode,
    message_type,
)

PLAN = Plan(
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
SAMPLES = [
    Register(device_id=1, host="h", pid=5),
    Heartbeat(device_id=1, state="training", round=2, step=3, steps=25, loss=0.7),
    Heartbeat(device_id=1, state="idle"),
    BurstEnd(device_id=1, round=2, attempt=1, seqs=[0, 1, 65535], total=3),
    ViewStatus(device_id=1, round=2, attempt=1, received=[0, 3], total=5, timed_out=True),
    Report(
        device_id=1,
        round=2,
        status="ok",
        measurements=Measurements(energy_j=3.0, frames_sent=4, true_snr_db=-3.5, energy_source="rapl"),
    ),
    Report(device_id=1, round=2, status="failed", error="ValueError: no view"),
    Bye(device_id=1, reason="x"),
    Welcome(device_id=1, experiment={"seed": 0}, bench={"phy": "sim"}, run_id="r", data_address="tcp://h:1"),
    PLAN,
    PLAN.model_copy(update={"view_frames": 7, "view_sha256": "ab" * 32}),
    Ack(round=2, attempt=1, received=[0, 2]),
    ReportAck(round=2),
    Reject(reason="no"),
    Shutdown(reason="done"),
]


def test_every_message_type_round_trips():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)
    for msg in SAMPLES:
        data = encode(msg)
        assert json.loads(data)["v"] == PROTOCOL_VERSION == 5
        assert decode_control(data) == msg


def test_ints_are_accepted_where_floats_are_meant():
    data = json.dumps({**json.loads(encode(PLAN)), "deadline_s": 60}).encode()
    assert decode_control(data).deadline_s == 60.0


def raw(**msg) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **msg}).encode()


REGISTER = dict(type="register", device_id=1, host="h", pid=3)


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"x" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
        (b"\xff\xfe", "not a JSON message"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"v": 5, "type": "plan", "deadline_s": NaN}', "non-finite number NaN"),
        (b'{"v": 5, "type": "heartbeat", "device_id": 1, "state": "x", "loss": -Infinity}', "non-finite"),
        (json.dumps({"v": 1, "type": "plan"}).encode(), "protocol version 1 is not supported"),
        (json.dumps({"v": True, "type": "plan"}).encode(), "protocol version True"),
        (json.dumps({"type": "plan"}).encode(), "protocol version None"),
        (raw(type="launch_missiles"), "unknown message type 'launch_missiles'"),
        (raw(device_id=1), "unknown message type None"),
        (raw(**{**REGISTER, "pid": None}), "register.pid: Input should be a valid integer"),
        (raw(type="register", device_id=1, host="h"), "register.pid: missing field"),
        (raw(**{**REGISTER, "device_id": "1"}), "register.device_id: Input should be a valid integer"),
        (raw(**{**REGISTER, "device_id": True}), "register.device_id: Input should be a valid integer"),
        (raw(**{**REGISTER, "pid": 3.0}), "register.pid: Input should be a valid integer"),
        (raw(**{**REGISTER, "admin": True}), "register.admin: unknown field"),
        (raw(type="ack", round=1, attempt=1, received=[1, -4]), "ack.received.1: Input should be greater than"),
        (raw(type="burst_end", device_id=1, round=1, attempt=1, seqs=[65536], total=1), "burst_end.seqs.0"),
        (raw(type="burst_end", device_id=1, round=1, attempt=1, seqs=[True], total=1), "burst_end.seqs.0"),
        (raw(type="report", device_id=1, round=1, status="great"), "report.status"),
        (
            raw(type="report", device_id=1, round=1, status="ok", measurements={"energy_j": "5"}),
            "report.measurements.energy_j: Input should be a valid number",
        ),
        (
            raw(type="report", device_id=1, round=1, status="ok", measurements={"joules": 5}),
            "report.measurements.joules: unknown field",
        ),
        (raw(**{**json.loads(encode(PLAN)), "modulation": "64qam"}), "plan.modulation"),
        (raw(**{**json.loads(encode(PLAN)), "participate": 1}), "plan.participate: Input should be a valid boolean"),
        (raw(**{**json.loads(encode(PLAN)), "rank": [8]}), "plan.rank"),
    ],
)
def test_bad_bytes_are_one_error_naming_type_and_field(data: bytes, needle: str):
    with pytest.raises(MessageError) as info:
        decode_control(data)
    assert needle in str(info.value)


def test_encode_refuses_what_decode_would_reject():
    with pytest.raises(ValueError, match="loss"):  # no NaN or infinity is even built, so none is sent
        Heartbeat(device_id=1, state="x", loss=math.nan)
    with pytest.raises(ValueError, match="loss"):
        Heartbeat(device_id=1, state="x", loss=math.inf)
    with pytest.raises(MessageError, match="limit"):
        encode(Welcome(device_id=0, experiment={"x": "y" * MAX_MESSAGE_BYTES}, bench={}, run_id="r", data_address="d"))
    with pytest.raises(ValueError, match="reason"):  # a peer's free text is bounded where it is declared
        Reject(reason="x" * 5000)
    with pytest.raises(MessageError, match="not a control message"):
        encode(Measurements())
    with pytest.raises(ValueError):  # building a message checks it as strictly as decoding does
        Plan(**{**PLAN.model_dump(), "rank": "eight"})
    with pytest.raises(ValueError):
        Register(device_id=True, host="h", pid=1)


def test_every_type_tag_is_unique_and_matches_its_model():
    tags = [message_type(m) for m in MESSAGE_TYPES]
    assert len(set(tags)) == len(tags) == 12
    assert set(tags) == {
        "register",
        "heartbeat",
        "view_status",
        "burst_end",
        "report",
        "bye",
        "welcome",
        "plan",
        "ack",
        "report_ack",
        "reject",
        "shutdown",
    }
