"""Control-plane messages between the BS and the edges: small, versioned, typed JSON.

Every message is a JSON object with `v` (protocol version), `type` (which model it is) and that model's fields;
a message may carry one binary attachment (the global adapter view in a plan) as a second zmq frame. Each
message is one pydantic model here, declared once and used typed on both sides. `decode_control` never trusts
the peer: bad bytes of any kind raise one `MessageError` naming the message type and the field, and the caller
logs it with the peer and carries on.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Annotated, Any, Final, Literal, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from proto.numerology import Modulation

# 5: the view over the PHY (plan.view_frames, view_sha256; view_status); 4: plan.center_freq_hz,
# measurements.radio_underruns (radios); 3: frame_salt, reject.kind
PROTOCOL_VERSION: Final = 5
MAX_MESSAGE_BYTES: Final = 1 << 20  # the JSON part; attachments are checked by their own codec
# a plan's verdict on the device's earlier updates covers the rounds [round - this, round): see Plan
AGGREGATED_WINDOW_ROUNDS: Final = 16

FrameSeq = Annotated[int, Field(ge=0, le=65535)]  # a frame's sequence number (proto.framing: u16)
# A module's rank and depth travel in one byte each (the update codec's header): the largest either can be.
MAX_MODULE_RANK: Final = 255
MAX_MODULE_DEPTH: Final = 255
ModuleRank = Annotated[int, Field(ge=1, le=MAX_MODULE_RANK)]
ModuleDepth = Annotated[int, Field(ge=1, le=MAX_MODULE_DEPTH)]
RoundIndex = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]  # u32 in the frame and codec headers
# Bounded numbers and strings for everything an edge says: a peer's message can only carry values the BS can
# hold, compare and print (an unbounded int once overflowed a float conversion at the round close).
DeviceId = Annotated[int, Field(ge=0, le=65535)]  # u16 in the frame header
Count = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]  # steps, frames, attempts, examples, components
ByteCount = Annotated[int, Field(ge=0, le=1 << 40)]
Seconds = Annotated[float, Field(ge=0.0, le=1e7)]
Joules = Annotated[float, Field(ge=0.0, le=1e9)]
Decibels = Annotated[float, Field(ge=-400.0, le=400.0)]
Magnitude = Annotated[float, Field(ge=0.0, le=1e30)]  # losses and norms: non-negative, finite, float32-sized


def _printable(text: str) -> str:
    """A peer's text without control or format characters (escape sequences, bidi overrides): it reaches the
    terminal's live view and the logs, where it could otherwise draw fake lines."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf"))


ShortText = Annotated[str, Field(max_length=256), AfterValidator(_printable)]  # names, hosts, states
LongText = Annotated[str, Field(max_length=4096), AfterValidator(_printable)]  # reasons and errors, logged
MAX_JSON_NUMBER_CHARS: Final = 64  # a number in a control message is a u32, a byte count or a float64
ReportStatus = Literal["ok", "undelivered", "failed"]  # delivered / not every frame acknowledged / round failed


class MessageError(ValueError):
    """A control message is malformed; the text names the message type and the field (the caller adds the peer)."""


class _Strict(BaseModel):
    """No coercion (no bool for int, no "1" for 1), no unknown fields, immutable once built."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Message(_Strict):
    v: Literal[5] = PROTOCOL_VERSION


# ---------------------------------------------------------------------------------------------- edge -> BS
class Register(_Message):
    """An edge announces itself (again after a restart, or when the BS says it does not know it)."""

    type: Literal["register"] = "register"
    device_id: DeviceId
    host: ShortText
    pid: Count


class Heartbeat(_Message):
    """Liveness and progress; `state` is free text for the live view (ready, idle, training, sending, ...)."""

    type: Literal["heartbeat"] = "heartbeat"
    device_id: DeviceId
    state: ShortText
    round: RoundIndex | None = None
    step: Count | None = None
    steps: Count | None = None
    loss: Magnitude | None = None


class BurstEnd(_Message):
    """ARQ: the edge finished sending one attempt's frames and asks which of the round's frames the BS holds."""

    type: Literal["burst_end"] = "burst_end"
    device_id: DeviceId
    round: RoundIndex
    attempt: Annotated[int, Field(ge=0, le=65535)]
    seqs: Annotated[list[FrameSeq], Field(max_length=65536)]
    total: Annotated[int, Field(ge=0, le=65536)]


class ViewStatus(_Message):
    """Downlink over the PHY: after each downlink burst of its view that ends an attempt (or when none came in
    time), the edge says which of the view's frames it holds; the BS resends the rest while attempts are left."""

    type: Literal["view_status"] = "view_status"
    device_id: DeviceId
    round: RoundIndex
    attempt: Annotated[int, Field(ge=0, le=65535)]  # the view's attempts this edge heard end (0: none yet)
    received: Annotated[list[FrameSeq], Field(max_length=65536)]
    total: Annotated[int, Field(ge=1, le=65535)]
    timed_out: bool = False  # no burst came for a while: the edge asks again (the BS's last attempt may be lost)


class Measurements(_Strict):
    """What an edge measured of its own round (absent when the round failed before it was measured)."""

    update_bytes: ByteCount | None = None  # the encoded update
    uplink_bytes: ByteCount | None = None  # frame bytes put on the air, retransmissions included
    frames_sent: Count | None = None
    frames_lost: Count | None = None  # transmissions the BS did not acknowledge
    arq_attempts: Count | None = None
    airtime_s: Seconds | None = None
    compute_s: Seconds | None = None  # CPU-seconds of local training (scaled for emulated slower hardware)
    train_wall_s: Seconds | None = None
    compute_energy_j: Joules | None = None
    transmit_energy_j: Joules | None = None
    energy_j: Joules | None = None
    energy_source: ShortText | None = None  # "rapl" or "cpu_model" (+ the emulated slow-down)
    train_loss: Magnitude | None = None
    train_examples: Count | None = None
    kept_components: Count | None = None  # rank components sent (all modules), of total_components
    total_components: Count | None = None
    residual_norm: Magnitude | None = None  # error-feedback residual the device keeps for later rounds
    true_snr_db: Decibels | None = None  # the channel's true SNR of the last burst: sim PHYs only, ground truth
    radio_underruns: Count | None = None  # rf: the edge radio's transmit underruns this round (None: not counted)
    downlink_snr_db: Decibels | None = None  # downlink over the PHY: mean SNR measured on the view's frames


class Report(_Message):
    """The edge's account of one round; sent whatever became of the update."""

    type: Literal["report"] = "report"
    device_id: DeviceId
    round: RoundIndex
    status: ReportStatus
    measurements: Measurements = Measurements()
    error: LongText | None = None


class Bye(_Message):
    """The edge leaves the run (stopped, or the BS ended the run)."""

    type: Literal["bye"] = "bye"
    device_id: DeviceId
    reason: LongText | None = None


# ---------------------------------------------------------------------------------------------- BS -> edge
class Welcome(_Message):
    """Registration accepted: the whole resolved experiment and bench, so a lab configures only the BS."""

    type: Literal["welcome"] = "welcome"
    device_id: DeviceId
    experiment: dict[str, Any]
    bench: dict[str, Any]
    run_id: ShortText
    data_address: ShortText
    # this registration's frame-key salt (hex): the edge derives its frame key from it (trust.sealing); None when
    # the bench does not seal frames
    frame_salt: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None


class Plan(_Message):
    """What one device does in a round; a participant's plan carries the adapter view as its attachment.

    `aggregated_rounds` is the BS's verdict on the device's earlier updates, for its error feedback: of the rounds
    in [round - AGGREGATED_WINDOW_ROUNDS, round) (all closed when a plan is sent), exactly those listed aggregated
    an update of this device (fresh; reusing it stale later changes nothing). An update the device sent in any
    other round of the window was not aggregated, and it folds it back into its residual. Every ready device gets
    a plan each round, participant or not; the window makes one lost plan or a few skipped rounds harmless.
    None: no verdict (the device keeps what it sent pending)."""

    type: Literal["plan"] = "plan"
    round: RoundIndex
    deadline_s: Seconds
    participate: bool
    rank: ModuleRank
    depth: ModuleDepth
    tx_power_dbm: Decibels
    bandwidth_hz: Annotated[float, Field(ge=0.0, le=1e12)]
    modulation: Modulation
    keep_fraction: Annotated[float, Field(ge=0.0, le=1.0)]  # share of rank components sent (1.0 = dense)
    local_steps: Count
    aggregated_rounds: Annotated[list[RoundIndex], Field(max_length=AGGREGATED_WINDOW_ROUNDS)] | None = None
    # rf benches: the carrier the device transmits on this round (its FDMA subband's centre, phy.rf); else None
    center_freq_hz: Annotated[float, Field(gt=0.0)] | None = None
    # downlink over the PHY: the view comes as this many frames on the air (no attachment), and must hash to this
    # (hex SHA-256: the control plane is authenticated, the air may not be); None: the view is the attachment
    view_frames: Annotated[int, Field(ge=1, le=65535)] | None = None
    view_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @field_validator("aggregated_rounds")
    @classmethod
    def _in_window(cls, rounds: list[int] | None, info: ValidationInfo) -> list[int] | None:
        """Only closed rounds inside the window: the BS cannot have aggregated anything of this round or later."""
        current = info.data.get("round")
        if rounds is None or not isinstance(current, int):
            return rounds
        outside = [r for r in rounds if not current - AGGREGATED_WINDOW_ROUNDS <= r < current]
        if outside:
            lo = current - AGGREGATED_WINDOW_ROUNDS
            raise ValueError(
                f"rounds {outside} are not in [round - {AGGREGATED_WINDOW_ROUNDS}, round) = [{lo}, {current})"
            )
        return rounds


class Ack(_Message):
    """ARQ feedback: every frame sequence number of this round the BS holds."""

    type: Literal["ack"] = "ack"
    round: RoundIndex
    attempt: Annotated[int, Field(ge=0, le=65535)]
    received: list[FrameSeq]


class ReportAck(_Message):
    type: Literal["report_ack"] = "report_ack"
    round: RoundIndex


class Reject(_Message):
    """A registration refused (`refused`: a bad device id, a key of another device), or a message from an edge this
    BS run does not know (`register_first`: it registers again; an answer to a message sent before it did, so a
    registering edge waits on for its welcome)."""

    type: Literal["reject"] = "reject"
    reason: LongText
    kind: Literal["refused", "register_first"] = "refused"


class Shutdown(_Message):
    type: Literal["shutdown"] = "shutdown"
    reason: LongText


EdgeMessage = Register | Heartbeat | BurstEnd | ViewStatus | Report | Bye
BsMessage = Welcome | Plan | Ack | ReportAck | Reject | Shutdown
ControlMessage = Annotated[EdgeMessage | BsMessage, Field(discriminator="type")]
MESSAGE_TYPES: Final[tuple[type[_Message], ...]] = (
    Register,
    Heartbeat,
    BurstEnd,
    ViewStatus,
    Report,
    Bye,
    Welcome,
    Plan,
    Ack,
    ReportAck,
    Reject,
    Shutdown,
)


def message_type(model: type[BaseModel]) -> str:
    """The `type` tag of a message model."""
    tag = model.model_fields["type"].default
    assert isinstance(tag, str)
    return tag


_BY_TYPE: Final[dict[str, type[_Message]]] = {message_type(m): m for m in MESSAGE_TYPES}
_ADAPTER: Final = TypeAdapter[EdgeMessage | BsMessage](ControlMessage)


def encode(msg: BaseModel) -> bytes:
    """Serialise a message; refuses what `decode_control` would reject (NaN, oversize), so we never send it."""
    if not isinstance(msg, _Message):
        raise MessageError(f"{type(msg).__name__} is not a control message")
    try:
        data = json.dumps(msg.model_dump(mode="json"), separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise MessageError(f"{message_type(type(msg))}: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"{message_type(type(msg))}: {len(data)} bytes exceed the {MAX_MESSAGE_BYTES}-byte message limit"
        )
    return data


def decode_control(data: bytes) -> ControlMessage:
    """The one way into a process for control bytes: a typed message, or a `MessageError` naming type and field."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        obj = json.loads(
            data.decode("utf-8"), parse_constant=_reject_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise MessageError(f"not a JSON message: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"message must be a JSON object, got {type(obj).__name__}")
    if obj.get("v") != PROTOCOL_VERSION or isinstance(obj.get("v"), bool):
        raise MessageError(f"protocol version {_shown(obj.get('v'))} is not supported (expected {PROTOCOL_VERSION})")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise MessageError(f"unknown message type {_shown(kind)}")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise MessageError(_describe(kind, exc)) from None
    except RecursionError:  # a deeply nested value in a free-form field
        raise MessageError(f"{kind}: nested too deeply") from None


def _reject_constant(name: str) -> NoReturn:
    raise MessageError(f"non-finite number {name} in message")


def _bounded_int(text: str) -> int:
    """Python refuses ints past 4,300 digits with a bare ValueError; no field needs a number this long anyway."""
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise MessageError(f"a number of {len(text)} digits is too long (at most {MAX_JSON_NUMBER_CHARS})")
    return int(text)


def _finite_float(text: str) -> float:
    """1e400 parses as inf: refuse it here, where the text is still in hand."""
    value = float(text) if len(text) <= MAX_JSON_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise MessageError(f"number {text[:MAX_JSON_NUMBER_CHARS]!r} is not a finite float64")
    return value


def _describe(kind: str, exc: ValidationError) -> str:
    """`type.field: what is wrong` for each problem pydantic found (the union's tag is dropped from the path)."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        if loc and loc[0] == kind:
            loc = loc[1:]
        where = ".".join([kind, *loc])
        if err["type"] == "missing":
            problems.append(f"{where}: missing field")
        elif err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown field")
        else:
            problems.append(f"{where}: {err['msg']} (got {_shown(err['input'])})")
    return "; ".join(problems)


def _shown(value: object) -> str:
    """At most 60 characters of a peer's value, its control characters escaped (repr does that)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = f"<{type(value).__name__} too long to show>"
    return text[:60]


class BsEndpoints(_Strict):
    """What the BS bound (``tcp://host:0`` picks free ports), written to ``<run>/endpoints.json`` for its starter."""

    v: Literal[5] = PROTOCOL_VERSION
    control: str  # the control plane's ROUTER
    data: str  # the uplink receiver's address (its meaning depends on the PHY)


def decode_endpoints(data: bytes) -> BsEndpoints:
    """The BS's endpoints file, or a `MessageError` naming the field (a half-written file fails and is read again)."""
    try:
        return BsEndpoints.model_validate_json(data)
    except ValidationError as exc:
        raise MessageError(_describe("endpoints", exc)) from None
