"""An edge device: register with the BS, then per round take the plan, train, encode, transmit, report.

The edge learns the experiment from the BS's welcome (one source of truth for multi-host labs), loads its
own Dirichlet share of the task, and never crashes on a bad plan or a bad adapter view: the round is
reported as failed with the reason, and the edge waits for the next plan.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import asdict
from typing import Any

import torch
import zmq

from config import BenchConfig, ExperimentConfig, validated
from fedlora.energy import EnergyMeter
from fedlora.lora import LocalModel, ModuleSpec
from fedlora.models import build_backbone, load_tokenizer
from fedlora.partition import dirichlet_split
from fedlora.sparsify import sparsifier_from_config
from fedlora.tasks import load_task
from fedlora.training import TrainConfig, train_local
from link.arq import send_with_arq
from link.factory import open_uplink_transmitter, reachable_address
from phy.channel import TxSetting
from proto import control as messages
from proto.codec import CodecError, decode_update, encode_update
from proto.framing import fragment

log = logging.getLogger("edge")


class _Stopped(Exception):
    """Raised from the training loop when the node is asked to stop."""


class EdgeNode:
    def __init__(self, bs_address: str, device_id: int, *, threads: int = 1):
        self.bs_address = bs_address
        self.device_id = device_id
        self.threads = threads
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"edge-{device_id}-{os.getpid()}".encode())
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.connect(bs_address)
        self.run_id: str | None = None
        self.stopping = False
        self._pending: list[tuple[dict, bytes | None]] = []
        self.tx = None

    # ------------------------------------------------------------------------------------------ plumbing
    def _send(self, msg_type: str, attachment: bytes | None = None, **fields: Any) -> None:
        parts = [messages.encode(msg_type, **fields)] + ([attachment] if attachment is not None else [])
        self.sock.send_multipart(parts)

    def _recv(self, timeout_s: float) -> tuple[dict, bytes | None] | None:
        """Next valid message from the BS (queued first), or None after timeout. Garbage is logged, skipped."""
        if self._pending:
            return self._pending.pop(0)
        deadline = time.monotonic() + timeout_s
        while not self.stopping:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(remaining_ms):
                return None
            parts = self.sock.recv_multipart()
            try:
                if len(parts) not in (1, 2):
                    raise messages.MessageError(f"{len(parts)} message parts (expected 1 or 2)")
                return messages.decode(parts[0]), (parts[1] if len(parts) == 2 else None)
            except messages.MessageError as exc:
                log.warning("ignored bad message from BS %s: %s", self.bs_address, exc)
        return None

    def _heartbeat(self, state: str, **extra: Any) -> None:
        self._send("heartbeat", device_id=self.device_id, state=state, **extra)

    # ------------------------------------------------------------------------------------------ life cycle
    def run(self) -> int:
        log.info("edge %d: connecting to BS at %s", self.device_id, self.bs_address)
        while not self.stopping:
            welcome = self._register()
            if welcome is None:
                break
            self._setup(welcome)
            status = self._serve()
            if status != "reregister":
                break
        if self.tx is not None:
            self.tx.close()
        try:
            self._send("bye", device_id=self.device_id, reason="stopped" if self.stopping else "shutdown")
        except zmq.ZMQError:
            pass
        self.sock.close()
        return 0

    def _register(self) -> dict | None:
        while not self.stopping:
            self._send("register", device_id=self.device_id, host=socket.gethostname(), pid=os.getpid())
            got = self._recv(5.0)
            while got is not None:
                msg, _ = got
                if msg["type"] == "welcome" and msg["device_id"] == self.device_id:
                    return msg
                if msg["type"] == "reject":
                    log.error("edge %d: BS rejected registration: %s", self.device_id, msg["reason"])
                    return None
                if msg["type"] == "shutdown":
                    return None
                got = self._recv(0.5)
            log.info("edge %d: no welcome yet from %s, retrying", self.device_id, self.bs_address)
        return None

    def _setup(self, welcome: dict) -> None:
        if welcome["run_id"] == self.run_id:
            self._heartbeat("ready")
            return
        where = f"welcome from BS {self.bs_address}"
        exp: ExperimentConfig = validated(ExperimentConfig, welcome["experiment"], f"{where}: experiment")
        bench: BenchConfig = validated(BenchConfig, welcome["bench"], f"{where}: bench")
        self.exp, self.bench, self.run_id = exp, bench, welcome["run_id"]
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        task = load_task(
            exp.task.name, exp.task.path, test_size=exp.task.test_size, seed=exp.seed, max_train=exp.task.max_train
        )
        shares = dirichlet_split(
            [ex.label for ex in task.train],
            exp.devices.count,
            exp.devices.dirichlet_alpha,
            seed=exp.seed,
            min_per_device=exp.devices.min_examples,
        )
        if self.device_id >= len(shares):
            raise SystemExit(f"edge {self.device_id}: the experiment has only {len(shares)} devices")
        self.examples = [task.train[i] for i in shares[self.device_id]]
        self.tokenizer = load_tokenizer(exp.model)
        self.local = LocalModel(build_backbone(exp.model, task.num_labels, exp.seed), exp.model)
        # one per run: it carries this device's error-feedback residual from round to round
        self.sparsifier = sparsifier_from_config(exp.codec, seed=exp.seed, device_id=self.device_id)
        profile = bench.device(self.device_id)
        self.meter = EnergyMeter(
            profile.compute_watts_per_core, bench.radio.pa_efficiency, bench.radio.radio_on_power_w
        )
        data_address = reachable_address(welcome["data_address"], self.bs_address)
        if self.tx is not None:
            self.tx.close()
        self.tx = open_uplink_transmitter(bench, self.device_id, data_address=data_address, seed=exp.seed)
        labels = [ex.label for ex in self.examples]
        log.info(
            "edge %d: ready in %.1f s: %d local examples (label counts %s), %s PHY to %s",
            self.device_id,
            time.perf_counter() - t0,
            len(self.examples),
            {c: labels.count(c) for c in sorted(set(labels))},
            bench.phy,
            data_address,
        )
        self._heartbeat("ready")

    def _serve(self) -> str:
        heartbeat_s = self.exp.round.heartbeat_s
        while not self.stopping:
            got = self._recv(heartbeat_s)
            if got is None:
                self._heartbeat("idle")
                continue
            msg, attachment = got
            if msg["type"] == "plan":
                self._run_round(msg, attachment)
            elif msg["type"] == "shutdown":
                log.info("edge %d: BS ends the run (%s)", self.device_id, msg["reason"])
                return "shutdown"
            elif msg["type"] == "welcome":
                self._setup(msg)
            elif msg["type"] == "reject":  # the BS does not know us (it restarted): register again
                log.warning("edge %d: BS says %s", self.device_id, msg["reason"])
                return "reregister"
            elif msg["type"] in ("ack", "report_ack"):
                pass  # late answers to a round that is over
            else:
                log.warning("edge %d: unexpected %s message ignored", self.device_id, msg["type"])
        return "stopped"

    # ------------------------------------------------------------------------------------------ one round
    def _run_round(self, plan: dict, attachment: bytes | None) -> None:
        round_idx = plan["round"]
        if not plan["participate"]:
            self._heartbeat("idle", round=round_idx)
            return
        measurements: dict[str, Any] = {}
        try:
            status = self._train_and_send(plan, attachment, measurements)
            error = None
        except _Stopped:
            return
        except (CodecError, ValueError, RuntimeError) as exc:
            log.exception("edge %d: round %d failed", self.device_id, round_idx)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        self._send(
            "report", device_id=self.device_id, round=round_idx, status=status, measurements=measurements, error=error
        )

    def _train_and_send(self, plan: dict, attachment: bytes | None, out: dict[str, Any]) -> str:
        round_idx = plan["round"]
        if attachment is None:
            raise ValueError("plan carries no global adapter view")
        view = decode_update(attachment)
        spec = ModuleSpec(plan["rank"], plan["depth"])
        if view.spec != spec:
            raise ValueError(f"adapter view is for module {view.spec}, the plan says {spec}")
        self.local.load(spec, view.state)
        steps = plan["local_steps"]
        log.info(
            "edge %d: round %d: training module rank %d depth %d for %d steps",
            self.device_id,
            round_idx,
            spec.rank,
            spec.depth,
            steps,
        )
        cfg = TrainConfig(
            **{
                **asdict(self.exp.training),
                "local_steps": steps,
                "seed": self.exp.seed * 100003 + round_idx * 101 + self.device_id,
            }
        )
        last_hb = [0.0]

        def progress(step: int, loss: float) -> None:
            if self.stopping:
                raise _Stopped()
            if time.monotonic() - last_hb[0] >= self.exp.round.heartbeat_s:
                self._heartbeat("training", round=round_idx, step=step, steps=steps, loss=float(loss))
                last_hb[0] = time.monotonic()

        self.sparsifier.prepare_model(self.local.model)  # b_only: freeze A
        with self.meter.compute() as window:  # sparsifying is edge compute too
            stats = train_local(
                self.local.model,
                self.tokenizer,
                self.examples,
                cfg,
                regularizer=self.sparsifier.regularizer(),
                progress=progress,
            )
            trained = self.local.state()
            delta = {k: trained[k] - view.state[k] for k in view.state}
            update = self.sparsifier.sparsify(delta, trained, spec, plan["keep_fraction"], round_idx=round_idx)
        speed = self.bench.device(self.device_id).compute_speed
        if speed < 1.0:  # emulated slower hardware: the extra time is really spent, the extra work is accounted
            self._wait_emulated(window.result.wall_s * (1.0 / speed - 1.0), round_idx)
        payload = encode_update(
            update.delta, spec=spec, round_idx=round_idx, device_id=self.device_id, dtype=update.dtype, kept=update.kept
        )
        frames = fragment(payload, self.device_id, round_idx, self.bench.radio.frame_payload_bytes)
        setting = TxSetting(
            tx_power_dbm=plan["tx_power_dbm"], bandwidth_hz=plan["bandwidth_hz"], modulation=plan["modulation"]
        )
        self._heartbeat("sending", round=round_idx)
        arq = send_with_arq(
            self.tx,
            frames,
            setting,
            round_idx=round_idx,
            request_ack=lambda attempt, seqs: self._request_ack(round_idx, attempt, seqs, len(frames)),
            max_attempts=self.bench.arq.max_attempts,
            airtime_budget_s=self.bench.arq.airtime_budget_s,
        )
        compute = window.result
        transmit_j = self.meter.transmit_energy_j(setting.tx_power_dbm, arq.airtime_s)
        out.update(
            update_bytes=len(payload),
            uplink_bytes=arq.bytes_sent,
            frames_sent=arq.frames_sent,
            frames_lost=arq.frames_lost,
            arq_attempts=arq.attempts,
            airtime_s=arq.airtime_s,
            compute_s=compute.cpu_s / speed,
            train_wall_s=compute.wall_s / speed,
            compute_energy_j=compute.energy_j / speed,
            transmit_energy_j=transmit_j,
            energy_j=compute.energy_j / speed + transmit_j,
            energy_source=compute.source + (f" x1/{speed:g} emulated" if speed < 1.0 else ""),
            train_loss=stats.mean_loss,
            train_examples=len(self.examples),
            kept_components=update.info["kept_components"],
            total_components=update.info["total_components"],
            residual_norm=update.info["residual_norm"],
            true_snr_db=getattr(self.tx, "last_true_snr_db", None),
        )
        return "ok" if arq.delivered else "undelivered"

    def _wait_emulated(self, seconds: float, round_idx: int) -> None:
        """Spend the time emulated slower hardware would have needed, still heartbeating."""
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            self._heartbeat("training (emulated slow-down)", round=round_idx)
            time.sleep(min(self.exp.round.heartbeat_s, max(0.0, end - time.monotonic())))

    def _request_ack(self, round_idx: int, attempt: int, seqs: list[int], total: int) -> set[int] | None:
        """ARQ feedback over the control plane: which frames of this round the BS holds so far."""
        self._send(
            "burst_end", device_id=self.device_id, round=round_idx, attempt=attempt, seqs=list(seqs), total=total
        )
        deadline = time.monotonic() + self.bench.arq.ack_timeout_s
        while not self.stopping and time.monotonic() < deadline:
            got = self._recv(max(0.0, deadline - time.monotonic()))
            if got is None:
                break
            msg, attachment = got
            if msg["type"] == "ack" and msg["round"] == round_idx and msg["attempt"] == attempt:
                return set(msg["received"])
            if msg["type"] in ("plan", "shutdown", "welcome"):
                self._pending.append((msg, attachment))  # the BS moved on: stop this round's ARQ
                return None
        log.warning("edge %d: no ack for round %d attempt %d", self.device_id, round_idx, attempt)
        return None

    def stop(self, *_: Any) -> None:
        self.stopping = True


def install_signal_handlers(node: EdgeNode) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, node.stop)
