"""TSFA-style two-stage policy: the rank is fixed offline; sparsity and bandwidth are chosen online.

Stage one (offline): one LoRA module for every device, `controller.rank` (default: the global rank) on all
layers, at max power and the configured modulation. Stage two (online, per round): each device's keep
fraction and bandwidth share by drift-plus-penalty under the long-term latency budget only: the same
solver as the proposed policy with those choices pinned and no energy queues.
"""

from __future__ import annotations

import numpy as np

from bs_node.controllers.base import RoundState
from bs_node.controllers.lyapunov import LyapunovController


class TsfaController(LyapunovController):
    name = "tsfa"
    uses_energy_queues = False

    def choices(self, state: RoundState) -> tuple[list[tuple[int, int]], list[str], list[float], np.ndarray]:
        cfg = self.cfg
        rank = min(cfg.rank or state.max_rank, state.max_rank)
        return (
            [(rank, state.num_layers)],
            [cfg.modulation],
            self.keep_fractions(),
            np.array([self.bench.radio.max_tx_power_dbm]),
        )
