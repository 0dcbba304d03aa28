"""The base-station process: binds the control plane and the uplink at once (so its endpoints can be published
while the model loads), then loads the model and runs the rounds.

Wiring only: sockets and the registry live in `bs_node.transport`, the round state machine in `bs_node.rounds`,
the learning state in `bs_node.global_model`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import torch
import zmq

from bs_node import provenance
from bs_node.checkpoint import Checkpoint
from bs_node.controllers import make_controller
from bs_node.global_model import GlobalModel
from bs_node.live_view import LiveView
from bs_node.records import RunRecorder
from bs_node.rounds import RoundRunner, StartupError
from bs_node.transport import ZmqTransport
from config import BenchConfig, ConfigError, ExperimentConfig, to_mapping
from link.factory import open_uplink_receiver
from trust.curve import RosterAuthenticator
from trust.keys import KeyFileError, RunKeys, open_run_keys
from trust.sealing import FrameKeyring

__all__ = ["BaseStation", "StartupError"]


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
        resume: Checkpoint | None = None,
        record_iq: bool = False,
    ):
        """resume: go on from this checkpoint of the run in run_dir (same run id, so surviving edges keep their
        state; its endpoints unless addresses are given)."""
        self.exp, self.bench = experiment, bench
        self.view = view or LiveView()
        self.recorder = RunRecorder(run_dir)
        self.resume = resume
        self.run_id = resume.run_id if resume is not None else uuid.uuid4().hex[:12]
        if resume is not None:  # the addresses the edges know, unless others are named (port 0 names none)
            control_address = _stable(control_address, resume.endpoints.get("control"))
            data_address = _stable(data_address, resume.endpoints.get("data"))
        self.stopping = False
        self.runner: RoundRunner | None = None
        torch.set_num_threads(threads)
        ctx: zmq.Context = zmq.Context.instance()
        keys = open_keys(bench, run_dir, experiment.devices.count, self.view)
        keyring = None
        self.authenticator: RosterAuthenticator | None = None
        if keys is not None:  # CURVE on the control plane, sealed frames on the uplink (docs/security.md)
            keyring = FrameKeyring(keys.bs.secret_bytes, keys.device_public(experiment.devices.count), self.run_id)
            self.authenticator = RosterAuthenticator(ctx, keys.roster)
        uplink = open_uplink_receiver(
            bench,
            bind_address=data_address or bench.addresses.data,
            context=ctx,
            device_count=experiment.devices.count,
            seed=experiment.seed,
            key=None if keys is None else keys.bs,
            iq_base=Path(run_dir) / "iq" / f"bs-rx-{self.run_id}" if record_iq else None,
        )
        self.data_endpoint = uplink.address  # what edges send to
        self.transport = ZmqTransport(
            control_address=control_address or bench.addresses.control,
            uplink=uplink,
            device_count=experiment.devices.count,
            welcome={
                "experiment": to_mapping(experiment),
                "bench": to_mapping(bench),
                "run_id": self.run_id,
                "data_address": self.data_endpoint,
            },
            view=self.view,
            keyring=keyring,
            curve_key=None if keys is None else keys.bs,
            silence_timeout_s=silence_timeout_s,
            context=ctx,
        )
        self.control_endpoint = self.transport.control_endpoint

    def run(self) -> dict[str, Any]:
        """The whole run; the sockets are closed when it ends, however it ends."""
        try:
            self.recorder.snapshot_config(
                to_mapping(self.exp),
                to_mapping(self.bench),
                provenance.collect(self.bench, model=self.exp.model),
                resumed_at=None if self.resume is None else self.resume.next_round,
            )
            self.view.line(
                f"BS {self.run_id}: control {self.control_endpoint}, data {self.data_endpoint}, "
                f"PHY {self.bench.phy}, policy {self.exp.controller.policy}, run folder {self.recorder.run_dir}"
            )
            try:
                model = GlobalModel(self.exp)
            except ValueError as exc:  # the model cannot be had here (targets, device, a missing wheel): one line
                raise StartupError(f"cannot set up the task and model {self.exp.model.name_or_path!r}: {exc}") from exc
            self.runner = RoundRunner(
                self.exp,
                self.bench,
                transport=self.transport,
                model=model,
                controller=make_controller(self.exp, self.bench),
                recorder=self.recorder,
                view=self.view,
                clock=time.monotonic,
                run_id=self.run_id,
                resume=self.resume,
                endpoints={"control": self.control_endpoint, "data": self.data_endpoint},
            )
            if self.stopping:
                self.runner.stop()
            return self.runner.run()
        finally:
            self.transport.close()
            if self.authenticator is not None:
                self.authenticator.stop()

    def stop(self, *_: Any) -> None:
        """Signal handler: the run closes the round in progress, writes what it has and tells the edges to leave."""
        self.stopping = True
        if self.runner is not None:
            self.runner.stop()


def _stable(given: str | None, before: str | None) -> str | None:
    return before if before and (given is None or given.endswith(":0")) else given


def open_keys(bench: BenchConfig, run_dir: Path, devices: int, view: LiveView) -> RunKeys | None:
    """The run's keys on a sealed bench (None: `security.mode: none`); ConfigError naming what is wrong."""
    if bench.security.mode == "none":
        return None
    try:
        keys = open_run_keys(bench, run_dir, devices)
    except KeyFileError as exc:
        raise ConfigError(f"security.keys_dir: {exc}") from None
    if keys.provisioned:
        view.line(f"provisioned keys for {devices} devices in {keys.key_dir} (edge k: --key DIR/device-k.secret.json)")
    return keys
