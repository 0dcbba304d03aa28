"""A test-only insider: the real `fedlora-edge`, except that every update it sends is multiplied by a factor (one
per round, the last repeated) and encoded in fp32, as a provisioned device that wants to wreck the model would.

    python -m tests.scaled_edge 1e30,1e3 --bs ADDRESS --device-id K --key FILE

It trains honestly and keeps its own state (error feedback) as the real edge does: only the bytes on the air lie.
Nothing of it is in the product; tests/test_robust_aggregation.py starts it beside real edges.
"""

from __future__ import annotations

import sys
from typing import Any

import edge_node.round as edge_round
from edge_node.main import main


def install(scales: list[float]) -> None:
    """Wrap the edge round's encoder: the update's tensors times this round's factor, in fp32."""
    real = edge_round.encode_update

    def scaled(state: dict[str, Any], *, round_idx: int, dtype: str = "fp16", **kwargs: Any) -> bytes:
        factor = scales[min(round_idx, len(scales)) - 1]
        return real({k: v * factor for k, v in state.items()}, round_idx=round_idx, dtype="fp32", **kwargs)

    edge_round.encode_update = scaled


if __name__ == "__main__":
    install([float(x) for x in sys.argv[1].split(",")])
    sys.exit(main(sys.argv[2:]))
