"""Closing a round: one record row per planned device, each complete update decoded and checked, the aggregate.

A device's update counts whenever every frame arrived, whatever became of its report; a bad update marks that
device `bad_update`, never the round. A device present but without a fresh update is averaged in with its latest
update (at most `round.stale_rounds` old) or is absent: how absence weighs is the aggregator's rule
(docs/aggregation.md), told each device's capability (the module its policy may give it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bs_node.live_view import LiveView
from bs_node.measurements import DeviceRound, apply_report
from bs_node.rounds.ports import RoundModel
from bs_node.rounds.state import Pending
from config import ExperimentConfig
from fedlora.clipping import ClipResult, clip_updates
from proto.control import AGGREGATED_WINDOW_ROUNDS, Plan
from proto.framing import Reassembler

if TYPE_CHECKING:  # pragma: no cover
    from fedlora.aggregation import ClientUpdate

log = logging.getLogger("bs")


class RoundCloser:
    """Turns what a round collected into record rows and one aggregation step; remembers updates for reuse."""

    def __init__(
        self,
        experiment: ExperimentConfig,
        model: RoundModel,
        reassembler: Reassembler,
        view: LiveView,
        capability: Callable[[int], tuple[int, int]] | None = None,
    ):
        self.exp = experiment
        # device -> (rank, depth) it is able to train (its policy's largest module); None: the whole adapter
        self.capability = capability or (lambda _device: (model.max_rank, model.num_layers))
        self.last_aggregation: dict[str, Any] = {}  # what the last step's aggregator measured
        self.model = model
        self.reassembler = reassembler
        self.view = view
        self.latest_updates: dict[int, tuple[int, ClientUpdate]] = {}  # device -> (round, update), for reuse
        self.rounds_participated: dict[int, int] = {}  # device -> rounds whose update it delivered
        # device -> the rounds (last AGGREGATED_WINDOW_ROUNDS) whose fresh update went into a step: each plan tells
        # the device, for its error feedback (proto.control.Plan.aggregated_rounds)
        self.aggregated: dict[int, list[int]] = {}
        # the clipping reference (median per-value RMS) of the last round that had enough fresh updates for one
        self.clip_reference_rms: float | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: cached updates for stale reuse, counters, the verdicts plans carry."""
        return {
            "latest_updates": dict(self.latest_updates),
            "rounds_participated": dict(self.rounds_participated),
            "aggregated": {d: list(rounds) for d, rounds in self.aggregated.items()},
            "clip_reference_rms": self.clip_reference_rms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latest_updates = dict(state["latest_updates"])
        self.rounds_participated = dict(state["rounds_participated"])
        self.aggregated = {d: list(rounds) for d, rounds in state["aggregated"].items()}
        self.clip_reference_rms = state.get("clip_reference_rms")  # absent from checkpoints before clipping

    def close(
        self, r: int, plans: dict[int, Plan], pending: dict[int, Pending]
    ) -> tuple[list[DeviceRound], dict[int, int]]:
        """Rows of every planned device and {device: round of its update reused}; the adapter has stepped."""
        fresh: dict[int, ClientUpdate] = {}  # device -> its update of this round
        devices: list[DeviceRound] = []
        for device_id, plan in sorted(plans.items()):
            p = pending.get(device_id)
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
                    self.rounds_participated[device_id] = self.rounds_participated.get(device_id, 0) + 1
            devices.append(row)
        self.reassembler.discard_round(r)
        stale = self._stale_updates(r, plans, fresh)
        updates = {**fresh, **{d: update for d, (_, update) in stale.items()}}
        self.last_aggregation = {}
        if updates:
            clip = self._clip(r, updates, set(fresh), devices)
            updates = clip.updates
            fresh = {d: updates[d] for d in fresh}  # what is aggregated is what is kept for reuse
            absent = [d for d in plans if d not in updates]
            rows = [row for row in devices if row.device_id in updates]
            stepped = self._step(r, updates, absent, rows, set(fresh))
            self.last_aggregation.update(clip.record())
            if not stepped:
                for d in stale:  # nor is a reused update tried again
                    del self.latest_updates[d]
                return devices, {}
        self.latest_updates.update({d: (r, update) for d, update in fresh.items()})
        self._note_aggregated(r, fresh)
        return devices, {d: made for d, (made, _) in stale.items()}

    def _note_aggregated(self, r: int, fresh: dict[int, ClientUpdate]) -> None:
        """Remember that round r's fresh updates stepped the adapter, forgetting what no plan can ask about."""
        for d in fresh:
            self.aggregated.setdefault(d, []).append(r)
        oldest = r + 1 - AGGREGATED_WINDOW_ROUNDS  # the next plan is for round r + 1 at the earliest
        for d, rounds in list(self.aggregated.items()):
            self.aggregated[d] = [x for x in rounds if x >= oldest]

    def aggregated_rounds(self, device_id: int, round_idx: int) -> list[int]:
        """For the plan of `round_idx`: the rounds of its window whose update of `device_id` was aggregated (a
        stale reuse adds nothing: that update was aggregated when it arrived)."""
        first = round_idx - AGGREGATED_WINDOW_ROUNDS
        return [x for x in self.aggregated.get(device_id, []) if first <= x < round_idx]

    def _clip(self, r: int, updates: dict[int, ClientUpdate], fresh: set[int], rows: list[DeviceRound]) -> ClipResult:
        """Bound every update's norm (fedlora/clipping.py); each fresh update's row gets its norm and whether it
        was clipped, and a clipped one a line in the live view."""
        cfg = self.exp.round
        clip = clip_updates(
            updates, fresh, multiple=cfg.clip_multiple, clip_norm=cfg.clip_norm, carried_rms=self.clip_reference_rms
        )
        if clip.reference_from_round:
            self.clip_reference_rms = clip.reference_rms
        for row in rows:
            d = row.device_id
            if d in fresh:
                row.update_norm, row.clipped = clip.norms[d], d in clip.clipped
                if row.clipped:
                    self.view.line(
                        f"round {r}: edge {d}'s update clipped, norm {clip.norms[d]:.3g} > {clip.bounds[d]:.3g}"
                    )
        return clip

    def _step(
        self,
        r: int,
        updates: dict[int, ClientUpdate],
        absent: list[int],
        rows: list[DeviceRound],
        fresh_devices: set[int],
    ) -> bool:
        """Aggregate and step the adapter. The last line of defence behind the per-update checks: if that still
        fails, the round closes without a step, the error goes to the log and the rows of the devices whose update
        was in it, and the run goes on; no update of the round is kept for reuse."""
        try:
            capabilities = {d: self.capability(d) for d in [*updates, *absent]}
            self.last_aggregation = self.model.aggregate(updates, absent, capabilities)
            stale = set(updates) - fresh_devices
            if stale and "tail_share" in self.last_aggregation:  # a reused update says nothing new about its rank
                shares = self.last_aggregation["tail_share"]
                self.last_aggregation["tail_share"] = {d: x for d, x in shares.items() if d not in stale}
        except Exception as exc:  # whatever it is, one round's step is not worth the run
            error = f"aggregation failed, the adapter did not step: {' '.join(str(exc).split())}"
            log.exception("round %d: %s", r, error)
            self.view.line(f"round {r}: {error}")
            for row in rows:
                row.error = f"{row.error}; {error}" if row.error else error
            self.last_aggregation = {"refused": error}
            return False
        return True

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
        row.status = p.report.status
        row.error = p.report.error
        problems = apply_report(row, p.report.measurements, self.model.max_update_bytes(p.plan.rank, p.plan.depth))
        if problems:
            log.warning("edge %d report for round %d: bad measurements ignored: %s", row.device_id, r, problems)

    def _stale_updates(
        self, r: int, plans: dict[int, Plan], arrived: dict[int, ClientUpdate]
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
        try:
            payload = self.reassembler.pop(row.device_id, r)
            update = self.model.decode_update(
                payload, rank=p.plan.rank, depth=p.plan.depth, round_idx=r, device_id=row.device_id
            )
        except (ValueError, KeyError) as exc:  # CodecError, FrameError, UpdateError: the device's failure
            row.status, row.error = "bad_update", " ".join(str(exc).split())
            self.view.line(f"round {r}: edge {row.device_id} sent a bad update: {row.error}")
            return None
        if p.report is None:
            row.error = f"update received complete, but no report ({row.error}); measurements missing"
            self.view.line(f"round {r}: edge {row.device_id}: {row.error}")
        row.status = "ok"
        return update
