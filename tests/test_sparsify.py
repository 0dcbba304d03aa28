"""Update sparsifiers (SOFT and baselines): scores, selection, error feedback, regulariser, codec round trip."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import ClientUpdate, aggregate
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
from fedlora.models import ModelConfig, build_backbone, load_tokenizer
from fedlora.sparsify import (
    MAX_PENDING_UPDATES,
    BOnlySparsifier,
    ErrorFeedback,
    SoftSparsifier,
    SparseUpdate,
    component_scores,
    freeze_a,
    make_sparsifier,
    n_keep,
    orthogonality_penalty,
    update_scores,
)
from fedlora.sparsify.soft import lora_factors
from fedlora.tasks import Example
from fedlora.training import TrainConfig, train_local
from proto.codec import decode_update, encode_update, expected_shapes

TINY = ModelConfig(name_or_path="tiny", max_rank=8)
IN, OUT, R = 16, 12, 8
HEAD_W, HEAD_B = "head.classifier.weight", "head.classifier.bias"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(TINY, 2, seed=0)


@pytest.fixture(scope="module")
def adapter(backbone):
    return GlobalAdapter(backbone, TINY, seed=0)


# ----------------------------------------------------------------------------------------------- helpers
def path(layer: int, mod: str = "query") -> str:
    return f"bert.encoder.layer.{layer}.attention.self.{mod}"


def make_delta(spec: ModuleSpec, seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    """A synthetic delta laid out like view(spec) of a `layers`-layer model: top `depth` layers + head."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers - spec.depth, layers):
        for mod in ("query", "value"):
            out[path(layer, mod) + ".lora_A"] = torch.randn(spec.rank, IN, generator=g)
            out[path(layer, mod) + ".lora_B"] = torch.randn(OUT, spec.rank, generator=g)
    out[HEAD_W] = torch.randn(2, OUT, generator=g)
    out[HEAD_B] = torch.randn(2, generator=g)
    return out


def orthogonal_factors(sig_b: torch.Tensor, sig_a: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, IN) with orthogonal rows of norms sig_a, B (OUT, r) with orthogonal columns of norms sig_b."""
    g = torch.Generator().manual_seed(seed)
    r = len(sig_a)
    qa, _ = torch.linalg.qr(torch.randn(IN, r, generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(OUT, r, generator=g, dtype=torch.float64))
    return (qa.T * sig_a[:, None].double()).float(), (qb * sig_b[None, :].double()).float()


def embed(state: dict[str, torch.Tensor], total: dict[str, torch.Tensor]) -> None:
    """Add a view-shaped tensor into full-rank (R) global coordinates."""
    for k, v in state.items():
        if k.endswith(".lora_A"):
            total.setdefault(k, torch.zeros(R, IN, dtype=torch.float64))[: v.shape[0]] += v.double()
        elif k.endswith(".lora_B"):
            total.setdefault(k, torch.zeros(OUT, R, dtype=torch.float64))[:, : v.shape[1]] += v.double()


def trained_from(delta, seed=99):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in delta.items()}


# ----------------------------------------------------------------------------------------------- SOFT score
def test_soft_score_is_the_singular_values_of_BA_for_orthogonal_factors():
    sig_a = torch.tensor([0.3, 2.0, 1.1, 0.7, 1.6, 0.9, 0.2, 1.3])
    sig_b = torch.tensor([1.5, 0.4, 0.8, 2.2, 0.6, 1.0, 3.0, 0.5])
    a, b = orthogonal_factors(sig_b, sig_a, seed=0)
    scores = component_scores(a, b)
    torch.testing.assert_close(scores, sig_a * sig_b, rtol=1e-5, atol=1e-6)
    svd = torch.linalg.svdvals((b @ a).double()).float()
    torch.testing.assert_close(scores.sort(descending=True).values, svd[:R], rtol=1e-4, atol=1e-5)
    # the "update" score is the same when the view's B is zero (the first round)...
    zero_b = torch.zeros_like(b)
    torch.testing.assert_close(update_scores(a, b, a * 0.5, zero_b), scores, rtol=1e-5, atol=1e-6)
    # ... and in general the Frobenius norm of each component's rank-1 change
    g = torch.Generator().manual_seed(1)
    a0, b0 = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    want = torch.stack(
        [torch.linalg.matrix_norm(torch.outer(b[:, i], a[i]) - torch.outer(b0[:, i], a0[i])) for i in range(R)]
    )
    torch.testing.assert_close(update_scores(a, b, a0, b0), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_fraction,k", [(0.25, 2), (0.5, 4), (0.3, 3), (0.01, 1)])
def test_soft_keeps_exactly_the_top_components(keep_fraction, k):
    spec = ModuleSpec(R, 1)
    delta = make_delta(spec, seed=3, layers=1)
    trained = {}
    sigmas = {}
    for i, key in enumerate(k for k in delta if k.endswith(".lora_A")):
        p = key[: -len(".lora_A")]
        sig = torch.randperm(R, generator=torch.Generator().manual_seed(i)).float() + 1.0  # distinct
        a, b = orthogonal_factors(sig, torch.ones(R), seed=i)
        trained[p + ".lora_A"], trained[p + ".lora_B"] = a, b
        sigmas[p] = sig
    trained[HEAD_W], trained[HEAD_B] = delta[HEAD_W] + 1, delta[HEAD_B] + 1
    up = SoftSparsifier(dtype="fp32").sparsify(delta, trained, spec, keep_fraction)
    assert isinstance(up, SparseUpdate) and up.dtype == "fp32" and list(up.delta) == list(delta)
    for p, sig in sigmas.items():
        want = torch.zeros(R, dtype=torch.bool)
        want[sig.topk(k).indices] = True
        assert torch.equal(up.kept[p], want)
        torch.testing.assert_close(up.delta[p + ".lora_A"], delta[p + ".lora_A"] * want[:, None])
        torch.testing.assert_close(up.delta[p + ".lora_B"], delta[p + ".lora_B"] * want[None, :])
    assert torch.equal(up.delta[HEAD_W], delta[HEAD_W])
    assert up.info["kept_components"] == k * len(sigmas)


def test_soft_counts_the_residual_in_the_score():
    """A component withheld once is scored with its residual: a big withheld delta wins the next round."""
    spec = ModuleSpec(2, 1)
    p = path(1)
    a = torch.eye(2, IN)
    b = torch.eye(OUT, 2)
    trained = {p + ".lora_A": a.clone(), p + ".lora_B": b * torch.tensor([2.0, 1.5])}
    delta = {p + ".lora_A": torch.zeros(2, IN), p + ".lora_B": torch.zeros(OUT, 2)}
    delta[p + ".lora_B"][:, 1] = b[:, 1] * 0.9  # component 1 moved, 0 did not
    sp = SoftSparsifier(dtype="fp32", score="trained")
    assert sp.sparsify(delta, trained, spec, 0.5).kept[p].tolist() == [True, False]
    # next round: same trained adapter, but component 1 carries a 0.9 residual -> sigma 1.5 + 0.9 > 2
    up = sp.sparsify(delta, trained, spec, 0.5)
    assert up.kept[p].tolist() == [False, True]
    torch.testing.assert_close(up.delta[p + ".lora_B"][:, 1], b[:, 1] * 1.8)


# ----------------------------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("name", ["soft", "topk", "randomk"])
def test_error_feedback_loses_nothing(name):
    sp = make_sparsifier(name, dtype="fp32", seed=5, device_id=2)
    spec = ModuleSpec(R, 2)
    sent_total: dict[str, torch.Tensor] = {}
    delta_total: dict[str, torch.Tensor] = {}
    for rnd, kf in enumerate([0.25, 0.5, 0.0, 0.125, 0.6]):
        delta = make_delta(spec, seed=rnd)
        up = sp.sparsify(delta, trained_from(delta, rnd), spec, kf, round_idx=rnd)
        embed(up.delta, sent_total)
        embed(delta, delta_total)
        assert torch.equal(up.delta[HEAD_W], delta[HEAD_W])  # the head always goes dense
    residual = sp.feedback.residual
    for k, total in delta_total.items():
        torch.testing.assert_close(sent_total[k] + residual[k].double(), total, rtol=0, atol=1e-5)
    assert sp.feedback.norm() > 0
    # everything flushes with keep_fraction = 1 and a zero delta
    zero = {k: torch.zeros_like(v) for k, v in make_delta(spec, 0).items()}
    up = sp.sparsify(zero, zero, spec, 1.0)
    embed(up.delta, sent_total)
    assert sp.feedback.norm() == 0
    for k, total in delta_total.items():
        torch.testing.assert_close(sent_total[k], total, rtol=0, atol=1e-5)


def test_residual_survives_rank_and_depth_changes():
    sp = make_sparsifier("topk", dtype="fp32")
    big, small = ModuleSpec(R, 2), ModuleSpec(4, 1)
    d1 = make_delta(big, seed=1)
    sp.sparsify(d1, d1, big, 0.25)  # keeps 2 of 8 per module
    before = {k: v.clone() for k, v in sp.feedback.residual.items()}
    d2 = make_delta(small, seed=2)  # layer 1 only, components 0..3
    up2 = sp.sparsify(d2, d2, small, 1.0)
    after = sp.feedback.residual
    for k, v in before.items():
        if ".layer.0." in k:  # layer outside the new depth: untouched
            assert torch.equal(after[k], v)
        elif k.endswith(".lora_A"):
            torch.testing.assert_close(up2.delta[k], d2[k] + v[:4])  # re-sliced in, all sent
            assert torch.equal(after[k][4:], v[4:]) and not after[k][:4].any()
        else:
            torch.testing.assert_close(up2.delta[k], d2[k] + v[:, :4])
            assert torch.equal(after[k][:, 4:], v[:, 4:]) and not after[k][:, :4].any()
    # back to the big module: the parked components come out, nothing was lost
    zero = {k: torch.zeros_like(v) for k, v in d1.items()}
    up3 = sp.sparsify(zero, zero, big, 1.0)
    sent, want = {}, {}
    embed(d1, want)
    embed(d2, want)
    embed({k: d1[k] - before[k] for k in before}, sent)  # what round 1 sent
    embed(up2.delta, sent)
    embed(up3.delta, sent)
    for k in want:
        torch.testing.assert_close(sent[k], want[k], rtol=0, atol=1e-5)
    assert sp.feedback.norm() == 0


def test_residual_grows_when_the_rank_grows():
    sp = make_sparsifier("randomk", dtype="fp32", seed=0)
    small, big = ModuleSpec(2, 1), ModuleSpec(6, 1)
    d1 = make_delta(small, 1, layers=1)
    sp.sparsify(d1, d1, small, 0.5)
    d2 = make_delta(big, 2, layers=1)
    sp.sparsify(d2, d2, big, 0.5)
    ka = path(0) + ".lora_A"
    assert sp.feedback.residual[ka].shape == (6, IN)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, R), st.integers(1, 2), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["soft", "topk", "randomk"]),
)
def test_error_feedback_conservation_over_any_module_sequence(rounds, name):
    sp = (
        make_sparsifier(name, dtype="fp32", seed=1, score="update")
        if name == "soft"
        else make_sparsifier(name, dtype="fp32", seed=1)
    )
    sent, want = {}, {}
    for i, (rank, depth, kf) in enumerate(rounds):
        spec = ModuleSpec(rank, depth)
        d = make_delta(spec, seed=i)
        up = sp.sparsify(d, trained_from(d, i), spec, kf)
        assert all(int(m.sum()) == n_keep(kf, rank) for m in up.kept.values())
        embed(up.delta, sent)
        embed(d, want)
    for k in want:
        res = sp.feedback.residual[k].double()
        pad = torch.zeros_like(want[k])
        if k.endswith(".lora_A"):
            pad[: res.shape[0]] = res
        else:
            pad[:, : res.shape[1]] = res
        torch.testing.assert_close(sent[k] + pad, want[k], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- lost updates
ALL = ["soft", "topk", "randomk", "dense", "dense_fp32", "dense_fp16", "b_only"]


def add_global(state: dict[str, torch.Tensor], total: dict[str, torch.Tensor]) -> None:
    """Like embed, head parameters included (they have no component axis)."""
    embed(state, total)
    for k, v in state.items():
        if ".lora_" not in k:
            total[k] = total.get(k, torch.zeros(v.shape, dtype=torch.float64)) + v.double()


def residual_global(sp) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sp.feedback.residual.items():
        if k.endswith(".lora_A"):
            out[k] = torch.zeros(R, v.shape[1], dtype=torch.float64)
            out[k][: v.shape[0]] = v.double()
        elif k.endswith(".lora_B"):
            out[k] = torch.zeros(v.shape[0], R, dtype=torch.float64)
            out[k][:, : v.shape[1]] = v.double()
        else:
            out[k] = v.double()
    return out


def frozen_a(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """b_only's A never moves: its deltas are 0."""
    return {k: torch.zeros_like(v) if k.endswith(".lora_A") else v for k, v in delta.items()}


@pytest.mark.parametrize("name", ALL)
def test_a_lost_update_comes_back_in_full_in_the_next_one(name):
    sp = make_sparsifier(name, dtype="fp32", seed=1, device_id=0)
    spec = ModuleSpec(R, 2)
    d1, d2 = make_delta(spec, 1), make_delta(spec, 2)
    if name == "b_only":
        d1, d2 = frozen_a(d1), frozen_a(d2)
    up1 = sp.sparsify(d1, trained_from(d1), spec, 0.5, round_idx=1)
    assert list(sp.feedback.pending) == [1]
    assert all(torch.equal(sp.feedback.pending[1][k], v) for k, v in up1.delta.items())  # held: exactly what went
    for k, v in d1.items():  # sent + residual == delta, exactly
        torch.testing.assert_close(up1.delta[k] + sp.feedback.take(k, v), v, rtol=0, atol=1e-6)
    assert sp.settle(delivered=[], lost=[1]) == [1] and not sp.feedback.pending
    up2 = sp.sparsify(d2, trained_from(d2), spec, 1.0, round_idx=2)
    for k, v in d2.items():  # everything of round 1 rides on round 2, head included
        torch.testing.assert_close(up2.delta[k], v + d1[k], rtol=0, atol=1e-6)
    assert sp.feedback.norm() == 0 and up2.info["residual_norm"] == 0


def test_an_aggregated_update_is_dropped_and_never_sent_again():
    sp = make_sparsifier("topk", dtype="fp32")
    spec = ModuleSpec(R, 2)
    d1 = make_delta(spec, 1)
    sp.sparsify(d1, d1, spec, 0.25, round_idx=1)
    residual = {k: v.clone() for k, v in sp.feedback.residual.items()}
    assert sp.settle(delivered=[1], lost=[]) == [] and not sp.feedback.pending
    assert all(torch.equal(sp.feedback.residual[k], v) for k, v in residual.items())
    zero = {k: torch.zeros_like(v) for k, v in d1.items()}
    up = sp.sparsify(zero, zero, spec, 1.0, round_idx=2)
    for k, v in up.delta.items():  # only what round 1 withheld, nothing of what it sent
        torch.testing.assert_close(v, residual[k] if k in residual else torch.zeros_like(v), rtol=0, atol=0)


def test_pending_updates_are_bounded():
    sp = make_sparsifier("dense", dtype="fp32")
    spec = ModuleSpec(2, 1)
    for r in range(1, 7):
        d = make_delta(spec, r)
        sp.sparsify(d, d, spec, 1.0, round_idx=r)
    assert sorted(sp.feedback.pending) == [3, 4, 5, 6] and MAX_PENDING_UPDATES == 4  # the oldest counted delivered
    assert sp.settle(delivered=[], lost=[1, 2, 99]) == []  # forgotten or never sent: nothing to fold back
    assert sp.feedback.norm() == 0 and sp.feedback.pending_norm() > 0
    assert sp.settle(delivered=[3, 4], lost=[5]) == [5] and list(sp.feedback.pending) == [6]
    sp.reset()
    assert not sp.feedback.pending and not sp.feedback.residual


def test_a_lost_update_with_non_finite_values_is_not_folded_back():
    fb = ErrorFeedback()
    bad = torch.ones(2, IN)
    bad[0, 0] = math.nan
    fb.hold(1, {path(0) + ".lora_A": bad, HEAD_B: torch.ones(2)})
    fb.hold(2, {path(0) + ".lora_A": torch.ones(2, IN), HEAD_B: torch.ones(2)})
    assert fb.settle([], [1, 2]) == [2] and not fb.pending  # round 2 only
    assert torch.equal(fb.residual[HEAD_B], torch.ones(2))
    assert torch.equal(fb.residual[path(0) + ".lora_A"], torch.ones(2, IN))


@pytest.mark.parametrize("name", ["dense", "topk"])
def test_without_error_feedback_nothing_is_held(name):
    sp = make_sparsifier(name, dtype="fp32", error_feedback=False)
    spec = ModuleSpec(R, 1)
    d = make_delta(spec, 0, layers=1)
    sp.sparsify(d, d, spec, 0.5, round_idx=1)
    assert not sp.feedback.pending and sp.settle([], [1]) == [] and sp.feedback.norm() == 0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, R),
            st.integers(1, 2),
            st.sampled_from([0.0, 0.3, 0.5, 1.0]),
            st.sampled_from(["aggregated", "lost", "later"]),  # what the next plan says of this round's update
        ),
        min_size=1,
        max_size=7,
    ),
    st.sampled_from(["soft", "topk", "randomk", "dense"]),
)
def test_conservation_with_losses(rounds, name):
    """sum(delta) == sum(aggregated sent) + sum(pending sent) + residual, over any modules, fractions and fates."""
    sp = make_sparsifier(name, dtype="fp32", seed=1, **({"score": "update"} if name == "soft" else {}))
    want: dict[str, torch.Tensor] = {}
    delivered: dict[str, torch.Tensor] = {}
    fates: dict[int, str] = {}
    for i, (rank, depth, kf, fate) in enumerate(rounds):
        agg = [r for r, f in fates.items() if f == "aggregated" and r in sp.feedback.pending]
        for r in agg:
            add_global(sp.feedback.pending[r], delivered)
        sp.settle(delivered=agg, lost=[r for r, f in fates.items() if f == "lost"])
        fates = {r: f for r, f in fates.items() if f == "later" and r in sp.feedback.pending}
        spec = ModuleSpec(rank, depth)
        d = make_delta(spec, seed=i)
        held = dict(sp.feedback.pending)
        sp.sparsify(d, trained_from(d, i), spec, kf, round_idx=i)
        for r in set(held) - set(sp.feedback.pending):  # past MAX_PENDING_UPDATES: forgotten, counted as delivered
            add_global(held[r], delivered)
        fates[i] = fate
        add_global(d, want)
    have = dict(delivered)
    for sent in sp.feedback.pending.values():
        add_global(sent, have)
    for k, v in residual_global(sp).items():
        have[k] = have.get(k, torch.zeros_like(v)) + v
    for k, total in want.items():
        torch.testing.assert_close(have.get(k, torch.zeros_like(total)), total, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------- regulariser
def _local(backbone, adapter, spec: ModuleSpec | None = None) -> LocalModel:
    spec = spec or ModuleSpec(R, 2)
    lm = LocalModel(backbone, TINY, cache_size=1)
    lm.load(spec, adapter.view(spec))
    return lm


def _set_factors(model, orthogonal: bool, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in lora_factors(model):
            r, n = a.shape
            m = b.shape[0]
            if orthogonal:
                qa, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
                qb, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
                a.copy_(qa.T * (torch.rand(r, 1, generator=g) + 0.5))
                b.copy_(qb * (torch.rand(1, r, generator=g) + 0.5))
            else:
                a.copy_(torch.randn(r, n, generator=g))
                b.copy_(torch.randn(m, r, generator=g))


@pytest.mark.parametrize("normalize", [False, True])
def test_regularizer_zero_iff_orthogonal_and_blind_to_norms(backbone, adapter, normalize):
    model = _local(backbone, adapter).model
    reg = SoftSparsifier(lam=0.5, normalize=normalize).regularizer()
    assert len(list(lora_factors(model))) == 4  # query/value x 2 layers
    _set_factors(model, orthogonal=True)
    assert float(reg(model).detach()) < 1e-9
    with torch.no_grad():  # rescale rows of A and columns of B: norms change, orthogonality does not
        for a, b in lora_factors(model):
            a.mul_(torch.linspace(0.1, 10, a.shape[0])[:, None])
            b.mul_(torch.linspace(5, 0.2, b.shape[1])[None, :])
    assert float(reg(model).detach()) < 1e-7
    _set_factors(model, orthogonal=False)
    value = float(reg(model).detach())
    want = 0.0
    with torch.no_grad():
        for a, b in lora_factors(model):
            for gram in (a @ a.T, b.T @ b):
                off = (gram - torch.diag(torch.diag(gram))).pow(2).sum()
                want += float(off / torch.diag(gram).pow(2).sum() if normalize else off)
    assert value > 0
    assert math.isclose(value, 0.5 * want, rel_tol=1e-4)
    if normalize:  # scale-free: multiplying every factor by 10 leaves it unchanged
        with torch.no_grad():
            for a, b in lora_factors(model):
                a.mul_(10)
                b.mul_(10)
        assert math.isclose(float(reg(model).detach()), value, rel_tol=1e-4)
    assert SoftSparsifier(lam=0.0).regularizer() is None


def test_normalized_penalty_is_finite_at_zero_B(backbone, adapter):
    """B = 0 (the global adapter's initial state): no NaN, and the gradient is finite."""
    model = _local(backbone, adapter).model
    model.zero_grad(set_to_none=True)
    value = SoftSparsifier(lam=1.0, normalize=True).regularizer()(model)
    value.backward()
    assert torch.isfinite(value)
    for a, b in lora_factors(model):
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_regularizer_gradient_reaches_only_lora_parameters(backbone, adapter, normalize):
    model = _local(backbone, adapter).model
    _set_factors(model, orthogonal=False, seed=3)
    model.zero_grad(set_to_none=True)
    SoftSparsifier(lam=1.0, normalize=normalize).regularizer()(model).backward()
    lora = {id(p) for pair in lora_factors(model) for p in pair}
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_orthogonality_penalty_needs_lora_layers(backbone):
    with pytest.raises(ValueError, match="no peft LoRA"):
        orthogonality_penalty(backbone)


# ----------------------------------------------------------------------------------------------- baselines
def test_topk_picks_the_largest_magnitude_components():
    spec = ModuleSpec(R, 1)
    delta = make_delta(spec, 0, layers=1)
    p = path(1)
    scale = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.3, 4.0, 0.01, 0.02])
    delta[p + ".lora_A"] = torch.ones(R, IN) * scale[:, None]
    delta[p + ".lora_B"] = torch.zeros(OUT, R)
    delta[p + ".lora_B"][0, 6] = 100.0  # B counts too: component 6 is the largest of all
    up = make_sparsifier("topk", dtype="fp32").sparsify(delta, delta, spec, 0.5)
    assert up.kept[p].nonzero().flatten().tolist() == [1, 3, 5, 6]


def test_randomk_is_deterministic_given_seed_device_and_round():
    spec = ModuleSpec(R, 2)
    delta = make_delta(spec, 0)

    def masks(seed, device, rnd):
        sp = make_sparsifier("randomk", dtype="fp32", seed=seed, device_id=device)
        return sp.sparsify(delta, delta, spec, 0.5, round_idx=rnd).kept

    first = masks(0, 1, 3)
    assert all(torch.equal(first[p], m) for p, m in masks(0, 1, 3).items())
    for other in (masks(1, 1, 3), masks(0, 2, 3), masks(0, 1, 4)):
        assert any(not torch.equal(first[p], m) for p, m in other.items())
    assert len({tuple(m.tolist()) for m in first.values()}) > 1  # modules draw different subsets
    # without round_idx the round is the call count: two fresh instances agree call by call
    s1, s2 = (make_sparsifier("randomk", dtype="fp32", seed=7) for _ in range(2))
    for _ in range(3):
        m1, m2 = s1.sparsify(delta, delta, spec, 0.25).kept, s2.sparsify(delta, delta, spec, 0.25).kept
        assert all(torch.equal(m1[p], m2[p]) for p in m1)


@pytest.mark.parametrize("name,dtype", [("dense_fp32", "fp32"), ("dense_fp16", "fp16"), ("dense", "fp16")])
def test_dense_sends_everything(name, dtype):
    spec = ModuleSpec(4, 2)
    delta = make_delta(spec, 0)
    up = make_sparsifier(name, dtype="fp16").sparsify(delta, delta, spec, 0.3)
    assert up.kept is None and up.dtype == dtype
    assert all(torch.equal(up.delta[k], v) for k, v in delta.items())
    assert make_sparsifier(name).regularizer() is None


def test_b_only_sends_zero_A_and_freeze_a_keeps_A_fixed(backbone, adapter):
    spec = ModuleSpec(R, 2)
    delta = make_delta(spec, 0)
    up = make_sparsifier("b_only", dtype="fp32").sparsify(delta, delta, spec, 1.0)
    assert up.kept is None and BOnlySparsifier().regularizer() is None
    for k, v in up.delta.items():
        assert (not v.any()) if k.endswith(".lora_A") else torch.equal(v, delta[k])
    # freeze_a on a live tiny peft model: A gets no gradient and does not move in training, B does
    lm = _local(backbone, adapter)
    BOnlySparsifier().prepare_model(lm.model)
    assert freeze_a(lm.model) == 4
    for a, b in lora_factors(lm.model):
        assert not a.requires_grad and b.requires_grad
    view = lm.state()
    exs = [Example("great superb", None, 1), Example("awful dreadful", None, 0)] * 2
    train_local(lm.model, load_tokenizer(TINY), exs, TrainConfig(local_steps=2, batch_size=4, lr=1e-2, max_length=8))
    after = lm.state()
    for k in view:
        moved = not torch.equal(view[k], after[k])
        assert moved == (not k.endswith(".lora_A")), k


# ----------------------------------------------------------------------------------------------- keep_fraction, factory
def test_keep_fraction_edge_cases():
    spec = ModuleSpec(R, 2)
    delta = make_delta(spec, 0)
    sp = make_sparsifier("soft", dtype="fp32")
    none = sp.sparsify(delta, trained_from(delta), spec, 0.0)
    assert all(not m.any() for m in none.kept.values()) and len(none.kept) == 4
    assert all(not v.any() for k, v in none.delta.items() if ".lora_" in k)
    assert torch.equal(none.delta[HEAD_W], delta[HEAD_W])
    fresh = make_sparsifier("soft", dtype="fp32")
    full = fresh.sparsify(delta, trained_from(delta), spec, 1)
    assert all(m.all() for m in full.kept.values())
    assert all(torch.equal(full.delta[k], v) for k, v in delta.items())
    assert fresh.feedback.norm() == 0
    for bad in (-0.1, 1.5, float("nan"), float("inf"), True, "0.5", None):
        for name in ("soft", "topk", "randomk", "dense", "b_only"):
            with pytest.raises(ValueError, match="keep_fraction"):
                make_sparsifier(name).sparsify(delta, delta, spec, bad)
    assert [n_keep(f, 10) for f in (0.0, 1e-9, 0.1, 0.3, 0.31, 0.7, 1.0)] == [0, 1, 1, 3, 4, 7, 10]
    assert n_keep(0.5, 3) == 2 and n_keep(0.5, 1) == 1


def test_factory_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown sparsifier 'svd'.*soft.*topk"):
        make_sparsifier("svd")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lambda'\].*lam"):
        make_sparsifier("soft", **{"lambda": 1.0})
    with pytest.raises(ValueError, match="dtype"):
        make_sparsifier("soft", dtype="int8")
    with pytest.raises(ValueError, match="lam"):
        make_sparsifier("soft", lam=-1.0)
    with pytest.raises(ValueError, match="score"):
        make_sparsifier("soft", score="svd")
    # context keywords are accepted by every method and dropped where unused
    for name in ("soft", "topk", "randomk", "dense", "dense_fp32", "dense_fp16", "b_only"):
        assert make_sparsifier(name, dtype="fp16", seed=1, device_id=2).name == name
    assert make_sparsifier("dense_fp32", dtype="fp16").dtype == "fp32"


def test_layout_mismatches_are_value_errors():
    spec = ModuleSpec(4, 2)
    delta = make_delta(spec, 0)
    sp = make_sparsifier("soft")
    with pytest.raises(ValueError, match="rank"):
        sp.sparsify(delta, delta, ModuleSpec(3, 2), 0.5)
    with pytest.raises(ValueError, match="different keys"):
        sp.sparsify(delta, {k: v for k, v in delta.items() if k != HEAD_B}, spec, 0.5)
    lonely = {k: v for k, v in delta.items() if not k.startswith(path(1, "value") + ".lora_B")}
    with pytest.raises(ValueError, match="only one of its LoRA factors"):
        sp.sparsify(lonely, lonely, spec, 0.5)


# ----------------------------------------------------------------------------------------------- codec + aggregation
def test_codec_round_trips_an_all_false_mask():
    spec = ModuleSpec(4, 2)
    delta = make_delta(spec, 0)
    kept = {path(l, m): torch.tensor([True, False, True, False]) for l in (0, 1) for m in ("query", "value")}
    kept[path(1, "value")] = torch.zeros(4, dtype=torch.bool)
    data = encode_update(delta, spec=spec, round_idx=1, device_id=0, dtype="fp32", kept=kept)
    out = decode_update(data, expected_shapes=expected_shapes(delta))
    assert set(out.kept) == set(kept) and all(torch.equal(out.kept[p], m) for p, m in kept.items())
    assert not out.state[path(1, "value") + ".lora_A"].any() and not out.state[path(1, "value") + ".lora_B"].any()
    assert out.state[path(1, "value") + ".lora_A"].shape == (4, IN)
    torch.testing.assert_close(out.state[path(0) + ".lora_A"], delta[path(0) + ".lora_A"] * kept[path(0)][:, None])
    nothing = {p: torch.zeros(4, dtype=torch.bool) for p in kept}
    empty = decode_update(encode_update(delta, spec=spec, round_idx=1, device_id=0, dtype="fp32", kept=nothing))
    assert all(not m.any() for m in empty.kept.values()) and len(empty.kept) == 4


@pytest.mark.parametrize("name", ["soft", "topk", "randomk", "dense_fp16", "b_only"])
def test_end_to_end_sparsify_encode_decode_aggregate(adapter, name):
    specs = {0: ModuleSpec(8, 2), 1: ModuleSpec(4, 1)}
    sizes: dict[float, int] = {}
    for kf in (0.0, 0.25, 0.5, 1.0):
        updates = []
        for dev, spec in specs.items():
            view = adapter.view(spec)
            g = torch.Generator().manual_seed(10 * dev + 1)
            delta = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in view.items()}
            trained = {k: view[k] + delta[k] for k in view}
            sp = make_sparsifier(name, dtype="fp16", seed=0, device_id=dev)
            up = sp.sparsify(delta, trained, spec, kf, round_idx=1)
            data = encode_update(up.delta, spec=spec, round_idx=1, device_id=dev, dtype=up.dtype, kept=up.kept)
            if dev == 0:
                sizes[kf] = len(data)
            dec = decode_update(data, expected_shapes=expected_shapes(view))
            for k, v in up.delta.items():
                torch.testing.assert_close(dec.state[k], v, rtol=1e-3, atol=1e-5)
            if up.kept is not None:
                assert all(torch.equal(dec.kept[p], m) for p, m in up.kept.items())
            updates.append(ClientUpdate(spec=spec, delta=dec.state, weight=1.0 + dev, kept=dec.kept or None))
        agg = aggregate(adapter, updates)
        assert set(agg) == set(adapter.state) and all(torch.isfinite(v).all() for v in agg.values())
        if kf == 0.0 and name in ("soft", "topk", "randomk"):
            assert all(not v.any() for k, v in agg.items() if ".lora_" in k)  # nothing sent, nothing moves
    if name in ("soft", "topk", "randomk"):
        lora = sizes[1.0] - sizes[0.0]
        for kf in (0.25, 0.5):
            assert abs((sizes[kf] - sizes[0.0]) / lora - kf) < 0.03, sizes
    else:
        assert len(set(sizes.values())) == 1  # dense baselines ignore keep_fraction


def test_sparsifier_from_config_reads_the_codec_section():
    from config import CodecConfig
    from fedlora.sparsify import sparsifier_from_config

    today = sparsifier_from_config(CodecConfig(), seed=0, device_id=1)
    assert (today.name, today.dtype) == ("dense", "fp16")
    soft = sparsifier_from_config(
        CodecConfig(sparsifier="soft", uplink_dtype="fp32", soft_lambda=0.3, soft_score="update", soft_normalize=False),
        seed=0,
        device_id=1,
    )
    assert (soft.name, soft.dtype, soft.lam, soft.score, soft.normalize) == ("soft", "fp32", 0.3, "update", False)
    rk = sparsifier_from_config(CodecConfig(sparsifier="randomk", error_feedback=False), seed=4, device_id=2)
    assert (rk.seed, rk.device_id, rk.error_feedback) == (4, 2, False)
    with pytest.raises(ValueError, match="sparsifier"):  # the config names the field and the allowed ones
        CodecConfig(sparsifier="svd")


def test_the_config_offers_exactly_the_sparsifiers_that_exist():
    import typing

    from config import CodecConfig
    from fedlora.sparsify import SPARSIFIERS

    offered = set(typing.get_args(CodecConfig.model_fields["sparsifier"].annotation))
    assert offered == set(SPARSIFIERS)
