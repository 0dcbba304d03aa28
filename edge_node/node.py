"""An edge device: register with the BS, then per round take the plan, run it, report.

The edge learns the experiment from the BS's welcome (one source of truth for multi-host labs), loads its own
Dirichlet share of the task, and never crashes on a bad plan or a bad adapter view: the round is reported as
failed with the reason, and the edge waits for the next plan. Wiring only: the control plane is
`edge_node.client`, the round `edge_node.round`.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import BenchConfig, ConfigError, ExperimentConfig, validated
from edge_node.client import BsClient
from edge_node.round import EdgeRounds, RoundLink
from edge_node.state import load_state, save_state, state_path
from link.arq import FrameEncoder, plain_encoder
from link.factory import open_uplink_transmitter, reachable_address
from phy.uplink import UplinkTransmitter
from proto.control import Ack, Plan, Reject, ReportAck, Shutdown, Welcome
from trust.keys import KeyPair
from trust.sealing import FrameSealer, frame_key

if TYPE_CHECKING:  # pragma: no cover
    from edge_node.downlink import EdgeDownlink

log = logging.getLogger("edge")


class EdgeNode:
    def __init__(
        self,
        bs_address: str,
        device_id: int,
        *,
        threads: int = 1,
        key: KeyPair | None = None,
        state_dir: Path | None = None,
    ):
        """key: this device's provisioned key pair (`--key`), needed when the BS seals frames. state_dir: where the
        edge keeps its error feedback across a crash (edge_node.state); None: nowhere."""
        self.state_file = state_path(state_dir, device_id) if state_dir is not None else None
        self.bs_address = bs_address
        self.device_id = device_id
        self.threads = threads
        self.key = key
        self.stopping = False
        self.client = BsClient(bs_address, device_id, stopping=lambda: self.stopping, key=key)
        self.run_id: str | None = None
        self.rounds: EdgeRounds | None = None
        self.tx: UplinkTransmitter | None = None
        self.downlink: EdgeDownlink | None = None

    def run(self) -> int:
        log.info("edge %d: connecting to BS at %s", self.device_id, self.bs_address)
        try:
            while not self.stopping:
                welcome = self.client.register()
                if welcome is None:
                    break
                self._setup(welcome)
                if self._serve() != "reregister":
                    break
        finally:
            if self.downlink is not None:
                self.downlink.close()
            if self.tx is not None:
                self.tx.close()
            self.client.bye("stopped" if self.stopping else "shutdown")
            self.client.close()
        return 0

    def _setup(self, welcome: Welcome) -> None:
        """A new run: its configuration, this device's data and model, the uplink. The same run again (after a
        re-registration): nothing to load."""
        if welcome.run_id == self.run_id and self.rounds is not None:
            self.rounds.encode = self._frame_encoder(welcome, self.rounds.bench)  # a new registration: a new key
            self.client.heartbeat("ready")
            return
        where = f"welcome from BS {self.bs_address}"
        exp = validated(ExperimentConfig, welcome.experiment, f"{where}: experiment")
        bench = validated(BenchConfig, welcome.bench, f"{where}: bench")
        encode = self._frame_encoder(welcome, bench)
        t0 = time.perf_counter()
        data_address = reachable_address(welcome.data_address, self.bs_address)
        if self.downlink is not None:
            self.downlink.close()
            self.downlink = None
        if self.tx is not None:
            self.tx.close()
        key = self.key if bench.security.mode == "sealed" else None
        self.tx = open_uplink_transmitter(bench, self.device_id, data_address=data_address, seed=exp.seed, key=key)
        link: RoundLink = self.client
        if bench.downlink_over_phy:  # views and acks come over the air (edge_node.downlink; GNU Radio runs here)
            from edge_node.downlink import EdgeDownlink

            self.downlink = EdgeDownlink(
                exp, bench, self.device_id, self.tx, client=self.client, stopping=self._stopped
            )
            link = self.downlink
        try:
            self.rounds = EdgeRounds(
                exp, bench, self.device_id, self.tx, link=link, stopping=self._stopped, threads=self.threads
            )
        except ValueError as exc:  # the model or task cannot be had here (targets, device, a missing wheel)
            raise ConfigError(f"cannot set up the task and model {exp.model.name_or_path!r}: {exc}") from exc
        self.rounds.encode = encode
        if self.downlink is not None:
            self.rounds.receive_view = self.downlink.receive_view
        self._restore(welcome.run_id)
        self.rounds.on_held = lambda round_idx: self._save(welcome.run_id, round_idx)
        self.run_id = welcome.run_id
        labels = [ex.label for ex in self.rounds.examples]
        log.info(
            "edge %d: ready in %.1f s: %d local examples (label counts %s), %s PHY to %s",
            self.device_id,
            time.perf_counter() - t0,
            len(labels),
            {c: labels.count(c) for c in sorted(set(labels))},
            bench.phy,
            data_address,
        )
        self.client.heartbeat("ready")

    def _restore(self, run_id: str) -> None:
        """An edge started anew in a run it was part of: its error feedback as it was when it last sent."""
        if self.state_file is None or self.rounds is None:
            return
        saved = load_state(self.state_file, run_id=run_id, device_id=self.device_id)
        if saved is not None:
            self.rounds.sparsifier.load_state_dict(saved["sparsifier"])
            fb = self.rounds.sparsifier.feedback
            log.info(
                "edge %d: restored error feedback of round %d: residual norm %.6g, %d update(s) awaiting a verdict",
                self.device_id,
                saved["round"],
                fb.norm(),
                len(fb.pending),
            )

    def _save(self, run_id: str, round_idx: int) -> None:
        if self.state_file is not None and self.rounds is not None:
            save_state(
                self.state_file,
                run_id=run_id,
                device_id=self.device_id,
                round_idx=round_idx,
                sparsifier=self.rounds.sparsifier.state_dict(),
            )

    def _frame_encoder(self, welcome: Welcome, bench: BenchConfig) -> FrameEncoder:
        """How this registration's frames go on the air: sealed under the key agreed with the BS (trust.sealing),
        or in the clear on a bench with `security.mode: none`."""
        if bench.security.mode == "none":
            return plain_encoder
        if self.key is None:
            raise ConfigError(
                f"the BS at {self.bs_address} seals frames (security.mode: sealed): start this edge with "
                f"--key FILE, device {self.device_id}'s key file (fedlora-keys init, or the BS run folder's keys/)"
            )
        if welcome.frame_salt is None:
            raise ConfigError(f"the BS at {self.bs_address} seals frames but its welcome carries no frame_salt")
        key = frame_key(
            self.key.secret_bytes,
            self.key.bs_public_bytes,
            device_id=self.device_id,
            run_id=welcome.run_id,
            salt=bytes.fromhex(welcome.frame_salt),
        )
        return FrameSealer(key, self.device_id).seal

    def _serve(self) -> str:
        """Handle the BS's messages until it ends the run ("shutdown"), forgets us ("reregister"), or we stop."""
        assert self.rounds is not None
        heartbeat_s = self.rounds.exp.round.heartbeat_s
        while not self.stopping:
            got = self.client.recv(heartbeat_s)
            if got is None:
                self.client.heartbeat("idle")
                continue
            msg, attachment = got
            if isinstance(msg, Plan):
                report = self.rounds.run(msg, attachment)
                if report is not None:
                    self.client.send(report)
            elif isinstance(msg, Shutdown):
                log.info("edge %d: BS ends the run (%s)", self.device_id, msg.reason)
                return "shutdown"
            elif isinstance(msg, Welcome):
                self._setup(msg)
                heartbeat_s = self.rounds.exp.round.heartbeat_s
            elif isinstance(msg, Reject):  # the BS does not know us (it restarted): register again
                log.warning("edge %d: BS says %s", self.device_id, msg.reason)
                return "reregister"
            elif isinstance(msg, (Ack, ReportAck)):
                pass  # late answers to a round that is over
            else:
                log.warning("edge %d: unexpected %s message ignored", self.device_id, msg.type)
        return "stopped"

    def _stopped(self) -> bool:
        return self.stopping

    def stop(self, *_: Any) -> None:
        self.stopping = True


def install_signal_handlers(node: EdgeNode) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, node.stop)
