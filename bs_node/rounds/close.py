"""Closing a round: one record row per planned device, each complete update decoded and checked, the aggregate.

A device's update counts whenever every frame arrived, whatever became of its report; a bad update marks that
device `bad_update`, never the round. Devices present but without a fresh update are either averaged in with
their latest update (at most `round.stale_rounds` old) or counted as zero updates (`round.absent_as_zero`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bs_node.live_view import LiveView
from bs_node.measurements import DeviceRound, apply_report
from bs_node.rounds.ports import RoundModel
from bs_node.rounds.state import Pending
from config import ExperimentConfig
from proto.codec import CodecError
from proto.control import Plan
from proto.framing import FrameError, Reassembler

if TYPE_CHECKING:  # pragma: no cover
    from fedlora.aggregation import ClientUpdate

log = logging.getLogger("bs")


class RoundCloser:
    """Turns what a round collected into record rows and one aggregation step; remembers updates for reuse."""

    def __init__(self, experiment: ExperimentConfig, model: RoundModel, reassembler: Reassembler, view: LiveView):
        self.exp = experiment
        self.model = model
        self.reassembler = reassembler
        self.view = view
        self.latest_updates: dict[int, tuple[int, ClientUpdate]] = {}  # device -> (round, update), for reuse
        self.rounds_participated: dict[int, int] = {}  # device -> rounds whose update it delivered

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
        self.latest_updates.update({d: (r, update) for d, update in fresh.items()})
        updates = list(fresh.values()) + [update for _, update in stale.values()]
        if updates:
            absent = [d for d in plans if d not in fresh and d not in stale]
            absent_weight = sum(float(self.model.examples(d)) for d in absent) if self.exp.round.absent_as_zero else 0.0
            self.model.aggregate(updates, absent_weight)
        return devices, {d: made for d, (made, _) in stale.items()}

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
        problems = apply_report(row, p.report.measurements)
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
        except (CodecError, FrameError, KeyError) as exc:
            row.status, row.error = "bad_update", str(exc)
            self.view.line(f"round {r}: edge {row.device_id} sent a bad update: {exc}")
            return None
        if p.report is None:
            row.error = f"update received complete, but no report ({row.error}); measurements missing"
            self.view.line(f"round {r}: edge {row.device_id}: {row.error}")
        row.status = "ok"
        return update
