"""The BS's round state machine: plan (ask the controller), collect (reports, frames, ARQ acks), close.

Driven through a `RoundTransport` and a clock, so it runs the same against zmq sockets and against an in-memory
transport in tests. One thread: it polls the transport with a timeout no longer than the next ARQ answer falls due.
A device that crashes, hangs or disconnects is dropped from the round when its deadline passes (or sooner, once
the transport says it has been silent too long). Bad frames are counted, logged and ignored; nothing received is lost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from bs_node.checkpoint import Checkpoint, capture, restore_rng
from bs_node.checkpoint import save as save_checkpoint
from bs_node.controllers import Controller
from bs_node.live_view import LiveView, percent
from bs_node.measurements import RoundRecord, finite_or_none, run_totals
from bs_node.records import RunRecorder
from bs_node.rounds.close import RoundCloser
from bs_node.rounds.downlink import Downlink
from bs_node.rounds.link_trace import LinkTracer
from bs_node.rounds.planning import round_state
from bs_node.rounds.ports import Clock, Event, FrameReceived, FromEdge, Registered, RoundModel, RoundTransport
from bs_node.rounds.state import Pending
from config import BenchConfig, ExperimentConfig
from link.arq import AckTimers
from proto.control import Ack, BurstEnd, Bye, Heartbeat, Plan, Report, ReportAck, Shutdown, ViewStatus
from proto.framing import Frame, FrameError, Reassembler
from trust.sealing import FrameGate, FrameRejected

log = logging.getLogger("bs")


class StartupError(RuntimeError):
    """Too few edges became ready before the start-up timeout."""


class RoundRunner:
    """Runs the experiment's rounds; `run()` returns the run summary."""

    def __init__(
        self,
        experiment: ExperimentConfig,
        bench: BenchConfig,
        *,
        transport: RoundTransport,
        model: RoundModel,
        controller: Controller,
        recorder: RunRecorder,
        view: LiveView,
        clock: Clock = time.monotonic,
        run_id: str = "",
        resume: Checkpoint | None = None,
        endpoints: dict[str, str] | None = None,
    ) -> None:
        """resume: a checkpoint to continue from (its run id, round, adapter, controller and counters);
        endpoints: the bound addresses, kept in every checkpoint so a resume binds them again."""
        self.exp, self.bench = experiment, bench
        self.transport, self.model, self.controller = transport, model, controller
        self.recorder, self.view, self.clock, self.run_id = recorder, view, clock, run_id
        self.reassembler = Reassembler()
        self.acks = AckTimers(bench.arq.guard_s)
        self.closer = RoundCloser(
            experiment,
            model,
            self.reassembler,
            view,
            capability=lambda d: controller.capability(d, model.max_rank, model.num_layers),
        )
        self.round_idx = 0  # the round frames and reports are accepted for (still the last one between rounds)
        self.pending: dict[int, Pending] = {}
        self.progress: dict[int, str] = {}  # device -> its last progress, for the status line
        self.bad_frames = 0  # frames the PHY passed that do not parse (CRC, header)
        self.gate = FrameGate(sealed=bench.security.mode == "sealed")
        self.rejected: Counter[int] = Counter()  # claimed device -> frames the gate refused, this round
        self.trace = LinkTracer(recorder.run_dir)  # every uplink transmission and its fate (proto.link_trace)
        self.downlink = Downlink(bench, transport.send_downlink, clock) if bench.downlink_over_phy else None
        self.stopping = False
        self.resume_from = resume
        self.endpoints = dict(endpoints or {})
        self.initial: dict[str, float | None] = {}

    def stop(self) -> None:
        """Finish after the current step: the round in progress closes with what it has."""
        self.stopping = True

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Evaluate the initial adapter, wait for the edges, run every round; the summary is written even when
        the run stops early or fails, and the edges are told to leave."""
        first = self._restore(self.resume_from) if self.resume_from is not None else self._start()
        summary: dict[str, Any] = {
            "run_id": self.run_id,
            "initial_accuracy": self.initial.get("accuracy"),
            "initial_val_accuracy": self.initial.get("val_accuracy"),
            "rounds": first - 1,
            **({"resumed_at_round": first} if self.resume_from is not None else {}),
        }
        if last := self.recorder.records[-1:]:
            summary.update(final_accuracy=last[0].accuracy, final_val_accuracy=last[0].val_accuracy)
        t_start = self.clock()
        try:
            self.wait_for_devices()
            for r in range(first, self.exp.round.rounds + 1):
                if self.stopping:
                    break
                record = self.run_round(r)
                summary.update(rounds=r, final_accuracy=record.accuracy, final_val_accuracy=record.val_accuracy)
        finally:
            summary.update(
                wall_s=self.clock() - t_start,
                stopped_early=self.stopping,
                **run_totals(self.recorder.records),
                bad_frames=self.bad_frames,
                security=self.bench.security.mode,
                frames_rejected=sum(self.gate.rejected.values()),
                frames_rejected_by_reason=dict(self.gate.reasons),
                control_messages_rejected=self.transport.rejected_messages(),
            )
            self.recorder.write_summary(summary)
            self.transport.broadcast(Shutdown(reason="stopped" if self.stopping else "run complete"))
        self.view.line(
            f"run {'stopped' if self.stopping else 'complete'}: {summary['rounds']} rounds in "
            f"{summary['wall_s']:.0f} s, final accuracy {percent(summary.get('final_accuracy'))} "
            f"(validation {percent(summary.get('final_val_accuracy'))}); records in {self.recorder.run_dir}"
        )
        return summary

    def _start(self) -> int:
        """A new run: the accuracy before fine-tuning; the first round is 1."""
        initial, initial_val = self.model.evaluate(), self.model.validate()
        self.initial = {"accuracy": initial["accuracy"], "val_accuracy": finite_or_none(initial_val["accuracy"])}
        self.recorder.initial_accuracy = initial["accuracy"]
        self.view.line(
            f"round   0 | accuracy {percent(initial['accuracy'])} | validation "
            f"{percent(self.initial['val_accuracy'])} before fine-tuning"
        )
        return 1

    def _restore(self, checkpoint: Checkpoint) -> int:
        """A resumed run: the adapter, the controller, the counters and generators as the checkpoint left them,
        the records of the rounds it holds; returns the round to go on with."""
        self.model.load_adapter_state(checkpoint.adapter)
        self.controller.load_state_dict(checkpoint.controller)
        self.closer.load_state_dict(checkpoint.closer)
        restore_rng(checkpoint.rng)
        self.initial = dict(checkpoint.initial)
        self.recorder.initial_accuracy = self.initial.get("accuracy")
        self.recorder.resume(checkpoint.next_round)
        self.trace.resume(checkpoint.next_round)
        self.view.line(
            f"resumed run {self.run_id} at round {checkpoint.next_round} "
            f"({len(self.recorder.records)} rounds recorded before it)"
        )
        return checkpoint.next_round

    def _checkpoint(self, r: int) -> None:
        """After round r is recorded: the state to go on with at round r + 1."""
        state = {"controller": self.controller.state_dict(), "closer": self.closer.state_dict()}
        checkpoint = capture(self.run_id, r + 1, self.exp, self.bench, self.model.adapter_state(), **state)
        save_checkpoint(self.recorder.run_dir, checkpoint, initial=self.initial, endpoints=self.endpoints)

    def wait_for_devices(self) -> None:
        """Until every device is ready, or the start-up timeout with at least `round.min_devices` ready."""
        want = self.exp.devices.count
        deadline = self.clock() + self.exp.round.startup_timeout_s
        self.view.line(f"waiting for {want} edge(s) to register (up to {self.exp.round.startup_timeout_s:.0f} s)")
        while not self.stopping:
            ready = self.transport.ready_devices()
            if len(ready) >= want:
                break
            if self.clock() > deadline:
                if len(ready) >= self.exp.round.min_devices:
                    self.view.line(f"startup timeout: starting with {len(ready)} of {want} edges")
                    break
                raise StartupError(
                    f"only {len(ready)} of {want} edges ready after "
                    f"{self.exp.round.startup_timeout_s:.0f} s (need round.min_devices="
                    f"{self.exp.round.min_devices})"
                )
            self.poll(0.5)
        ready = self.transport.ready_devices()
        self.view.line(f"{len(ready)} edge(s) ready: " + ", ".join(f"{e.device_id}@{e.host}" for e in ready))

    def run_round(self, r: int) -> RoundRecord:
        """Plan, collect until every participant settled or the deadline, close; returns the round's record."""
        exp = self.exp
        self.round_idx = r
        self.gate.begin_round(r)
        self.rejected.clear()
        t0 = self.clock()
        self.poll(0.0)  # registrations and heartbeats that came in while the last round was evaluated
        if not self.transport.ready_devices():
            self.view.line(f"round {r}: no edge is ready; waiting up to {exp.round.deadline_s:.0f} s")
        while not self.stopping and not self.transport.ready_devices() and self.clock() < t0 + exp.round.deadline_s:
            self.poll(0.5)
        plans, downlink_bytes = self._plan(r)
        deadline = t0 + exp.round.deadline_s
        while not self.stopping and self.clock() < deadline and not self._settled():
            self.poll(min(1.0, max(0.0, deadline - self.clock())))
            self._drop_silent()
            self.view.status(r, self.clock() - t0, {d: self.progress.get(d, "") for d in self.pending})
        return self._close(r, plans, downlink_bytes, t0)

    # ------------------------------------------------------------------------------------------ plan
    def _plan(self, r: int) -> tuple[dict[int, Plan], int]:
        """Ask the controller, send each ready device its plan; participants get their adapter view attached, or
        announced in the plan and broadcast over the PHY after all plans went out (bench downlink.over_phy)."""
        ready = self.transport.ready_devices()
        state = round_state(r, ready, self.bench, self.exp, self.model, self.closer.rounds_participated)
        plans = {
            d: self._with_verdict(p.to_plan(r, self.exp.round.deadline_s), d)
            for d, p in self.controller.decide(state).items()
        }
        carriers = self.transport.start_round(r, {d: p.bandwidth_hz for d, p in plans.items() if p.participate})
        plans = {d: p.model_copy(update={"center_freq_hz": carriers.get(d)}) for d, p in plans.items()}
        modules = {d: (p.rank, p.depth) for d, p in plans.items() if p.participate and self.transport.is_registered(d)}
        views = {m: self.model.adapter_view(m[0], m[1], r) for m in sorted(set(modules.values()))}
        if self.downlink is not None:
            self.downlink.start_round(r, views, modules)
        downlink_bytes, self.pending = 0, {}
        for device_id, plan in sorted(plans.items()):
            if not self.transport.is_registered(device_id):
                continue
            view = views[modules[device_id]] if plan.participate else None
            if view is not None and self.downlink is not None:
                plans[device_id] = plan = plan.model_copy(update=self.downlink.announce(modules[device_id]))
            delivered = self.transport.send(device_id, plan, view if self.downlink is None else None)
            if plan.participate:
                self.pending[device_id] = Pending(plan, dropped=None if delivered else "disconnected")
                self.reassembler.expect(device_id, r, self.model.max_update_bytes(plan.rank, plan.depth))
                downlink_bytes += len(view) if delivered and view is not None and self.downlink is None else 0
        if self.downlink is not None:
            self.downlink.broadcast(exclude={d for d, p in self.pending.items() if p.dropped})
        return plans, downlink_bytes

    def _with_verdict(self, plan: Plan, device_id: int) -> Plan:
        """The plan, telling the device which of its earlier updates were aggregated (its error feedback folds the
        others back): every ready device gets one each round, so it hears about every round it sent in."""
        rounds = self.closer.aggregated_rounds(device_id, plan.round)
        return Plan.model_validate({**plan.model_dump(), "aggregated_rounds": rounds})

    # ------------------------------------------------------------------------------------------ collect
    def _settled(self) -> bool:
        return all(p.settled for p in self.pending.values())

    def _drop_silent(self) -> None:
        for device_id, p in self.pending.items():
            silent_s = self.transport.silent_for_s(device_id)
            if not p.settled and silent_s is not None:
                p.dropped = f"silent for {silent_s:.0f} s"
                self.view.line(f"round {self.round_idx}: edge {device_id} dropped ({p.dropped})")

    def poll(self, timeout_s: float) -> None:
        """Handle what arrives within timeout_s (shortened to the next ARQ answer due), then answer bursts."""
        due_s = self.acks.next_due_s()
        if due_s is not None:
            timeout_s = min(timeout_s, max(0.0, due_s - self.clock()))
        for event in self.transport.poll(timeout_s):
            self._on_event(event)
        self._fire_acks()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, FrameReceived):
            self._on_frame(event)
        elif isinstance(event, Registered):
            self.progress[event.device_id] = ""
            if event.frame_key is not None:
                self.gate.admit(event.device_id, event.frame_key)
            p = self.pending.get(event.device_id)
            if event.replaced and p is not None and p.report is None:
                p.dropped = "restarted during the round"
        else:
            self._on_message(event)

    def _on_message(self, event: FromEdge) -> None:
        device_id, msg = event.device_id, event.message
        p = self.pending.get(device_id)
        if isinstance(msg, Heartbeat):
            steps = f" {msg.step}/{msg.steps}" if msg.step is not None and msg.steps is not None else ""
            self.progress[device_id] = msg.state + steps
        elif isinstance(msg, BurstEnd):
            if msg.round == self.round_idx and p is not None:
                self.acks.burst_ended(device_id, msg.round, msg.attempt, msg.seqs, self.clock())
                self.trace.burst_ended(device_id, msg.round, msg.attempt, msg.seqs, msg.total)
                self.progress[device_id] = f"sending#{msg.attempt}"
        elif isinstance(msg, ViewStatus):
            if self.downlink is not None and p is not None:
                self.downlink.on_status(device_id, msg)
                self.progress[device_id] = f"view {len(msg.received)}/{msg.total}"
        elif isinstance(msg, Report):
            if msg.round != self.round_idx or p is None:
                log.info("control: late report of device %d for round %d ignored", device_id, msg.round)
            elif p.report is None:
                p.report = msg
                self.progress[device_id] = msg.status
            self._send(device_id, ReportAck(round=msg.round))
        elif isinstance(msg, Bye):
            if p is not None and p.report is None:
                p.dropped = f"left the run ({msg.reason or 'bye'})"

    def _on_frame(self, rx: FrameReceived) -> None:
        try:
            frame = Frame.from_bytes(rx.data)
        except FrameError as exc:
            self.bad_frames += 1
            if self.bad_frames <= 10 or self.bad_frames % 1000 == 0:  # a flood is counted, not logged line by line
                log.warning("uplink: dropped a bad frame (%d so far): %s", self.bad_frames, exc)
            return
        try:
            frame = self.gate.open(frame)
        except FrameRejected as exc:
            self.rejected[frame.device_id] += 1
            self.trace.frame(frame, len(rx.data), rx.snr_db, f"rejected:{exc.reason}")
            if self.rejected[frame.device_id] == 1:  # once per claimed device and round; the records count them all
                log.warning(
                    "uplink: frames claiming device %d rejected (%s: %s); more this round are only counted",
                    frame.device_id,
                    exc.reason,
                    exc,
                )
            return
        p = self.pending.get(frame.device_id)
        if frame.round_idx != self.round_idx or p is None:
            log.info(
                "uplink: frame of device %d round %d is not expected now (round %d); ignored",
                frame.device_id,
                frame.round_idx,
                self.round_idx,
            )
            self.trace.frame(frame, len(rx.data), rx.snr_db, "unexpected")
            return
        try:
            new = self.reassembler.add(frame)
            self.trace.frame(frame, len(rx.data), rx.snr_db, "ok" if new else "duplicate")
            if new and rx.snr_db is not None:
                p.snr_db.append(rx.snr_db)
        except FrameError as exc:
            self.bad_frames += 1
            self.trace.frame(frame, len(rx.data), rx.snr_db, "rejected:malformed")
            log.warning("uplink: device %d frame %d rejected: %s", frame.device_id, frame.seq, exc)

    def _fire_acks(self) -> None:
        now = self.clock()
        received = self.reassembler.received_seqs
        if self.acks.overdue_with_gaps(now, received):
            # an ack is due with frames missing: take what the PHY still holds (a receiver may lag the air)
            max_wait_s = self.bench.arq.ack_timeout_s / 2  # the edge waits ack_timeout_s for the answer
            for rx in self.transport.drain_frames(quiet_s=0.05, max_wait_s=max_wait_s):
                self._on_frame(rx)
        for timer, have in self.acks.take_answerable(now, received):
            if self.transport.is_registered(timer.device_id):
                self._send(timer.device_id, Ack(round=timer.round_idx, attempt=timer.attempt, received=sorted(have)))

    def _send(self, device_id: int, message: Ack | ReportAck) -> None:
        if isinstance(message, Ack) and self.downlink is not None:
            return self.downlink.send_ack(device_id, message)  # over the air: a lost one is asked for again
        if not self.transport.send(device_id, message):
            p = self.pending.get(device_id)
            if p is not None and p.report is None and not p.dropped:
                p.dropped = "disconnected"

    # ------------------------------------------------------------------------------------------ close
    def _close(self, r: int, plans: dict[int, Plan], downlink_bytes: int, t0: float) -> RoundRecord:
        devices, stale = self.closer.close(r, plans, self.pending)
        overruns = self.transport.take_radio_counts()["overruns"]  # the BS radio's, this round (rf benches)
        for row in devices:
            row.frames_rejected = self.rejected.get(row.device_id, 0)
            row.radio_overruns = overruns
            if self.downlink is not None:
                self.downlink.annotate(row)
        self.acks.discard_round(r)
        self.trace.close_round(r, plans, self.pending)
        result, val = self.model.evaluate(), self.model.validate()
        record = RoundRecord(
            round=r,
            accuracy=result["accuracy"],
            eval_loss=result["loss"],
            val_accuracy=finite_or_none(val["accuracy"]),
            val_loss=finite_or_none(val["loss"]),
            wall_s=self.clock() - t0,
            policy=self.controller.name,
            downlink_bytes=downlink_bytes if self.downlink is None else self.downlink.totals.bytes_sent,
            downlink=None if self.downlink is None else asdict(self.downlink.totals),
            devices=devices,
            controller=self.controller.explain(),
            stale_updates=stale,
            aggregation=self.closer.last_aggregation,
            frames_rejected=sum(self.rejected.values()),
        )
        self.controller.observe(record)
        self.recorder.write_round(record)
        self.recorder.save_adapter(self.model.adapter_state())
        self._checkpoint(r)
        self.view.round_table(record)
        return record
