"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", 2024):
zero-padding aggregation with sparsity (norm) weighting.

Each participant's trained LoRA factors, zero-padded to the global rank, are averaged with weights p_k * n_k,
where n_k is the Frobenius norm of the device's trained product B_k A_k on that module ("sparsity-weighted":
a device whose adapter carries more goes further). Padding makes a rank-r device pull components i >= r towards
zero, so the high-rank tail shrinks unless the devices able to train it keep it up: HetLoRA's regulariser.
As published it averages over the round's participants only; absent devices do not count. Layers outside a
device's depth are not its (this testbed's depth has no counterpart in the paper). An unsent component of a
sparsified update keeps the view's value (a zero delta), it is not padded away.

Rank self-pruning is the policy's half (bs_node/controllers/hetlora.py): this step records each update's
tail share (the norm share of its last half of components) for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.aggregation import Absent, ClientUpdate, check_all, head_average
from fedlora.aggregators.base import Aggregator
from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import AdapterState, GlobalAdapter, layer_index


class HetLoraAggregator(Aggregator):
    name = "hetlora"
    rule_name = "participants"  # as published: the round's participants only

    def aggregate(
        self, adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent]
    ) -> AdapterState:
        check_all(adapter, updates, absent)
        state = adapter.state
        out: AdapterState = {k: torch.zeros_like(v) for k, v in state.items()}
        tails: list[float] = []
        paths = sorted({k[: -len(_A)] for k in state if k.endswith(_A)})
        for path in paths:
            a_key, b_key = path + _A, path + _B
            g_a, g_b = state[a_key].to(torch.float64), state[b_key].to(torch.float64)
            num_a, num_b = torch.zeros_like(g_a), torch.zeros_like(g_b)
            total = 0.0
            for u in updates:
                if a_key not in u.delta:
                    continue  # outside this device's depth
                r = u.spec.rank
                a = g_a[:r] + u.delta[a_key].to(torch.float64)
                b = g_b[:, :r] + u.delta[b_key].to(torch.float64)
                w = float(u.weight) * float(torch.linalg.matrix_norm(b @ a))
                num_a[:r] += w * a
                num_b[:, :r] += w * b
                total += w
            if total > 0:
                out[a_key] = (num_a / total - g_a).to(state[a_key].dtype)
                out[b_key] = (num_b / total - g_b).to(state[b_key].dtype)
        out.update(head_average(adapter, updates))
        for u in updates:
            tails.append(tail_share(adapter, u))
        self.last_stats = {"tail_shares": tails}
        return out


def tail_share(adapter: GlobalAdapter, u: ClientUpdate) -> float:
    """Share of the squared norm of the device's trained factors (B columns times A rows, summed over modules)
    that sits in the last half of its rank components: HetLoRA prunes the rank when it is small."""
    r = u.spec.rank
    if r < 2:
        return 1.0
    energy = torch.zeros(r, dtype=torch.float64)
    for k, d in u.delta.items():
        if k.endswith(_A) and layer_index(k) is not None:
            path = k[: -len(_A)]
            a = adapter.state[k][:r].to(torch.float64) + d.to(torch.float64)
            b = adapter.state[path + _B][:, :r].to(torch.float64) + u.delta[path + _B].to(torch.float64)
            energy += a.pow(2).sum(dim=1) * b.pow(2).sum(dim=0)
    total = float(energy.sum())
    return float(energy[r - r // 2 :].sum()) / total if total > 0 else 0.0
