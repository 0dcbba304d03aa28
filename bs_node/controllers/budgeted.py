"""Fixed settings with participation sized to the energy budget: the baseline that keeps the budgets.

The fixed policy's module, power, modulation and keep fraction; a device takes part in a round only when what
it has measurably spent so far plus what its last round cost fits its cumulative allowance, Ē_k times the rounds
it has been present (this one included). Its first round is a probe (nothing measured yet). The band is shared
equally among the devices that take part. The fixed policy spends several budgets a round; this is its
budget-keeping counterpart, so the proposed policy can also be compared at equal energy.
"""

from __future__ import annotations

from dataclasses import replace

from bs_node.controllers.base import DevicePlan, RoundState
from bs_node.controllers.fixed import FixedController
from bs_node.measurements import RoundRecord
from config import BenchConfig, ExperimentConfig


class BudgetedController(FixedController):
    name = "budgeted"

    def __init__(self, experiment: ExperimentConfig, bench: BenchConfig):
        super().__init__(experiment, bench)
        self.spent_j: dict[int, float] = {}  # measured, over the run
        self.last_cost_j: dict[int, float] = {}  # what the device's latest round in it cost
        self.rounds_present: dict[int, int] = {}

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        plans = super().decide(state)
        taking_part = []
        for d in state.devices:
            k = d.device_id
            self.rounds_present[k] = self.rounds_present.get(k, 0) + 1
            budget = self.bench.device(k).energy_budget_j
            cost = self.last_cost_j.get(k)
            if budget is None or cost is None or self.spent_j.get(k, 0.0) + cost <= budget * self.rounds_present[k]:
                taking_part.append(k)
        share_hz = state.total_bandwidth_hz / max(1, len(taking_part))
        return {
            k: replace(p, participate=k in taking_part, bandwidth_hz=share_hz if k in taking_part else 0.0)
            for k, p in plans.items()
        }

    def observe(self, record: RoundRecord) -> None:
        for row in record.devices:
            self.spent_j[row.device_id] = self.spent_j.get(row.device_id, 0.0) + row.energy_j
            if row.participated and row.energy_j > 0:
                self.last_cost_j[row.device_id] = row.energy_j

    def explain(self) -> dict:
        return {
            "spent_j": {k: round(v, 1) for k, v in self.spent_j.items()},
            "last_cost_j": {k: round(v, 1) for k, v in self.last_cost_j.items()},
        }
