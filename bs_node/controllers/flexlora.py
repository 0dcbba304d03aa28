"""FlexLoRA (Bai et al., 2024) as a policy: heterogeneous ranks by resources, every device every round. Run it
with `round.aggregator: flexlora` (product average, SVD back to each rank) and `codec.error_feedback: false`."""

from __future__ import annotations

from bs_node.controllers.ranked import RankedController


class FlexLoraController(RankedController):
    name = "flexlora"
