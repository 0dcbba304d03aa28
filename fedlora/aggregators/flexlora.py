"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", 2024): average the full products, then SVD back to the ranks.

Per module, the participants' trained products B_k A_k (each of its own rank) are averaged with weights p_k, and
the average is factored by a truncated SVD to the global rank R: B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T. The
adapter is then stored in singular-value order, so the rank-r view a device gets next round is the best rank-r
approximation: FlexLoRA's "SVD back to each device's rank". The product average is exact; what the truncation to
R drops is measured (`truncation_error`: the dropped share of the Frobenius norm, worst module) and recorded.
As published it averages over the round's participants only. Layers outside a device's depth are not its.

The factors are re-made every round, so an edge's error-feedback residual (in the coordinates of the view it
trained) means nothing after the step: this aggregator takes updates without it (`keeps_coordinates`; the
config rejects `codec.error_feedback` with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.aggregation import Absent, ClientUpdate, check_all, head_average
from fedlora.aggregators.base import Aggregator
from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import AdapterState, GlobalAdapter


class FlexLoraAggregator(Aggregator):
    name = "flexlora"
    rule_name = "participants"  # as published: the round's participants only
    keeps_coordinates = False

    def aggregate(
        self, adapter: GlobalAdapter, updates: Sequence[ClientUpdate], absent: Sequence[Absent]
    ) -> AdapterState:
        check_all(adapter, updates, absent)
        state = adapter.state
        R = adapter.max_rank
        out: AdapterState = {k: torch.zeros_like(v) for k, v in state.items()}
        worst = 0.0
        for path in sorted({k[: -len(_A)] for k in state if k.endswith(_A)}):
            a_key, b_key = path + _A, path + _B
            g_a, g_b = state[a_key].to(torch.float64), state[b_key].to(torch.float64)
            product = torch.zeros(g_b.shape[0], g_a.shape[1], dtype=torch.float64)
            total = 0.0
            for u in updates:
                if a_key not in u.delta:
                    continue
                r, w = u.spec.rank, float(u.weight)
                b = g_b[:, :r] + u.delta[b_key].to(torch.float64)
                a = g_a[:r] + u.delta[a_key].to(torch.float64)
                product += w * (b @ a)
                total += w
            if total == 0:
                continue
            new_b, new_a, dropped = factor(product / total, R)
            worst = max(worst, dropped)
            out[a_key] = (new_a - g_a).to(state[a_key].dtype)
            out[b_key] = (new_b - g_b).to(state[b_key].dtype)
        out.update(head_average(adapter, updates))
        self.last_stats = {"truncation_error": worst}
        return out


def factor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, dropped share of the Frobenius norm) of the best rank-`rank` approximation B @ A of `product`,
    components in singular-value order with the singular values split evenly between the factors."""
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(product.shape[0], rank, dtype=product.dtype)
    a = torch.zeros(rank, product.shape[1], dtype=product.dtype)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    norm = float(s.pow(2).sum())
    dropped = float(s[k:].pow(2).sum()) / norm if norm > 0 else 0.0
    return b, a, dropped**0.5
