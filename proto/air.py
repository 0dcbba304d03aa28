"""Messages of the PHY's sockets: the air's (gr-zmq-iq) and the sidecar beside each frame on the sim links.

Every header is one zmq frame of JSON with ``v`` (protocol version); a channel that carries several kinds adds
``type``. IQ samples stay binary: one more zmq frame of complex64 beside the header. Channels:

* requests to the air (edge / BS DEALER -> air ROUTER): ``burst`` [header] and ``listen`` [header] from an edge,
  ``plan`` [header] and ``dl_burst`` [header] from the BS; a burst's IQ follows as ``chunk`` [header, IQ] messages
  (phy.air_chunks), the largest parts the air takes (docs/security.md). Decoded by ``decode_request``.
* replies of the air (air ROUTER -> DEALER): ``done`` and ``dl`` [header, IQ] (to the edge), ``burst_done`` and
  ``plan_ok`` (to the BS), ``error`` (to either). Decoded by ``decode_reply``.
* the medium (air PUSH -> BS PULL): [``MediumChunk``, IQ]. Decoded by ``decode_medium``.
* the air's endpoints file (``--endpoints-file``): ``AirEndpoints``. Decoded by ``decode_endpoints``.
* the frame sidecar (sim and gr-loopback edge PUSH -> BS PULL): [``FrameSidecar``, frame]. ``decode_sidecar``.

A decode entry point never trusts its peer: anything malformed raises one ``AirMessageError`` naming the message
type and the field; the receiving process logs it with the peer and carries on. docs/wire-format.md has the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from proto.numerology import ModemModulation, Modulation

# 4: bursts' IQ in chunks after a header naming samples and chunks; 3: the downlink (listen, dl_burst, dl);
# 2: typed headers with `type`, no separate kind frame (1: [kind, JSON, IQ])
AIR_PROTOCOL_VERSION = 4
MAX_HEADER_BYTES = 1 << 16  # a JSON header longer than this is refused before it is parsed
IQ_SAMPLE_BYTES = 8  # complex64: float32 I, float32 Q
CHUNK_SAMPLES = 1 << 17  # IQ samples of one chunk message (1 MiB): the largest part a peer of the air sends
CHUNK_BYTES = CHUNK_SAMPLES * IQ_SAMPLE_BYTES
MAX_BURST_SAMPLES = 64_000_000  # 512 MB of IQ: the air refuses a larger burst from a peer
MAX_BURST_CHUNKS = -(-MAX_BURST_SAMPLES // CHUNK_SAMPLES)  # 489
MAX_DOWNLINK_SAMPLES = 1 << 22  # a BS downlink burst: 4 Mi samples (32 MiB), 4 s at 1 MHz
DOWNLINK_NOISE_SAMPLES = 512 + 4096  # noise the air puts before and after a downlink burst it delivers

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class AirMessageError(ValueError):
    """A PHY socket message that cannot be used; the text names the message type and field."""

    def __init__(self, message_type: str, problem: str) -> None:
        super().__init__(f"{message_type}: {problem}")
        self.message_type = message_type


class _Message(BaseModel):
    """Strict JSON: no coercion (a bool is no number, a float no integer), no NaN/Inf, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)
    KIND: ClassVar[str] = "message"  # how errors name a message of a single-kind channel

    v: int = AIR_PROTOCOL_VERSION  # a default for the sender; a decoded message must carry it

    @model_validator(mode="before")
    @classmethod
    def _version_on_the_wire(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context is _FROM_THE_WIRE and isinstance(data, dict) and "v" not in data:
            raise PydanticCustomError("missing_version", "field 'v' (the protocol version) is missing")
        return data

    @field_validator("v")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != AIR_PROTOCOL_VERSION:
            raise PydanticCustomError(
                "unsupported_version",
                "protocol version {v} is not supported (expected {expected})",
                {"v": v, "expected": AIR_PROTOCOL_VERSION},
            )
        return v

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()  # a None field is its default: left out


# --------------------------------------------------------------------------------------------- to the air
def chunk_count(samples: int) -> int:
    """How many chunk messages carry `samples` IQ samples."""
    return -(-samples // CHUNK_SAMPLES)


def _checked_chunks(chunks: int, info: ValidationInfo) -> int:
    samples = info.data.get("samples")  # absent when samples itself failed: that error is the one reported
    if samples is not None and chunks != chunk_count(samples):
        context = {"samples": samples, "expected": chunk_count(samples), "chunk": CHUNK_SAMPLES}
        raise PydanticCustomError("chunk_count", "{samples} samples travel in {expected} chunk(s) of {chunk}", context)
    return chunks


class BurstHeader(_Message):
    """An edge's burst: who sends, in which round, at which power and width, and how long; its IQ follows in
    `chunks` chunk messages (the air checks all of this against the plan before it stores any of them)."""

    type: Literal["burst"] = "burst"
    device_id: NonNegativeInt
    round: NonNegativeInt
    burst_id: NonNegativeInt  # the edge's counter: the air's `done` names it
    tx_power_dbm: float
    bandwidth_hz: PositiveFloat  # the sample rate of the IQ: the device's subband width
    modulation: ModemModulation  # what the payload was modulated with (16qam too: tests and benchmarks use it)
    samples: Annotated[int, Field(ge=1, le=MAX_BURST_SAMPLES)]  # IQ samples of the burst, at bandwidth_hz
    chunks: Annotated[int, Field(ge=1, le=MAX_BURST_CHUNKS)]  # chunk messages that carry them: chunk_count(samples)

    chunks_match_samples = field_validator("chunks")(_checked_chunks)


class Listen(_Message):
    """An edge's downlink address: the air sends it the downlink bursts meant for `device_id` (sent once when the
    edge connects; again replaces the peer, as an edge restarted under the same id)."""

    type: Literal["listen"] = "listen"
    device_id: NonNegativeInt


class DownlinkHeader(_Message):
    """A BS burst over the whole band (its IQ, at total_bandwidth_hz of the round's plan, follows in `chunks` chunk
    messages) for the listed devices: the air gives each its own channel at the BS's power and forwards it once the
    burst's airtime has passed."""

    type: Literal["dl_burst"] = "dl_burst"
    round: NonNegativeInt
    burst_id: NonNegativeInt  # the BS's counter
    devices: Annotated[list[NonNegativeInt], Field(min_length=1, max_length=4096)]
    tx_power_dbm: float
    modulation: Modulation
    kind: Literal["view", "ack"]  # the adapter view's frames, or an uplink ARQ ack for one device
    packets: Annotated[int, Field(ge=1, le=65535)]  # OFDM packets in the burst (a receiver knows when it has all)
    final: bool  # the last burst of this attempt: the edges answer with a view_status after it
    samples: Annotated[int, Field(ge=1, le=MAX_DOWNLINK_SAMPLES)]  # IQ samples, at the plan's total_bandwidth_hz
    chunks: Annotated[int, Field(ge=1, le=chunk_count(MAX_DOWNLINK_SAMPLES))]  # chunk_count(samples)

    chunks_match_samples = field_validator("chunks")(_checked_chunks)


class IqChunk(_Message):
    """A piece of the IQ of the burst (or dl_burst) this peer announced last; the IQ is the next zmq frame: chunk
    `index` holds samples [index x CHUNK_SAMPLES, ...), CHUNK_SAMPLES of them but in the last chunk."""

    type: Literal["chunk"] = "chunk"
    burst_id: NonNegativeInt  # the announced burst's
    index: Annotated[int, Field(ge=0, lt=MAX_BURST_CHUNKS)]


class SubbandSpec(BaseModel):
    """One device's subband in the BS's plan (phy.fdma.Subband)."""

    model_config = _Message.model_config

    device_id: NonNegativeInt
    center_hz: float
    bandwidth_hz: PositiveFloat


class RoundPlan(_Message):
    """The BS's plan for a round: the subbands, and the physics the air applies (from the BS's bench/experiment)."""

    type: Literal["plan"] = "plan"
    round: NonNegativeInt
    total_bandwidth_hz: PositiveFloat
    seed: NonNegativeInt  # the experiment's seed: fading draws and carrier offsets
    channel: dict[str, float | str]  # phy.channel.ChannelConfig fields (the air checks them)
    distances_m: Annotated[list[PositiveFloat], Field(min_length=1)]  # device k -> entry k (cyclic)
    max_cfo_hz: Annotated[float, Field(ge=0)]
    clock_speed: PositiveFloat
    hangover_s: Annotated[float, Field(ge=0, le=10)]
    attenuation_db: Annotated[float, Field(ge=20, le=150)]
    subbands: list[SubbandSpec]


@dataclass(frozen=True)
class ChunkFrames:
    """A decoded chunk: its header and its IQ (complex64 bytes, at most CHUNK_SAMPLES)."""

    header: IqChunk
    iq: bytes


@dataclass(frozen=True)
class DownlinkFrames:
    """A downlink burst as the air reassembled it (BS -> air) or delivers it (air -> edge): header and IQ."""

    header: DownlinkHeader | DownlinkIq
    iq: bytes | memoryview


AirRequest = BurstHeader | DownlinkHeader | ChunkFrames | RoundPlan | Listen
_RequestHeader = BurstHeader | DownlinkHeader | IqChunk | RoundPlan | Listen
_REQUEST_HEADER: TypeAdapter[_RequestHeader] = TypeAdapter(Annotated[_RequestHeader, Field(discriminator="type")])
_WITH_IQ = {"chunk", "dl"}  # message types whose IQ is the second frame
MAX_REQUEST_FRAMES = 2  # [header, IQ]: a request with more is refused before any of it is read


def decode_request(frames: Sequence[bytes]) -> AirRequest:
    """[header] or [header, IQ] from a peer of the air (the ROUTER's identity frame already removed)."""
    if not frames:
        raise AirMessageError("request", "no frames")
    if len(frames) > MAX_REQUEST_FRAMES:
        raise AirMessageError("request", f"{len(frames)} frames, at most {MAX_REQUEST_FRAMES} [header, IQ]")
    header = _decode(_REQUEST_HEADER, frames[0], "request")
    _check_frame_count(header.type, frames)
    if isinstance(header, IqChunk):
        return ChunkFrames(header, _checked_iq(header.type, frames[1], CHUNK_SAMPLES))
    return header


def _check_frame_count(message_type: str, frames: Sequence[bytes]) -> None:
    expected = 2 if message_type in _WITH_IQ else 1
    if len(frames) != expected:
        layout = "[header, IQ]" if expected == 2 else "[header]"
        raise AirMessageError(message_type, f"{len(frames)} frame(s), expected {expected} {layout}")


# --------------------------------------------------------------------------------------------- from the air
class _BurstEndFields(_Message):
    device_id: NonNegativeInt
    round: NonNegativeInt
    burst_id: NonNegativeInt
    medium_end: NonNegativeInt  # medium index just after the burst's last sample
    snr_db: float  # the channel's SNR for this burst (what the air applied)


class BurstDone(_BurstEndFields):
    """To the edge: the burst's last sample is on the medium (its send() returns)."""

    type: Literal["done"] = "done"


class BurstOnMedium(_BurstEndFields):
    """To the BS, before the edge's `done`: it decodes up to medium_end before it acknowledges the burst."""

    type: Literal["burst_done"] = "burst_done"


class PlanAccepted(_Message):
    """To the BS: the round's plan is in force from medium index `index` on."""

    type: Literal["plan_ok"] = "plan_ok"
    round: NonNegativeInt
    index: NonNegativeInt


class AirRefusal(_Message):
    """To the peer whose message the air could not use (it carries on)."""

    type: Literal["error"] = "error"
    error: str
    kind: str  # the refused message's type ("" when it had none)


class DownlinkIq(_Message):
    """To an edge: a downlink burst as its receiver hears it (the BS's burst through this device's channel, with
    noise before and after it); the IQ, at the burst's rate, is the next zmq frame."""

    type: Literal["dl"] = "dl"
    device_id: NonNegativeInt
    round: NonNegativeInt
    burst_id: NonNegativeInt
    snr_db: float  # the channel's SNR the air applied (ground truth, for the records)
    kind: Literal["view", "ack"]
    packets: Annotated[int, Field(ge=1, le=65535)]
    final: bool


_ReplyHeader = BurstDone | BurstOnMedium | PlanAccepted | AirRefusal | DownlinkIq
AirReply = BurstDone | BurstOnMedium | PlanAccepted | AirRefusal | DownlinkFrames
_REPLY: TypeAdapter[_ReplyHeader] = TypeAdapter(Annotated[_ReplyHeader, Field(discriminator="type")])


def decode_reply(frames: Sequence[bytes]) -> AirReply:
    """One reply of the air, as its DEALER peers receive it (a downlink delivery with its IQ)."""
    if not frames:
        raise AirMessageError("reply", "no frames")
    header = _decode(_REPLY, frames[0], "reply")
    _check_frame_count(header.type, frames)
    if isinstance(header, DownlinkIq):
        return DownlinkFrames(
            header, _checked_iq(header.type, frames[1], MAX_DOWNLINK_SAMPLES + DOWNLINK_NOISE_SAMPLES)
        )
    return header


# --------------------------------------------------------------------------------------------- medium, files
class MediumChunk(_Message):
    """Header of one chunk of the medium; the IQ (complex64 at total_bandwidth_hz) is the next zmq frame."""

    KIND: ClassVar[str] = "medium"
    index: NonNegativeInt  # medium index of the chunk's first sample (idle time is skipped: gaps are normal)


_MEDIUM: TypeAdapter[MediumChunk] = TypeAdapter(MediumChunk)
MAX_MEDIUM_SAMPLES = 8_000_000  # 64 MB of complex64: the BS's socket refuses larger messages anyway
MEDIUM_QUEUE_CHUNKS = 64  # medium chunks queued between the air and the BS (~0.6 s), then the air's clock waits


def decode_medium(frames: Sequence[bytes]) -> tuple[MediumChunk, bytes]:
    """[header, IQ] from the air's medium socket."""
    if len(frames) != 2:
        raise AirMessageError(MediumChunk.KIND, f"{len(frames)} frame(s), expected 2 [header, IQ]")
    return _decode(_MEDIUM, frames[0], MediumChunk.KIND), _checked_iq(MediumChunk.KIND, frames[1], MAX_MEDIUM_SAMPLES)


class AirEndpoints(_Message):
    """What the air bound (``tcp://host:0`` picks a free port): written to --endpoints-file for its starter."""

    KIND: ClassVar[str] = "endpoints"
    address: str  # ROUTER: edges and the BS
    medium: str  # PUSH: the medium to the BS


_ENDPOINTS: TypeAdapter[AirEndpoints] = TypeAdapter(AirEndpoints)


def decode_endpoints(raw: bytes | str) -> AirEndpoints:
    return _decode(_ENDPOINTS, raw.encode() if isinstance(raw, str) else raw, AirEndpoints.KIND)


class FrameSidecar(_Message):
    """Beside each frame on the sim and gr-loopback links (the PHY those links stand in for would measure it).

    sim: ``snr_db`` is the receiver's SNR estimate of the frame (None: no estimate), no modulation.
    gr-loopback: ``snr_db`` is the channel's SNR that the BS's modem applies, with the payload's modulation.
    replay: no SNR (the BS's trace has it); the modulation, power and bandwidth the frame was sent at.
    """

    KIND: ClassVar[str] = "sidecar"
    snr_db: Annotated[float, Field(ge=-100.0, le=200.0)] | None = None  # dB: anything outside is not a channel
    modulation: Modulation | None = None
    # replay: the setting the frame went out at, which the trace's channel is moved by (phy.replay)
    tx_power_dbm: Annotated[float, Field(ge=-100.0, le=100.0)] | None = None
    bandwidth_hz: Annotated[float, Field(gt=0.0, le=1e10)] | None = None


_SIDECAR: TypeAdapter[FrameSidecar] = TypeAdapter(FrameSidecar)


def decode_sidecar(raw: bytes) -> FrameSidecar:
    return _decode(_SIDECAR, raw, FrameSidecar.KIND)


# --------------------------------------------------------------------------------------------- helpers
_M = TypeVar("_M")
_FROM_THE_WIRE: dict[str, bool] = {"from_the_wire": True}  # validation context of every decode entry point
_UNION_CHANNELS = ("request", "reply")  # their errors' locations start with the message's type tag


def _decode(adapter: TypeAdapter[_M], raw: bytes, what: str) -> _M:
    if len(raw) > MAX_HEADER_BYTES:
        raise AirMessageError(what, f"header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        return adapter.validate_json(raw, context=_FROM_THE_WIRE)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        message_type, problem = _describe(errors[0], what)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise AirMessageError(message_type, problem + more) from None


def _describe(error: ErrorDetails, what: str) -> tuple[str, str]:
    """(message type, "field: problem, got value") of a pydantic error; a union's tag leads its location."""
    loc = [str(part) for part in error["loc"]]
    message_type = loc.pop(0) if loc and what in _UNION_CHANNELS else what
    field = ".".join(loc)
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if not field:
        plain = error["type"] in ("json_invalid", "missing_version")
        return message_type, f"{error['msg']}" + ("" if plain else f", got {got}")
    if error["type"] == "missing":
        return message_type, f"field {field!r} is missing"
    return message_type, f"field {field!r}: {error['msg']}, got {got}"


def _checked_iq(message_type: str, iq: bytes, max_samples: int) -> bytes:
    """The IQ frame's length: whole complex64 samples, at least one, at most max_samples (the values are the
    receiver's to check: it turns them into numbers anyway)."""
    n = len(iq)
    if n == 0 or n % IQ_SAMPLE_BYTES:
        raise AirMessageError(message_type, f"IQ of {n} bytes is not a whole number of complex64 samples")
    if n // IQ_SAMPLE_BYTES > max_samples:
        raise AirMessageError(message_type, f"{n // IQ_SAMPLE_BYTES} samples is above the limit {max_samples}")
    return iq
