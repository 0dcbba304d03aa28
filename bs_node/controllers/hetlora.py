"""HetLoRA (Cho et al., 2024) as a policy: heterogeneous ranks by resources, every device every round, and
rank self-pruning. Run it with `round.aggregator: hetlora` (zero-padding, norm-weighted averaging).

Self-pruning: the HetLoRA aggregator records, for each update, the share of its trained factors' norm in the
last half of its rank components (`tail_share`). When that share is below `controller.hetlora_prune_share`, the
device's magnitude sits in its first components and the tail is not worth its bytes: its rank steps down to the
next smaller of `controller.ranks` for the rounds after (never below the smallest). In the paper the client
prunes itself; here the BS sees the same numbers in the update and decides, so the edge stays policy-free.
"""

from __future__ import annotations

from bs_node.controllers.ranked import RankedController
from bs_node.measurements import RoundRecord


class HetLoraController(RankedController):
    name = "hetlora"

    def observe(self, record: RoundRecord) -> None:
        super().observe(record)
        shares = record.aggregation.get("tail_share", {})
        ranks = sorted(set(self.cfg.ranks))
        for device_id, share in shares.items():
            rank = self.offline_rank.get(device_id)
            if rank is None or share >= self.cfg.hetlora_prune_share:
                continue
            smaller = [r for r in ranks if r < rank]
            if smaller:
                self.offline_rank[device_id] = smaller[-1]
