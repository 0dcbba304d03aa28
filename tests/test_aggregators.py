"""The aggregators: FlexLoRA's product average and SVD back to rank, HetLoRA's zero-padding with norm weights,
and for each how the edge's sent part and residual map onto what the step uses (sent + residual = delta)."""

from __future__ import annotations

import pytest
import torch

from config import ConfigError, load_experiment
from fedlora.aggregation import ClientUpdate
from fedlora.aggregators import AGGREGATORS, make_aggregator
from fedlora.aggregators.flexlora import factor
from fedlora.aggregators.hetlora import tail_share
from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import GlobalAdapter, ModuleSpec, module_keys
from fedlora.models import ModelConfig, build_backbone
from fedlora.sparsify import make_sparsifier

TINY = ModelConfig(name_or_path="tiny", max_rank=8)
Q1 = "bert.encoder.layer.1.attention.self.query"


def fresh() -> GlobalAdapter:
    g = GlobalAdapter(build_backbone(TINY, 2, seed=0), TINY, seed=0)
    gen = torch.Generator().manual_seed(7)
    for k in g.state:  # B starts at zero in LoRA; give it something so products are not trivially zero
        g.state[k] = g.state[k] + 0.1 * torch.randn(g.state[k].shape, generator=gen)
    return g


def delta(g: GlobalAdapter, spec: ModuleSpec, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in g.view(spec).items()}


def product(state, path, rank=None):
    a, b = state[path + _A], state[path + _B]
    return (b[:, :rank] @ a[:rank]).double() if rank else (b @ a).double()


def test_flexlora_steps_to_the_average_product_exactly_when_it_fits_the_rank():
    g = fresh()
    spec = ModuleSpec(4, 2)  # two rank-4 devices: the average has rank <= 8 = R, so nothing is truncated
    ups = [ClientUpdate(spec, delta(g, spec, s), w) for s, w in ((1, 1.0), (2, 3.0))]
    trained = [product({k: g.view(spec)[k] + u.delta[k] for k in u.delta}, Q1) for u in ups]
    agg = make_aggregator("flexlora")
    g.apply(agg.aggregate(g, ups, []))
    torch.testing.assert_close(product(g.state, Q1), (trained[0] + 3 * trained[1]) / 4, atol=1e-5, rtol=1e-4)
    assert agg.last_stats["truncation_error"] < 1e-6
    # separate averaging of A and B, on the same updates, is not the average product (the issue's ~27 % error)
    g2 = fresh()
    g2.apply(make_aggregator("fedavg").aggregate(g2, ups, []))
    target = (trained[0] + 3 * trained[1]) / 4
    separate = float(torch.linalg.matrix_norm(product(g2.state, Q1) - target) / torch.linalg.matrix_norm(target))
    assert separate > 0.01


def test_flexlora_truncates_to_the_best_rank_r_and_stores_components_in_singular_value_order():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    b, a, dropped = factor(m, 8)
    u, s, vh = torch.linalg.svd(m)
    torch.testing.assert_close(b @ a, (u[:, :8] * s[:8]) @ vh[:8])  # Eckart-Young: the best rank-8 approximation
    assert dropped == pytest.approx(float((s[8:] ** 2).sum() / (s**2).sum()) ** 0.5)
    for r in (1, 3, 5):  # a rank-r view of the stored factors is the best rank-r approximation: SVD back to r
        torch.testing.assert_close(b[:, :r] @ a[:r], (u[:, :r] * s[:r]) @ vh[:r])


def test_hetlora_zero_pads_and_weighs_by_the_norm_of_the_trained_product():
    g = fresh()
    big, small = ModuleSpec(8, 2), ModuleSpec(2, 2)
    ups = [ClientUpdate(big, delta(g, big, 1), 1.0), ClientUpdate(small, delta(g, small, 2), 2.0)]
    before = {k: v.clone() for k, v in g.state.items()}
    g.apply(make_aggregator("hetlora").aggregate(g, ups, []))
    a_key = Q1 + _A
    trained = [before[a_key][: u.spec.rank] + u.delta[a_key] for u in ups]
    norms = [
        float(torch.linalg.matrix_norm((before[Q1 + _B][:, : u.spec.rank] + u.delta[Q1 + _B]).double() @ t.double()))
        for u, t in zip(ups, trained)
    ]
    w = [1.0 * norms[0], 2.0 * norms[1]]
    torch.testing.assert_close(g.state[a_key][:2], (w[0] * trained[0][:2] + w[1] * trained[1]) / sum(w))
    # components 2..7: the rank-2 device's zero padding pulls them towards zero
    torch.testing.assert_close(g.state[a_key][2:], w[0] * trained[0][2:] / sum(w))


def test_tail_share_is_the_norm_share_of_the_last_half_of_the_components():
    g = fresh()
    spec = ModuleSpec(4, 2)
    d = {k: -v for k, v in g.view(spec).items()}  # trained = 0 everywhere ...
    for k in d:
        if k.endswith(_A):
            d[k][0] += 1.0  # ... but component 0 of A
        elif k.endswith(_B):
            d[k][:, 0] += 1.0
    assert tail_share(g, ClientUpdate(spec, d, 1.0)) == 0.0
    for k in d:
        if k.endswith(_A):
            d[k][3] += 1.0
        elif k.endswith(_B):
            d[k][:, 3] += 1.0
    assert tail_share(g, ClientUpdate(spec, d, 1.0)) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["fedavg", "hetlora"])
def test_sent_plus_residual_is_the_delta_in_the_coordinates_the_step_uses(name):
    """fedavg and hetlora keep component i of a device's view as component i of the adapter, so the edge's
    residual (what its sparsifier kept back) stays in the coordinates the step used: for one device able to
    train the whole adapter, step + residual = delta on every component."""
    g = fresh()
    spec = ModuleSpec(8, 2)
    d = delta(g, spec, 5)
    trained = {k: g.view(spec)[k] + d[k] for k in d}
    sparsifier = make_sparsifier("topk", dtype="fp32", error_feedback=True)
    sent = sparsifier.sparsify(d, trained, spec, keep_fraction=0.25, round_idx=1)
    assert sent.kept is not None and all(int(m.sum()) == 2 for m in sent.kept.values())
    step = AGGREGATORS[name]().aggregate(g, [ClientUpdate(spec, sent.delta, 1.0, sent.kept)], [])
    residual = sparsifier.feedback.residual
    for k in module_keys(d):
        for key in (k + _A, k + _B):
            torch.testing.assert_close(step[key] + residual[key], d[key], atol=1e-6, rtol=1e-5)


def test_flexlora_refuses_error_feedback_whose_residuals_would_not_carry_over():
    with pytest.raises(ConfigError, match="round.aggregator = 'flexlora'.*codec.error_feedback=false"):
        load_experiment(None, ["round.aggregator=flexlora"])
    load_experiment(None, ["round.aggregator=flexlora", "codec.error_feedback=false"])
    with pytest.raises(ConfigError, match="round.stale_rounds=0"):  # a stale delta belongs to an older basis
        load_experiment(None, ["round.aggregator=flexlora", "codec.error_feedback=false", "round.stale_rounds=2"])
    with pytest.raises(ConfigError, match="round.aggregation_rule = 'sent': applies to the fedavg aggregator only"):
        load_experiment(None, ["round.aggregator=hetlora", "round.aggregation_rule=sent"])
