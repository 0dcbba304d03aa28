"""Every decode function a peer's bytes reach returns a typed value or its protocol's error, whatever the bytes.

Property tests: arbitrary JSON (deep nesting, huge integers, huge floats, long strings, wrong types) put in
place of each field of a genuine message, and raw bytes, go through the real decode entry points; a report that
decodes goes on through the BS's report path (`apply_report`) and leaves only finite, plan-bounded numbers.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import asdict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bs_node.measurements import DeviceRound, apply_report
from proto import air
from proto.control import (
    BurstEnd,
    Bye,
    Heartbeat,
    Measurements,
    MessageError,
    Register,
    Report,
    ViewStatus,
    decode_control,
    decode_endpoints,
    encode,
)

MAX_UPDATE_BYTES = 10_000
EDGE_MESSAGES: list[Any] = [
    Register(device_id=1, host="h", pid=7),
    Heartbeat(device_id=1, state="training", round=2, step=3, steps=10, loss=0.5),
    BurstEnd(device_id=1, round=2, attempt=1, seqs=[0, 1], total=2),
    ViewStatus(device_id=1, round=2, attempt=1, received=[0], total=3),
    Report(
        device_id=1,
        round=2,
        status="ok",
        measurements=Measurements(update_bytes=900, frames_sent=3, frames_lost=1, airtime_s=0.1, energy_j=2.0),
    ),
    Bye(device_id=1, reason="done"),
]
HUGE_NUMBERS = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(1, 6000).map(lambda n: "-" + "9" * n),
    st.sampled_from(["1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "1" + "0" * 400 + ".5"]),
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.sampled_from(["\x1b[2J\x1b[1;1Hround 9 | accuracy 99.9 %", "ok\u202e\r\n", "\x00\x07\x9b"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _with_field(message: Any, field: str, text: str) -> bytes:
    """The message's JSON with one field's value (or a measurement's) replaced by raw JSON text."""
    obj = json.loads(encode(message))
    if field.startswith("measurements."):
        obj["measurements"][field.split(".", 1)[1]] = "@@"
    else:
        obj[field] = "@@"
    return json.dumps(obj).replace('"@@"', text).encode()


def _fields(message: Any) -> list[str]:
    names = [n for n in type(message).model_fields if n not in ("v", "type")]
    if isinstance(message, Report):
        names += [f"measurements.{n}" for n in Measurements.model_fields]
    return names


def _decode_and_apply(raw: bytes) -> None:
    """The BS's control path: decode (a message or MessageError), then a report's measurements into a row."""
    try:
        msg = decode_control(raw)
    except MessageError:
        return
    for name, value in msg:
        if isinstance(value, str):  # peer text reaches the live view and the logs: no escapes, no bidi tricks
            assert all(unicodedata.category(ch) not in ("Cc", "Cf") for ch in value), name
    if isinstance(msg, Report):
        row = DeviceRound(device_id=msg.device_id, participated=True, status="ok")
        apply_report(row, msg.measurements, MAX_UPDATE_BYTES)
        for name, value in asdict(row).items():
            if isinstance(value, float):
                assert math.isfinite(value), name
        assert row.update_bytes <= MAX_UPDATE_BYTES
        assert row.frames_lost <= max(row.frames_sent, 0) or msg.measurements.frames_sent is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(EDGE_MESSAGES) - 1),
    pick=st.integers(0, 40),
    value=st.one_of(HUGE_NUMBERS, JSON_VALUES.map(json.dumps), st.integers(1, 3000).map(_nested)),
)
def test_any_value_in_any_field_decodes_or_is_a_message_error(index, pick, value):
    message = EDGE_MESSAGES[index]
    fields = _fields(message)
    _decode_and_apply(_with_field(message, fields[pick % len(fields)], value))


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_any_bytes_decode_or_are_a_message_error_on_every_entry_point(raw):
    _decode_and_apply(raw)
    for decode in (decode_endpoints, air.decode_endpoints, air.decode_sidecar):
        try:
            decode(raw)
        except (MessageError, air.AirMessageError):
            pass
    for decode_frames in (air.decode_request, air.decode_reply, air.decode_medium):
        try:
            decode_frames([raw, b"\0" * 8])
        except air.AirMessageError:
            pass


def test_the_two_messages_that_killed_the_bs_are_refused_naming_the_problem():
    step = _with_field(Heartbeat(device_id=0, state="x", step=1), "step", "9" * 5000)
    report = _with_field(EDGE_MESSAGES[4], "measurements.update_bytes", str(10**400))
    for raw, needle in ((step, "5000 digits"), (report, "401 digits")):
        try:
            decode_control(raw)
        except MessageError as exc:
            assert needle in str(exc)
        else:
            raise AssertionError("decoded")


def test_a_report_above_its_plan_is_bounded_by_the_plan():
    row = DeviceRound(device_id=1, participated=True, status="ok")
    measured = Measurements(update_bytes=MAX_UPDATE_BYTES + 1, frames_sent=2, frames_lost=5, energy_j=1.5)
    problems = apply_report(row, measured, MAX_UPDATE_BYTES)
    assert sorted(p.split("=")[0] for p in problems) == ["frames_lost", "update_bytes"]
    assert (row.update_bytes, row.frames_lost, row.frames_sent, row.energy_j) == (0, 0, 2, 1.5)


def test_peer_text_reaches_the_bs_without_control_characters():
    bye = decode_control(b'{"v":5,"type":"bye","device_id":1,"reason":"\\u001b[2J\\u001b[Hfake line\\u202e\\r\\n"}')
    assert isinstance(bye, Bye) and bye.reason == "[2J[Hfake line"
    register = decode_control(_with_field(EDGE_MESSAGES[0], "host", '"lab\\u001b]0;title\\u0007-pc"'))
    assert isinstance(register, Register) and register.host == "lab]0;title-pc"
