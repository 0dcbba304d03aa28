"""One edge round: load the plan's adapter view, train, sparsify, encode, fragment, send with ARQ, build the report.

No sockets here: the round talks to the BS through `RoundLink` (heartbeats, ARQ feedback) and to the air through
the uplink transmitter it is given. A bad plan or a bad adapter view never crashes the edge: the round is
reported as failed with the reason. Every plan, taking part or not, first settles the device's error feedback
with the BS's verdict on what it sent before (`Plan.aggregated_rounds`, docs/soft.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch

from config import BenchConfig, ExperimentConfig
from fedlora.accelerator import GpuEnergy, resolve_device
from fedlora.energy import EnergyMeter
from fedlora.lora import LocalModel, ModuleSpec
from fedlora.models import build_backbone, load_tokenizer
from fedlora.partition import device_splits
from fedlora.sparsify import Sparsifier, sparsifier_from_config
from fedlora.tasks import load_task
from fedlora.training import train_local
from link.arq import FrameEncoder, plain_encoder, send_with_arq
from phy.channel import TxSetting
from phy.uplink import UplinkTransmitter
from proto.codec import CodecError, decode_update, encode_update
from proto.control import AGGREGATED_WINDOW_ROUNDS, Measurements, Plan, Report, ReportStatus
from proto.framing import fragment

log = logging.getLogger("edge")


class Stopped(Exception):
    """Raised from the training loop when the edge is asked to stop: the round ends without a report."""


class RoundLink(Protocol):
    """What a round needs of the control plane."""

    def heartbeat(
        self,
        state: str,
        *,
        round_idx: int | None = None,
        step: int | None = None,
        steps: int | None = None,
        loss: float | None = None,
    ) -> None: ...

    def request_ack(
        self, round_idx: int, attempt: int, seqs: list[int], total: int, timeout_s: float
    ) -> set[int] | None: ...


class EdgeRounds:
    """One run's local state (data share, model, sparsifier residual, energy meter, uplink) and its rounds."""

    def __init__(
        self,
        experiment: ExperimentConfig,
        bench: BenchConfig,
        device_id: int,
        tx: UplinkTransmitter,
        *,
        link: RoundLink,
        stopping: Callable[[], bool] = lambda: False,
        threads: int = 1,
    ):
        exp = self.exp = experiment
        self.bench, self.device_id, self.tx, self.link, self.stopping = bench, device_id, tx, link, stopping
        self.encode: FrameEncoder = plain_encoder  # set per registration by the node (sealed under its frame key)
        self.on_held: Callable[[int], None] = lambda _round: None  # the node checkpoints here (before sending)
        # the node sets it when the bench sends views over the PHY (edge_node.view_downlink.ViewReceiver.receive)
        # (the view, the mean SNR its receiver measured on the view's frames)
        self.receive_view: Callable[[Plan], tuple[bytes, float | None]] | None = None
        torch.set_num_threads(threads)
        task = load_task(
            exp.task.name, exp.task.path, test_size=exp.task.test_size, seed=exp.seed, max_train=exp.task.max_train
        )
        # the BS makes the same split; the held-out part is never trained on (it is the BS's validation data)
        splits = device_splits([ex.label for ex in task.train], exp.devices, exp.seed)
        if device_id >= len(splits):
            raise SystemExit(f"edge {device_id}: the experiment has only {len(splits)} devices")
        self.examples = [task.train[i] for i in splits[device_id].train]
        self.tokenizer = load_tokenizer(exp.model)
        device = resolve_device(exp.model.device)  # a clear error where the named GPU is not here
        backbone = build_backbone(exp.model, task.num_labels, exp.seed, task=task.name)
        self.local = LocalModel(backbone, exp.model, device=device)
        # one per run: it carries this device's error-feedback residual from round to round
        self.sparsifier = sparsifier_from_config(exp.codec, seed=exp.seed, device_id=device_id)
        profile = bench.device(device_id)
        self.meter = EnergyMeter(
            profile.compute_watts_per_core,
            bench.radio.pa_efficiency,
            bench.radio.radio_on_power_w,
            gpu=GpuEnergy(device.index or 0) if device.type == "cuda" else None,
        )

    def run(self, plan: Plan, attachment: bytes | None) -> Report | None:
        """Take part as planned; the report to send, or None (not a participant, or stopped mid-round)."""
        self.settle(plan)
        if not plan.participate:
            self.link.heartbeat("idle", round_idx=plan.round)
            return None
        status: ReportStatus
        try:
            measurements, status = self._train_and_send(plan, attachment)
            error = None
        except Stopped:
            return None
        except (CodecError, ValueError, RuntimeError) as exc:
            log.exception("edge %d: round %d failed", self.device_id, plan.round)
            measurements, status, error = Measurements(), "failed", f"{type(exc).__name__}: {exc}"
        return Report(device_id=self.device_id, round=plan.round, status=status, measurements=measurements, error=error)

    def settle(self, plan: Plan) -> None:
        """Error feedback on what this device sent earlier (`settle_feedback`)."""
        settle_feedback(self.sparsifier, plan, self.device_id)

    def _train_and_send(self, plan: Plan, attachment: bytes | None) -> tuple[Measurements, ReportStatus]:
        round_idx = plan.round
        downlink_snr_db = None
        if plan.view_frames is not None:
            if self.receive_view is None:
                raise ValueError("the plan's view comes over the PHY, and this edge's link has no downlink")
            attachment, downlink_snr_db = self.receive_view(plan)
        if attachment is None:
            raise ValueError("plan carries no global adapter view")
        view = decode_update(attachment)
        spec = ModuleSpec(plan.rank, plan.depth)
        if view.spec != spec:
            raise ValueError(f"adapter view is for module {view.spec}, the plan says {spec}")
        self.local.load(spec, view.state)
        steps = plan.local_steps
        log.info(
            "edge %d: round %d: training module rank %d depth %d for %d steps",
            self.device_id,
            round_idx,
            spec.rank,
            spec.depth,
            steps,
        )
        cfg = self.exp.training.model_copy(
            update={"local_steps": steps, "seed": self.exp.seed * 100003 + round_idx * 101 + self.device_id}
        )
        last_hb = [0.0]

        def progress(step: int, loss: float) -> None:
            if self.stopping():
                raise Stopped()
            if time.monotonic() - last_hb[0] >= self.exp.round.heartbeat_s:
                self.link.heartbeat("training", round_idx=round_idx, step=step, steps=steps, loss=_finite(loss))
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
            update = self.sparsifier.sparsify(delta, trained, spec, plan.keep_fraction, round_idx=round_idx)
        self.on_held(round_idx)  # the residual and what goes out are saved before any of it is on the air
        compute = window.result
        assert compute is not None  # set when the window closed
        speed = self.bench.device(self.device_id).compute_speed
        if speed < 1.0:  # emulated slower hardware: the extra time is really spent, the extra work is accounted
            self._wait_emulated(compute.wall_s * (1.0 / speed - 1.0), round_idx)
        payload = encode_update(
            update.delta, spec=spec, round_idx=round_idx, device_id=self.device_id, dtype=update.dtype, kept=update.kept
        )
        frames = fragment(payload, self.device_id, round_idx, self.bench.radio.frame_payload_bytes)
        setting = TxSetting(tx_power_dbm=plan.tx_power_dbm, bandwidth_hz=plan.bandwidth_hz, modulation=plan.modulation)
        log.info(
            "edge %d: round %d: sending %d bytes in %d frames (%s, %.1f dBm, %.0f Hz)",
            self.device_id,
            round_idx,
            len(payload),
            len(frames),
            setting.modulation,
            setting.tx_power_dbm,
            setting.bandwidth_hz,
        )
        self.link.heartbeat("sending", round_idx=round_idx)
        keepalive = getattr(self.tx, "set_keepalive", None)  # a send that waits on the air heartbeats meanwhile
        if keepalive is not None:
            keepalive(lambda: self.link.heartbeat("sending", round_idx=round_idx), self.exp.round.heartbeat_s)
        self.tx.set_center_freq_hz(plan.center_freq_hz)  # radios: this round's subband (None elsewhere)
        ack_timeout_s = self.bench.arq.ack_timeout_s
        arq = send_with_arq(
            self.tx,
            frames,
            setting,
            round_idx=round_idx,
            request_ack=lambda attempt, seqs: self.link.request_ack(
                round_idx, attempt, seqs, len(frames), ack_timeout_s
            ),
            max_attempts=self.bench.arq.max_attempts,
            airtime_budget_s=self.bench.arq.airtime_budget_s,
            encode=self.encode,
        )
        transmit_j = self.meter.transmit_energy_j(setting.tx_power_dbm, arq.airtime_s)
        true_snr_db = getattr(self.tx, "last_true_snr_db", None)  # sim PHYs only: ground truth for the records
        measurements = Measurements(
            update_bytes=len(payload),
            uplink_bytes=int(arq.bytes_sent),
            frames_sent=int(arq.frames_sent),
            frames_lost=int(arq.frames_lost),
            arq_attempts=arq.attempts,
            airtime_s=float(arq.airtime_s),
            compute_s=compute.cpu_s / speed,
            train_wall_s=compute.wall_s / speed,
            compute_energy_j=compute.energy_j / speed,
            transmit_energy_j=float(transmit_j),
            energy_j=compute.energy_j / speed + transmit_j,
            energy_source=compute.source + (f" x1/{speed:g} emulated" if speed < 1.0 else ""),
            train_loss=_finite(stats.mean_loss),  # a diverged loss is reported as missing, not sent as NaN
            train_examples=len(self.examples),
            kept_components=int(update.info["kept_components"]),
            total_components=int(update.info["total_components"]),
            residual_norm=float(update.info["residual_norm"]),
            true_snr_db=None if true_snr_db is None else float(true_snr_db),
            radio_underruns=self.tx.take_radio_counts()["underruns"],
            downlink_snr_db=downlink_snr_db,
        )
        return measurements, "ok" if arq.delivered else "undelivered"

    def _wait_emulated(self, seconds: float, round_idx: int) -> None:
        """Spend the time emulated slower hardware would have needed, still heartbeating."""
        end = time.monotonic() + seconds
        while not self.stopping() and time.monotonic() < end:
            self.link.heartbeat("training (emulated slow-down)", round_idx=round_idx)
            time.sleep(min(self.exp.round.heartbeat_s, max(0.0, end - time.monotonic())))


def settle_feedback(sparsifier: Sparsifier, plan: Plan, device_id: int) -> None:
    """Error feedback on what this device sent earlier (docs/soft.md): an update the plan lists as aggregated
    is dropped, one of a closed round it does not list is folded back into the residual, so this round's update
    carries it. One older than the plan's window cannot be judged: it counts as delivered.

    A plan for a round this device already sent in comes from a BS resumed from a checkpoint taken before that
    round closed: what was sent then was never aggregated, and the round is trained again. The device rolls its
    error feedback back to what it was before that round (the residual then; the update dropped, not folded
    back), so the re-run round sends a fresh update and never the earlier one as well (docs/security.md)."""
    if plan.aggregated_rounds is None:
        return
    aggregated = set(plan.aggregated_rounds)
    replayed = sparsifier.rollback(plan.round)
    if replayed:
        log.info(
            "edge %d: the BS goes on at round %d: round(s) %s were never closed; rolled back to before them",
            device_id,
            plan.round,
            replayed,
        )
    earlier = list(sparsifier.feedback.pending)
    first = plan.round - AGGREGATED_WINDOW_ROUNDS
    lost = [r for r in earlier if r not in aggregated and r >= first]
    unknown = [r for r in earlier if r < first]
    if unknown:
        log.warning("edge %d: no word on the update(s) of round(s) %s; counted as delivered", device_id, unknown)
    folded = sparsifier.settle(delivered=[r for r in earlier if r not in lost], lost=lost)
    if folded:
        log.info("edge %d: round(s) %s closed without this device's update: folded back", device_id, folded)


def _finite(value: float) -> float | None:
    """A loss for the wire: JSON has no NaN or infinity, and a diverged step must not take the edge down."""
    return float(value) if math.isfinite(value) else None
