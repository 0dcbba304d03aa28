"""Controller policies, one per file, chosen by name in the experiment config (`controller.policy`)."""

from __future__ import annotations

from bs_node.controllers.base import Controller, DevicePlan, DeviceState, RoundState
from bs_node.controllers.budgeted import BudgetedController
from bs_node.controllers.fixed import FixedController
from bs_node.controllers.flexlora import FlexLoraController
from bs_node.controllers.greedy import GreedyController
from bs_node.controllers.hetlora import HetLoraController
from bs_node.controllers.lyapunov import LyapunovController
from bs_node.controllers.random_policy import RandomController
from bs_node.controllers.tsfa import TsfaController
from config import BenchConfig, ConfigError, ExperimentConfig

POLICIES: dict[str, type[Controller]] = {
    cls.name: cls
    for cls in (
        FixedController,
        LyapunovController,
        TsfaController,
        GreedyController,
        RandomController,
        HetLoraController,
        FlexLoraController,
        BudgetedController,
    )
}


def make_controller(experiment: ExperimentConfig, bench: BenchConfig) -> Controller:
    try:
        cls = POLICIES[experiment.controller.policy]
    except KeyError:
        raise ConfigError(
            f"controller.policy: unknown policy {experiment.controller.policy!r}; known: {sorted(POLICIES)}"
        ) from None
    return cls(experiment, bench)


__all__ = ["Controller", "DevicePlan", "DeviceState", "RoundState", "POLICIES", "make_controller"]
