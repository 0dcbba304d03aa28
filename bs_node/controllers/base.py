"""The controller interface: every policy decides a round's plan and then observes what was measured.

Shaped like a federated-learning strategy (Flower's `configure_fit` / `aggregate_fit`): `decide` is called
before a round with the state the BS knows, `observe` after it with the measurements. Policies never talk to
sockets or radios, so the same policy runs on every PHY.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from bs_node.controllers.costs import ModelShape
from bs_node.measurements import RoundRecord
from config import BenchConfig, DeviceProfile, ExperimentConfig
from proto.control import Plan


@dataclass(frozen=True)
class DevicePlan:
    """What one device does this round."""

    device_id: int
    participate: bool
    rank: int
    depth: int
    tx_power_dbm: float
    bandwidth_hz: float
    modulation: str
    keep_fraction: float  # share of rank components sent (1.0 = dense)
    local_steps: int

    def to_plan(self, round_idx: int, deadline_s: float) -> Plan:
        """The wire message of this plan: the one place a policy's output becomes a typed, checked `Plan`
        (a policy that plans an unknown modulation or a numpy number fails here, before anything is sent)."""
        return Plan(
            round=round_idx,
            deadline_s=deadline_s,
            participate=self.participate,
            rank=self.rank,
            depth=self.depth,
            tx_power_dbm=self.tx_power_dbm,
            bandwidth_hz=self.bandwidth_hz,
            modulation=self.modulation,  # type: ignore[arg-type]  # checked against proto.numerology.Modulation
            keep_fraction=self.keep_fraction,
            local_steps=self.local_steps,
        )


@dataclass(frozen=True)
class DeviceState:
    device_id: int
    profile: DeviceProfile
    rounds_participated: int = 0


@dataclass(frozen=True)
class RoundState:
    """What the BS knows before a round: who is ready, and the resources to share."""

    round_idx: int
    devices: tuple[DeviceState, ...]
    total_bandwidth_hz: float
    max_tx_power_dbm: float
    min_tx_power_dbm: float
    max_rank: int
    num_layers: int
    local_steps: int
    model_shape: ModelShape | None = None  # what an update's size depends on
    device_weights: dict[int, float] = field(default_factory=dict)  # training examples per device


class Controller(ABC):
    """A policy: `decide(state) -> {device_id: DevicePlan}`, then `observe(record)`."""

    name: str = "abstract"

    def __init__(self, experiment: ExperimentConfig, bench: BenchConfig):
        self.experiment = experiment
        self.bench = bench

    @abstractmethod
    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        """Plan the round for every device in `state.devices` (a device left out does not take part)."""

    def capability(self, device_id: int, max_rank: int, num_layers: int) -> tuple[int, int]:
        """(rank, depth) of the largest module this policy may give the device: what the aggregation rule counts
        its absence against (docs/aggregation.md). Default: the whole adapter."""
        return max_rank, num_layers

    def observe(self, record: RoundRecord) -> None:
        """Learn from what the round measured (link SNR, losses, energy). Stateless policies ignore it."""

    def explain(self) -> dict:
        """The controller's inputs and internal state (estimates, queues), written into the round record."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything the policy learned (queues, estimates, its random generator), for the BS's checkpoint:
        its attributes, deep-copied. A policy whose state is not plain Python, numpy or torch overrides both."""
        return copy.deepcopy(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a controller of the same policy and configuration."""
        missing = set(vars(self)) - set(state)
        if missing:
            raise ValueError(f"controller state of {self.name}: missing {sorted(missing)}")
        vars(self).update(copy.deepcopy(state))
