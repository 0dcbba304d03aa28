"""An in-memory `RoundTransport` on a fake clock, and scripted edges, to drive the BS's round logic in tests."""

from __future__ import annotations

import hashlib
import heapq
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bs_node.controllers import Controller, make_controller
from bs_node.global_model import GlobalModel
from bs_node.live_view import LiveView
from bs_node.records import RunRecorder
from bs_node.rounds import EdgeInfo, Event, FrameReceived, FromEdge, Registered, RoundRunner
from config import BenchConfig, ExperimentConfig, load_bench, load_experiment
from proto.codec import decode_update, encode_update
from proto.control import BsMessage, BurstEnd, Bye, Heartbeat, Measurements, Plan, Report, ReportStatus
from proto.framing import fragment
from trust.sealing import FrameSealer


class FakeClock:
    """Time moves only when the transport is polled and nothing is due sooner."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeEdge:
    device_id: int
    host: str
    state: str = "registered"
    silent_from: float | None = None  # the edge is heard continuously until then
    connected: bool = True


PlanHandler = Callable[[Plan, bytes | None], None]


@dataclass
class MemoryTransport:
    """Events are scheduled at fake times and delivered by `poll`; sends are recorded; a plan is handed to the
    device's scripted behaviour. The registry follows the delivered events as the zmq transport's does."""

    clock: FakeClock
    silence_timeout_s: float = 30.0
    edges: dict[int, FakeEdge] = field(default_factory=dict)
    sent: list[tuple[int, BsMessage, bytes | None]] = field(default_factory=list)
    broadcasts: list[BsMessage] = field(default_factory=list)
    round_starts: list[tuple[int, dict[int, float]]] = field(default_factory=list)
    carriers_hz: dict[int, float] = field(default_factory=dict)  # what start_round returns (a radio PHY's)
    overruns: int | None = None  # what take_radio_counts says of the BS radio
    behaviours: dict[int, PlanHandler] = field(default_factory=dict)
    _queue: list[tuple[float, int, Event]] = field(default_factory=list)
    _count: int = 0

    # ------------------------------------------------------------------------------------------ scripting
    def deliver(self, event: Event, after_s: float = 0.0) -> None:
        self._count += 1
        heapq.heappush(self._queue, (self.clock() + after_s, self._count, event))

    def join(self, device_id: int, behaviour: PlanHandler | None = None, *, after_s: float = 0.0) -> None:
        """A device registers and says it is ready; `behaviour` is what it does with each plan."""
        self.deliver(Registered(device_id, replaced=False, frame_key=frame_key_of(device_id)), after_s)
        self.deliver(FromEdge(device_id, Heartbeat(device_id=device_id, state="ready")), after_s)
        if behaviour is not None:
            self.behaviours[device_id] = behaviour

    def sent_to(self, device_id: int, kind: type[BsMessage]) -> list[BsMessage]:
        return [m for d, m, _ in self.sent if d == device_id and isinstance(m, kind)]

    # ------------------------------------------------------------------------------------------ RoundTransport
    def poll(self, timeout_s: float) -> list[Event]:
        end = self.clock() + timeout_s
        if not self._queue or self._queue[0][0] > end:
            self.clock.t = end
            return []
        self.clock.t = max(self.clock.t, self._queue[0][0])
        events = []
        while self._queue and self._queue[0][0] <= self.clock.t:
            events.append(heapq.heappop(self._queue)[2])
        for event in events:
            self._track(event)
        return events

    def _track(self, event: Event) -> None:
        if isinstance(event, Registered):
            self.edges[event.device_id] = FakeEdge(event.device_id, "host")
        elif isinstance(event, FromEdge):
            edge = self.edges[event.device_id]
            if isinstance(event.message, Heartbeat):
                edge.state = event.message.state
            elif isinstance(event.message, Bye):
                edge.state = "offline"

    def drain_frames(self, quiet_s: float, max_wait_s: float) -> Iterator[FrameReceived]:
        return iter(())

    def ready_devices(self) -> list[EdgeInfo]:
        return [
            EdgeInfo(e.device_id, e.host)
            for e in sorted(self.edges.values(), key=lambda e: e.device_id)
            if e.state not in ("registered", "offline")
            and (e.silent_from is None or self.clock() - e.silent_from < self.silence_timeout_s)
        ]

    def silent_for_s(self, device_id: int) -> float | None:
        edge = self.edges.get(device_id)
        if edge is None or edge.silent_from is None:
            return None
        silent_s = self.clock() - edge.silent_from
        return silent_s if silent_s > self.silence_timeout_s else None

    def start_round(self, round_idx: int, bandwidth_hz: Mapping[int, float]) -> dict[int, float]:
        self.round_starts.append((round_idx, dict(bandwidth_hz)))
        return dict(self.carriers_hz)

    def rejected_messages(self) -> dict[str, int]:
        return {}

    def take_radio_counts(self) -> dict[str, int | None]:
        return {"underruns": None, "overruns": self.overruns}

    def is_registered(self, device_id: int) -> bool:
        return device_id in self.edges

    def send(self, device_id: int, message: BsMessage, attachment: bytes | None = None) -> bool:
        edge = self.edges[device_id]
        if not edge.connected:
            edge.state = "offline"
            return False
        self.sent.append((device_id, message, attachment))
        if isinstance(message, Plan) and device_id in self.behaviours:
            self.behaviours[device_id](message, attachment)
        return True

    def broadcast(self, message: BsMessage) -> None:
        self.broadcasts.append(message)


# ---------------------------------------------------------------------------------------------- scripted edges
def frame_key_of(device_id: int) -> bytes:
    """The frame key a scripted device registers with (the real ones come from trust.sealing.FrameKeyring)."""
    return hashlib.sha256(b"test frame key %d" % device_id).digest()


def update_frames(
    plan: Plan, attachment: bytes | None, device_id: int, value: float, *, wrong_shape: bool = False
) -> list[bytes]:
    """The frames of an update that adds `value` to every entry of the planned view; `wrong_shape`: every B is
    cut to one column, so it decodes but is not the module the plan named."""
    assert attachment is not None
    view = decode_update(attachment)
    delta = {k: torch.full_like(v, value) for k, v in view.state.items()}
    if wrong_shape:
        delta = {k: v[..., :1] if k.endswith("lora_B") else v for k, v in delta.items()}
    payload = encode_update(delta, spec=view.spec, round_idx=plan.round, device_id=device_id)
    sealer = FrameSealer(frame_key_of(device_id), device_id)
    return [sealer.seal(f, 1) for f in fragment(payload, device_id, plan.round, 500)]


def sends_update(
    transport: MemoryTransport,
    device_id: int,
    value: float | Mapping[int, float],
    *,
    report: ReportStatus | None = "ok",
    measurements: Measurements | None = None,
    snr_db: float = 20.0,
    drop_last: bool = False,
    wrong_shape: bool = False,
    after_s: float = 1.0,
) -> PlanHandler:
    """An edge that trains for after_s, sends its frames and a burst_end, and reports a second later (or never);
    `value`: what its update adds to every entry (per round, if a mapping)."""

    def on_plan(plan: Plan, attachment: bytes | None) -> None:
        if not plan.participate:
            return
        round_value = value if isinstance(value, float) else value[plan.round]
        frames = update_frames(plan, attachment, device_id, round_value, wrong_shape=wrong_shape)
        sent = frames[:-1] if drop_last else frames
        for data in sent:
            transport.deliver(FrameReceived(data, snr_db), after_s)
        burst = BurstEnd(
            device_id=device_id, round=plan.round, attempt=1, seqs=list(range(len(sent))), total=len(frames)
        )
        transport.deliver(FromEdge(device_id, burst), after_s)
        if report is not None:
            measured = measurements or Measurements(energy_j=1.0, frames_sent=len(frames))
            msg = Report(device_id=device_id, round=plan.round, status=report, measurements=measured)
            transport.deliver(FromEdge(device_id, msg), after_s + 1.0)

    return on_plan


# ---------------------------------------------------------------------------------------------- a BS in memory
TINY = ("model.name_or_path=tiny", "task.test_size=50", "task.max_train=400", "devices.count=4")


@dataclass
class Station:
    """The round logic wired to the in-memory transport, the tiny model and a run folder."""

    runner: RoundRunner
    transport: MemoryTransport
    clock: FakeClock
    model: GlobalModel
    run_dir: Path
    out: io.StringIO

    @property
    def view_text(self) -> str:
        return self.out.getvalue()


def make_station(
    run_dir: Path,
    overrides: Sequence[str] = (),
    *,
    controller: Callable[[ExperimentConfig, BenchConfig], Controller] = make_controller,
    silence_timeout_s: float = 30.0,
) -> Station:
    exp = load_experiment(None, [*TINY, *overrides])
    bench = load_bench()
    clock = FakeClock()
    transport = MemoryTransport(clock, silence_timeout_s=silence_timeout_s)
    model = GlobalModel(exp)
    out = io.StringIO()
    runner = RoundRunner(
        exp,
        bench,
        transport=transport,
        model=model,
        controller=controller(exp, bench),
        recorder=RunRecorder(run_dir),
        view=LiveView(out),
        clock=clock,
        run_id="test",
    )
    return Station(runner, transport, clock, model, run_dir, out)
