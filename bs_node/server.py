"""The base station: registers edges, runs rounds against a wall-clock deadline, receives update frames
from the PHY, acknowledges them (ARQ feedback), aggregates, evaluates and records.

One thread, one zmq.Poller over the control socket (ROUTER) and the uplink receiver; timers for the ARQ
guard interval. A device that crashes, hangs or disconnects is dropped from the round when its deadline
passes (or sooner, once it has been silent for `silence_timeout_s`); the BS never waits on one device.
Bad messages and frames are logged with their peer and ignored; nothing already received is dropped.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from bs_node.controllers import DevicePlan, DeviceState, RoundState, make_controller
from bs_node.controllers.costs import ModelShape
from bs_node.live_view import LiveView
from bs_node.measurements import DeviceRound, RoundRecord, apply_report
from bs_node.records import RunRecorder
from config import BenchConfig, ExperimentConfig, to_mapping
from fedlora.aggregation import ClientUpdate, aggregate
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec, layer_index
from fedlora.models import build_backbone, load_tokenizer, num_layers
from fedlora.partition import dirichlet_split
from fedlora.tasks import load_task
from fedlora.training import evaluate
from link.factory import open_uplink_receiver
from proto import control as messages
from proto.codec import CodecError, decode_update, encode_update, expected_shapes
from proto.framing import Frame, FrameError, Reassembler

log = logging.getLogger("bs")
BS_DEVICE_ID = 0xFFFF  # sender id written into the downlink adapter view


def _model_shape(adapter: GlobalAdapter, num_layers: int) -> ModelShape:
    """Per-layer LoRA widths Σ(in + out) and head size: what the controllers need to predict update bytes."""
    widths = [0] * num_layers
    per_layer = [0] * num_layers
    for key, tensor in adapter.state.items():
        layer = layer_index(key)
        if layer is not None and key.endswith(".lora_A"):
            b = adapter.state[key[: -len("lora_A")] + "lora_B"]
            widths[layer] += tensor.shape[1] + b.shape[0]
            per_layer[layer] += 2
    head = sum(t.numel() for k, t in adapter.state.items() if layer_index(k) is None)
    return ModelShape(tuple(widths), head, max(per_layer))


class StartupError(RuntimeError):
    """Too few edges became ready before the start-up timeout."""


@dataclass
class Edge:
    """What the BS knows of one registered edge."""

    device_id: int
    identity: bytes
    host: str
    pid: int
    state: str = "registered"  # registered -> ready/idle/training/sending; offline after bye or silence
    last_seen: float = field(default_factory=time.monotonic)
    rounds_participated: int = 0
    progress: str = ""


@dataclass
class Pending:
    """A device taking part in the current round."""

    plan: DevicePlan
    report: dict | None = None
    snr_db: list[float] = field(default_factory=list)
    dropped: str | None = None  # why the BS gave up on it before a report


@dataclass
class AckTimer:
    device_id: int
    round_idx: int
    attempt: int
    seqs: set[int]
    due: float


class BaseStation:
    def __init__(
        self,
        experiment: ExperimentConfig,
        bench: BenchConfig,
        run_dir: Path,
        *,
        control_address: str | None = None,
        data_address: str | None = None,
        view: LiveView | None = None,
        silence_timeout_s: float = 30.0,
        threads: int = 2,
    ):
        self.exp, self.bench = experiment, bench
        self.view = view or LiveView()
        self.recorder = RunRecorder(run_dir)
        self.silence_timeout_s = silence_timeout_s
        self.run_id = uuid.uuid4().hex[:12]
        self.stopping = False
        torch.set_num_threads(threads)

        self.ctx = zmq.Context.instance()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 500)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished edge raises instead of vanishing
        self.control.bind(control_address or bench.addresses.control)
        self.control_endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        self.uplink = open_uplink_receiver(
            bench,
            bind_address=data_address or bench.addresses.data,
            context=self.ctx,
            device_count=experiment.devices.count,
            seed=experiment.seed,
        )
        self.data_endpoint = self.uplink.address
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        if self.uplink.poll_socket is not None:
            self.poller.register(self.uplink.poll_socket, zmq.POLLIN)

        self.edges: dict[int, Edge] = {}
        self.reassembler = Reassembler()
        self.pending: dict[int, Pending] = {}
        self.acks: list[AckTimer] = []
        self.round_idx = 0
        self.bad_frames = 0

    # ------------------------------------------------------------------------------------------ set-up
    def _prepare_model(self) -> None:
        exp = self.exp
        t0 = time.perf_counter()
        self.task = load_task(
            exp.task.name, exp.task.path, test_size=exp.task.test_size, seed=exp.seed, max_train=exp.task.max_train
        )
        self.tokenizer = load_tokenizer(exp.model)
        backbone = build_backbone(exp.model, self.task.num_labels, exp.seed)
        self.num_layers = num_layers(backbone)
        self.global_adapter = GlobalAdapter(backbone, exp.model, exp.seed)
        self.full_spec = ModuleSpec(self.global_adapter.max_rank, self.num_layers)
        self.evaluator = LocalModel(backbone, exp.model)
        self.controller = make_controller(exp, self.bench)
        # The same deterministic split the edges make: the BS weights updates by it, so a complete update
        # whose report never came is still aggregated correctly.
        shares = dirichlet_split(
            [ex.label for ex in self.task.train],
            exp.devices.count,
            exp.devices.dirichlet_alpha,
            seed=exp.seed,
            min_per_device=exp.devices.min_examples,
        )
        self.device_examples = [len(share) for share in shares]
        self.latest_updates: dict[int, tuple[int, ClientUpdate]] = {}  # device -> (round, update), for reuse
        self.model_shape = _model_shape(self.global_adapter, self.num_layers)
        log.info(
            "model and task ready in %.1f s: %s, %d train / %d test examples, %d layers, rank %d",
            time.perf_counter() - t0,
            exp.task.name,
            len(self.task.train),
            len(self.task.test),
            self.num_layers,
            self.global_adapter.max_rank,
        )

    def _evaluate(self) -> dict[str, float]:
        self.evaluator.load(self.full_spec, self.global_adapter.state)
        return evaluate(self.evaluator.model, self.tokenizer, self.task.test, max_length=self.exp.model.max_length)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        exp = self.exp
        self.recorder.snapshot_config(to_mapping(exp), to_mapping(self.bench))
        self.view.line(
            f"BS {self.run_id}: control {self.control_endpoint}, data {self.data_endpoint}, "
            f"PHY {self.bench.phy}, policy {exp.controller.policy}, run folder {self.recorder.run_dir}"
        )
        self._prepare_model()
        initial = self._evaluate()
        self.recorder.initial_accuracy = initial["accuracy"]
        self.view.line(f"round   0 | accuracy {initial['accuracy'] * 100:.1f} % before fine-tuning")
        summary: dict[str, Any] = {"run_id": self.run_id, "initial_accuracy": initial["accuracy"], "rounds": 0}
        t_start = time.monotonic()
        try:
            self._wait_for_devices()
            for r in range(1, exp.round.rounds + 1):
                if self.stopping:
                    break
                record = self._run_round(r)
                summary.update(rounds=r, final_accuracy=record.accuracy)
        finally:
            summary.update(
                wall_s=time.monotonic() - t_start,
                stopped_early=self.stopping,
                total_uplink_bytes=sum(r.uplink_bytes for r in self.recorder.records),
                total_energy_j=sum(r.energy_j for r in self.recorder.records),
                bad_frames=self.bad_frames,
            )
            self.recorder.write_summary(summary)
            self._broadcast("shutdown", reason="stopped" if self.stopping else "run complete")
            self.uplink.close()
            self.control.close()
        acc = summary.get("final_accuracy")
        self.view.line(
            f"run {'stopped' if self.stopping else 'complete'}: {summary['rounds']} rounds in "
            f"{summary['wall_s']:.0f} s, final accuracy "
            f"{'n/a' if acc is None else f'{acc * 100:.1f} %'}; records in {self.recorder.run_dir}"
        )
        return summary

    def _ready_edges(self) -> list[Edge]:
        now = time.monotonic()
        return sorted(
            (
                e
                for e in self.edges.values()
                if e.state not in ("registered", "offline") and now - e.last_seen < self.silence_timeout_s
            ),
            key=lambda e: e.device_id,
        )

    def _wait_for_devices(self) -> None:
        want = self.exp.devices.count
        deadline = time.monotonic() + self.exp.round.startup_timeout_s
        self.view.line(f"waiting for {want} edge(s) to register (up to {self.exp.round.startup_timeout_s:.0f} s)")
        while not self.stopping:
            ready = self._ready_edges()
            if len(ready) >= want:
                break
            if time.monotonic() > deadline:
                if len(ready) >= self.exp.round.min_devices:
                    self.view.line(f"startup timeout: starting with {len(ready)} of {want} edges")
                    break
                raise StartupError(
                    f"only {len(ready)} of {want} edges ready after "
                    f"{self.exp.round.startup_timeout_s:.0f} s (need round.min_devices="
                    f"{self.exp.round.min_devices})"
                )
            self._poll(0.5)
        self.view.line(
            f"{len(self._ready_edges())} edge(s) ready: "
            + ", ".join(f"{e.device_id}@{e.host}" for e in self._ready_edges())
        )

    def _run_round(self, r: int) -> RoundRecord:
        exp = self.exp
        self.round_idx = r
        t0 = time.monotonic()
        self._poll(0.0)  # registrations and heartbeats that came in while the last round was evaluated
        if not self._ready_edges():
            self.view.line(f"round {r}: no edge is ready; waiting up to {exp.round.deadline_s:.0f} s")
        while not self.stopping and not self._ready_edges() and time.monotonic() < t0 + exp.round.deadline_s:
            self._poll(0.5)
        ready = self._ready_edges()
        state = RoundState(
            round_idx=r,
            devices=tuple(
                DeviceState(e.device_id, self.bench.device(e.device_id), e.rounds_participated) for e in ready
            ),
            total_bandwidth_hz=self.bench.radio.total_bandwidth_hz,
            max_tx_power_dbm=self.bench.radio.max_tx_power_dbm,
            min_tx_power_dbm=self.bench.radio.min_tx_power_dbm,
            max_rank=self.global_adapter.max_rank,
            num_layers=self.num_layers,
            local_steps=exp.training.local_steps,
            model_shape=self.model_shape,
            device_weights={e.device_id: float(self.device_examples[e.device_id]) for e in ready},
        )
        plans = self.controller.decide(state)
        start_round = getattr(self.uplink, "start_round", None)  # PHYs with a subband schedule (gr-zmq-iq)
        if start_round is not None:
            start_round(r, {d: p.bandwidth_hz for d, p in plans.items() if p.participate})
        views: dict[ModuleSpec, bytes] = {}
        downlink_bytes = 0
        self.pending = {}
        for device_id, plan in sorted(plans.items()):
            edge = self.edges.get(device_id)
            if edge is None:
                continue
            spec = ModuleSpec(plan.rank, plan.depth)
            if plan.participate and spec not in views:
                self.global_adapter.validate_spec(spec)
                views[spec] = encode_update(
                    self.global_adapter.view(spec),
                    spec=spec,
                    round_idx=r,
                    device_id=BS_DEVICE_ID,
                    dtype=exp.codec.downlink_dtype,
                )
            attachment = views.get(spec) if plan.participate else None
            delivered = self._send(
                edge,
                "plan",
                attachment,
                round=r,
                deadline_s=exp.round.deadline_s,
                participate=plan.participate,
                rank=plan.rank,
                depth=plan.depth,
                tx_power_dbm=plan.tx_power_dbm,
                bandwidth_hz=plan.bandwidth_hz,
                modulation=plan.modulation,
                keep_fraction=plan.keep_fraction,
                local_steps=plan.local_steps,
            )
            if plan.participate:
                self.pending[device_id] = Pending(plan, dropped=None if delivered else "disconnected")
                downlink_bytes += len(attachment) if delivered else 0
        deadline = t0 + exp.round.deadline_s
        while not self.stopping and time.monotonic() < deadline and not self._round_settled():
            self._poll(min(1.0, max(0.0, deadline - time.monotonic())))
            self._drop_silent()
            self.view.status(
                r, time.monotonic() - t0, {d: self.edges[d].progress for d in self.pending if d in self.edges}
            )
        return self._close_round(r, plans, downlink_bytes, t0)

    def _round_settled(self) -> bool:
        return all(p.report is not None or p.dropped for p in self.pending.values())

    def _drop_silent(self) -> None:
        now = time.monotonic()
        for device_id, p in self.pending.items():
            edge = self.edges.get(device_id)
            if (
                p.report is None
                and not p.dropped
                and edge is not None
                and now - edge.last_seen > self.silence_timeout_s
            ):
                p.dropped = f"silent for {now - edge.last_seen:.0f} s"
                self.view.line(f"round {self.round_idx}: edge {device_id} dropped ({p.dropped})")

    # ------------------------------------------------------------------------------------------ close
    def _close_round(self, r: int, plans: dict[int, DevicePlan], downlink_bytes: int, t0: float) -> RoundRecord:
        fresh: dict[int, ClientUpdate] = {}  # device -> its update of this round
        devices: list[DeviceRound] = []
        for device_id, plan in sorted(plans.items()):
            p = self.pending.get(device_id)
            row = DeviceRound(
                device_id=device_id,
                participated=p is not None,
                status="not_selected",
                rank=plan.rank,
                depth=plan.depth,
                tx_power_dbm=plan.tx_power_dbm,
                bandwidth_hz=plan.bandwidth_hz,
                modulation=plan.modulation,
                keep_fraction=plan.keep_fraction,
            )
            if p is not None:
                self._fill_row(row, r, p)
                update = self._take_update(row, r, p)
                if update is not None:
                    fresh[device_id] = update
                    self.edges[device_id].rounds_participated += 1
            devices.append(row)
        self.reassembler.discard_round(r)
        self.acks = [a for a in self.acks if a.round_idx != r]
        stale = self._stale_updates(r, plans, fresh)
        self.latest_updates.update({d: (r, update) for d, update in fresh.items()})
        updates = list(fresh.values()) + [update for _, update in stale.values()]
        if updates:
            absent = [d for d in plans if d not in fresh and d not in stale]
            absent_weight = (
                sum(float(self.device_examples[d]) for d in absent) if self.exp.round.absent_as_zero else 0.0
            )
            self.global_adapter.apply(aggregate(self.global_adapter, updates, absent_weight))
        result = self._evaluate()
        record = RoundRecord(
            round=r,
            accuracy=result["accuracy"],
            eval_loss=result["loss"],
            wall_s=time.monotonic() - t0,
            policy=self.controller.name,
            downlink_bytes=downlink_bytes,
            devices=devices,
            controller=self.controller.explain(),
            stale_updates={d: made for d, (made, _) in stale.items()},
        )
        self.controller.observe(record)
        self.recorder.write_round(record)
        self.recorder.save_adapter(self.global_adapter.state)
        self.view.round_table(record)
        return record

    def _fill_row(self, row: DeviceRound, r: int, p: Pending) -> None:
        if p.snr_db:
            row.snr_db = sum(p.snr_db) / len(p.snr_db)
            row.snr_db_min, row.snr_db_max = min(p.snr_db), max(p.snr_db)
        row.frames_received = len(self.reassembler.received_seqs(row.device_id, r))
        if p.report is None:
            row.status = "timeout" if not p.dropped else ("offline" if p.dropped == "disconnected" else "dropped")
            row.error = p.dropped or f"no report before the {self.exp.round.deadline_s:.0f} s deadline"
            self.view.line(f"round {r}: edge {row.device_id} {row.status}: {row.error}")
            return
        row.status = p.report["status"]
        row.error = p.report.get("error")
        problems = apply_report(row, p.report["measurements"])
        if problems:
            log.warning("edge %d report for round %d: bad measurements ignored: %s", row.device_id, r, problems)

    def _stale_updates(
        self, r: int, plans: dict[int, DevicePlan], arrived: dict[int, ClientUpdate]
    ) -> dict[int, tuple[int, ClientUpdate]]:
        """The latest update of each device present but absent from round r, if at most `round.stale_rounds`
        old: reused as it is (MIFA, Gu et al., NeurIPS 2021), so a device that takes turns to keep its energy
        budget still pulls the model towards its data in the rounds it sits out."""
        limit = self.exp.round.stale_rounds
        return {
            d: self.latest_updates[d]
            for d in sorted(plans)
            if d not in arrived and d in self.latest_updates and r - self.latest_updates[d][0] <= limit
        }

    def _take_update(self, row: DeviceRound, r: int, p: Pending) -> ClientUpdate | None:
        """Decode and check a device's update if every frame arrived, whatever became of its report."""
        if not self.reassembler.is_complete(row.device_id, r):
            if row.status == "ok":
                row.status = "undelivered"
            return None
        spec = ModuleSpec(p.plan.rank, p.plan.depth)
        try:
            payload = self.reassembler.pop(row.device_id, r)
            decoded = decode_update(payload, expected_shapes=expected_shapes(self.global_adapter.view(spec)))
            if (decoded.round_idx, decoded.device_id, decoded.spec) != (r, row.device_id, spec):
                raise CodecError(
                    f"update is for round {decoded.round_idx}, device {decoded.device_id}, module "
                    f"{decoded.spec}; expected round {r}, device {row.device_id}, module {spec}"
                )
        except (CodecError, FrameError, KeyError) as exc:
            row.status, row.error = "bad_update", str(exc)
            self.view.line(f"round {r}: edge {row.device_id} sent a bad update: {exc}")
            return None
        if p.report is None:
            row.error = f"update received complete, but no report ({row.error}); measurements missing"
            self.view.line(f"round {r}: edge {row.device_id}: {row.error}")
        row.status = "ok"
        return ClientUpdate(
            spec=spec, delta=decoded.state, weight=float(self.device_examples[row.device_id]), kept=decoded.kept or None
        )

    # ------------------------------------------------------------------------------------------ event loop
    def _poll(self, timeout_s: float) -> None:
        if self.acks:
            timeout_s = min(timeout_s, max(0.0, min(a.due for a in self.acks) - time.monotonic()))
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        if self.control in events:
            for _ in range(1000):  # drain what is there, bounded so data frames are not starved
                try:
                    parts = self.control.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_control(parts)
        if self.uplink.poll_socket is None or self.uplink.poll_socket in events:
            for rx in self.uplink.recv(0.0):
                self._on_frame(rx.data, rx.snr_db)
        self._fire_acks()

    def _on_frame(self, data: bytes, snr_db: float | None) -> None:
        try:
            frame = Frame.from_bytes(data)
        except FrameError as exc:
            self.bad_frames += 1
            log.warning("uplink: dropped a bad frame (%d so far): %s", self.bad_frames, exc)
            return
        p = self.pending.get(frame.device_id)
        if frame.round_idx != self.round_idx or p is None:
            log.info(
                "uplink: frame of device %d round %d is not expected now (round %d); ignored",
                frame.device_id,
                frame.round_idx,
                self.round_idx,
            )
            return
        try:
            if self.reassembler.add(frame) and snr_db is not None:
                p.snr_db.append(snr_db)
        except FrameError as exc:
            self.bad_frames += 1
            log.warning("uplink: device %d frame %d rejected: %s", frame.device_id, frame.seq, exc)

    def _on_control(self, parts: list[bytes]) -> None:
        identity = parts[0]
        try:
            if len(parts) not in (2, 3):
                raise messages.MessageError(f"{len(parts) - 1} message parts (expected 1 or 2)")
            msg = messages.decode(parts[1])
        except messages.MessageError as exc:
            log.warning("control: ignored bad message from peer %r: %s", identity, exc)
            return
        kind = msg["type"]
        if kind == "register":
            self._on_register(identity, msg)
            return
        edge = self.edges.get(msg.get("device_id", -1))
        if edge is None or edge.identity != identity:
            log.warning(
                "control: %s from unregistered peer %r (device %s) ignored", kind, identity, msg.get("device_id")
            )
            if kind != "bye":  # e.g. an edge that outlived a BS restart: tell it to register again
                self._send_raw(identity, "reject", reason="not registered with this BS run: register first")
            return
        edge.last_seen = time.monotonic()
        if kind == "heartbeat":
            edge.state = msg["state"]
            edge.progress = (
                f"{msg['state']} {msg['step']}/{msg['steps']}" if "step" in msg and "steps" in msg else msg["state"]
            )
        elif kind == "burst_end":
            if msg["round"] == self.round_idx and edge.device_id in self.pending:
                self.acks.append(
                    AckTimer(
                        edge.device_id,
                        msg["round"],
                        msg["attempt"],
                        set(msg["seqs"]),
                        time.monotonic() + self.bench.arq.guard_s,
                    )
                )
                edge.progress = f"sending#{msg['attempt']}"
        elif kind == "report":
            p = self.pending.get(edge.device_id)
            if msg["round"] != self.round_idx or p is None:
                log.info("control: late report of device %d for round %d ignored", edge.device_id, msg["round"])
            elif p.report is None:
                p.report = msg
                edge.progress = msg["status"]
                edge.state = "idle"
            self._send(edge, "report_ack", round=msg["round"])
        elif kind == "bye":
            edge.state = "offline"
            self.view.line(f"edge {edge.device_id} left: {msg.get('reason', '')}")
            p = self.pending.get(edge.device_id)
            if p is not None and p.report is None:
                p.dropped = f"left the run ({msg.get('reason', 'bye')})"
        else:
            log.warning("control: unexpected %s from device %d ignored", kind, edge.device_id)

    def _on_register(self, identity: bytes, msg: dict) -> None:
        device_id = msg["device_id"]
        if not 0 <= device_id < self.exp.devices.count:
            self._send_raw(
                identity, "reject", reason=f"device id {device_id} is outside 0..{self.exp.devices.count - 1}"
            )
            return
        old = self.edges.get(device_id)
        if old is not None and old.identity != identity:
            self.view.line(f"edge {device_id} re-registered from {msg['host']} pid {msg['pid']} (was pid {old.pid})")
            p = self.pending.get(device_id)
            if p is not None and p.report is None:
                p.dropped = "restarted during the round"
        elif old is None:
            self.view.line(f"edge {device_id} registered from {msg['host']} pid {msg['pid']}")
        self.edges[device_id] = Edge(
            device_id, identity, msg["host"], msg["pid"], rounds_participated=old.rounds_participated if old else 0
        )
        self._send_raw(
            identity,
            "welcome",
            device_id=device_id,
            experiment=to_mapping(self.exp),
            bench=to_mapping(self.bench),
            run_id=self.run_id,
            data_address=self.data_endpoint,
        )

    def _fire_acks(self) -> None:
        now = time.monotonic()
        if any(
            a.due <= now and not a.seqs <= self.reassembler.received_seqs(a.device_id, a.round_idx) for a in self.acks
        ):
            # an ack is due with frames missing: take what the PHY still holds (a receiver may lag the air)
            max_wait_s = self.bench.arq.ack_timeout_s / 2  # the edge waits ack_timeout_s for the answer
            for rx in self.uplink.drain_until_quiet(quiet_s=0.05, max_wait_s=max_wait_s):
                self._on_frame(rx.data, rx.snr_db)
        keep = []
        for a in self.acks:
            have = self.reassembler.received_seqs(a.device_id, a.round_idx)
            if a.due <= now or a.seqs <= have:
                edge = self.edges.get(a.device_id)
                if edge is not None:
                    self._send(edge, "ack", round=a.round_idx, attempt=a.attempt, received=sorted(have))
            else:
                keep.append(a)
        self.acks = keep

    def _send(self, edge: Edge, msg_type: str, attachment: bytes | None = None, **fields: Any) -> bool:
        if self._send_raw(edge.identity, msg_type, attachment, **fields):
            return True
        if edge.state != "offline":  # the ROUTER knows the peer's connection is gone: a crash or a disconnect
            edge.state = "offline"
            self.view.line(f"edge {edge.device_id} is disconnected (a {msg_type} could not be delivered)")
        p = self.pending.get(edge.device_id)
        if p is not None and p.report is None and not p.dropped:
            p.dropped = "disconnected"
        return False

    def _send_raw(self, identity: bytes, msg_type: str, attachment: bytes | None = None, **fields: Any) -> bool:
        parts = [identity, messages.encode(msg_type, **fields)] + ([attachment] if attachment is not None else [])
        try:
            self.control.send_multipart(parts, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("control: could not send %s to %r: %s", msg_type, identity, exc)
            return False

    def _broadcast(self, msg_type: str, **fields: Any) -> None:
        for edge in self.edges.values():
            if edge.state != "offline":
                self._send(edge, msg_type, **fields)

    def stop(self, *_: Any) -> None:
        self.stopping = True
