"""What the controller is told at the start of a round: the ready devices and the model and radio it plans for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bs_node.controllers import DeviceState, RoundState
from bs_node.rounds.ports import EdgeInfo, RoundModel
from config import BenchConfig, ExperimentConfig


def round_state(
    r: int,
    ready: Sequence[EdgeInfo],
    bench: BenchConfig,
    experiment: ExperimentConfig,
    model: RoundModel,
    rounds_participated: Mapping[int, int],
) -> RoundState:
    """The controller's view of round r: each ready device with its profile and how often it took part, the
    radio's limits, the model's shape and each device's weight (its examples)."""
    return RoundState(
        round_idx=r,
        devices=tuple(
            DeviceState(e.device_id, bench.device(e.device_id), rounds_participated.get(e.device_id, 0)) for e in ready
        ),
        total_bandwidth_hz=bench.radio.total_bandwidth_hz,
        max_tx_power_dbm=bench.radio.max_tx_power_dbm,
        min_tx_power_dbm=bench.radio.min_tx_power_dbm,
        max_rank=model.max_rank,
        num_layers=model.num_layers,
        local_steps=experiment.training.local_steps,
        model_shape=model.model_shape,
        device_weights={e.device_id: float(model.examples(e.device_id)) for e in ready},
    )
