"""Local training and evaluation on the tiny model."""

from __future__ import annotations

import pytest
import torch

from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
from fedlora.models import ModelConfig, build_backbone, load_tokenizer
from fedlora.tasks import Example
from fedlora.training import TrainConfig, encode, evaluate, train_local

TINY = ModelConfig(name_or_path="tiny", max_rank=8)
TOY = [
    Example(t, None, y)
    for t, y in [
        ("great wonderful superb", 1),
        ("terrible awful dreadful", 0),
        ("superb great", 1),
        ("awful terrible", 0),
        ("wonderful superb great film", 1),
        ("dreadful awful terrible film", 0),
    ]
] * 3
FAST = TrainConfig(local_steps=30, batch_size=8, lr=3e-2, max_length=16, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts():
    backbone = build_backbone(TINY, 2, seed=0)
    return backbone, GlobalAdapter(backbone, TINY, seed=0), load_tokenizer(TINY)


def _fresh(parts, spec: ModuleSpec | None = None) -> LocalModel:
    spec = spec or ModuleSpec(8, 2)
    backbone, g, _ = parts
    lm = LocalModel(backbone, TINY)
    lm.load(spec, g.view(spec))
    return lm


def test_training_learns_a_trivial_task(parts):
    tok = parts[2]
    lm = _fresh(parts)
    before = evaluate(lm.model, tok, TOY)
    stats = train_local(lm.model, tok, TOY, FAST)
    after = evaluate(lm.model, tok, TOY)
    assert before["n"] == after["n"] == len(TOY)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] == 1.0
    assert stats.steps == 30 and stats.examples == 30 * 8
    assert stats.final_loss < stats.mean_loss
    assert stats.wall_s > 0 and stats.cpu_s > 0


def test_only_lora_and_head_parameters_change(parts):
    lm = _fresh(parts, ModuleSpec(3, 1))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "modules_to_save" in n) for n in trainable)
    view = lm.state()
    train_local(lm.model, parts[2], TOY, TrainConfig(local_steps=5, batch_size=4, lr=1e-2))
    for n, p in lm.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    after = lm.state()
    assert after.keys() == view.keys() and all(after[k].shape == view[k].shape for k in view)


def test_training_is_reproducible_and_leaves_caller_rng_alone(parts):
    cfg = TrainConfig(local_steps=4, batch_size=4, lr=1e-2, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _fresh(parts)
    train_local(a.model, parts[2], TOY, cfg)
    assert torch.equal(torch.rand(3), expected_next)
    b = _fresh(parts)
    train_local(b.model, parts[2], TOY, cfg)
    c = _fresh(parts)
    train_local(c.model, parts[2], TOY, TrainConfig(local_steps=4, batch_size=4, lr=1e-2, seed=4))
    sa, sb, sc = a.state(), b.state(), c.state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_regularizer_is_added_and_progress_reported(parts):
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2)
    seen: list[tuple[int, float]] = []
    plain = train_local(_fresh(parts).model, parts[2], TOY, cfg, progress=lambda s, l: seen.append((s, l)))
    calls = []

    def constant_penalty(model):
        calls.append(model)
        return torch.tensor(10.0)

    reg = train_local(_fresh(parts).model, parts[2], TOY, cfg, regularizer=constant_penalty)
    assert [s for s, _ in seen] == [1, 2, 3] and seen[-1][1] == plain.final_loss
    assert len(calls) == 3
    assert reg.mean_loss == pytest.approx(plain.mean_loss + 10.0, abs=1e-5)


def test_regularizer_gradient_reaches_the_adapter(parts):
    lm = _fresh(parts)

    def shrink_b(model):
        return 1e3 * sum((p**2).sum() for n, p in model.named_parameters() if "lora_B" in n)

    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    train_local(lm.model, parts[2], TOY, TrainConfig(local_steps=10, batch_size=4, lr=1e-2), regularizer=shrink_b)
    b_norms = [p.abs().max().item() for n, p in lm.model.named_parameters() if "lora_B" in n]
    assert max(b_norms) < 0.05


def test_sentence_pairs_are_encoded_as_pairs_with_dynamic_padding(parts):
    tok = parts[2]
    pairs = [Example("who wrote it?", "it was written by her.", 1), Example("when?", "never.", 0)]
    enc = encode(tok, pairs, max_length=64)
    assert enc["token_type_ids"][0].max() == 1  # second segment present
    lengths = enc["attention_mask"].sum(1)
    assert enc["input_ids"].shape[1] == lengths.max() < 64  # padded to the longest, not to max_length
    long = [Example("word " * 200, None, 1)]
    assert encode(tok, long, max_length=16)["input_ids"].shape == (1, 16)
    with pytest.raises(ValueError, match="mixes"):
        encode(tok, [pairs[0], Example("single", None, 0)], 16)
    stats = train_local(_fresh(parts).model, tok, pairs, TrainConfig(local_steps=2, batch_size=16))
    assert stats.examples == 2 * 2  # batch capped at the data size


def test_evaluate_restores_mode_and_does_not_touch_grads(parts):
    lm = _fresh(parts)
    lm.model.train()
    res = evaluate(lm.model, parts[2], TOY[:5], batch_size=2)
    assert res["n"] == 5 and 0.0 <= res["accuracy"] <= 1.0 and res["loss"] > 0
    assert lm.model.training
    assert all(p.grad is None for p in lm.model.parameters())
    lm.model.eval()
    evaluate(lm.model, parts[2], TOY[:2])
    assert not lm.model.training
    assert evaluate(lm.model, parts[2], [])["n"] == 0


def test_train_local_rejects_bad_input(parts):
    lm = _fresh(parts)
    with pytest.raises(ValueError, match="at least one example"):
        train_local(lm.model, parts[2], [], FAST)
    with pytest.raises(ValueError, match="batch_size"):
        train_local(lm.model, parts[2], TOY, TrainConfig(batch_size=0))


def _p_positive(lm, tok, text: str) -> float:
    lm.model.eval()
    with torch.no_grad():
        logits = lm.model(**encode(tok, [Example(text, None, 0)], 16)).logits
    return float(torch.softmax(logits, -1)[0, 1])


def test_logit_adjustment_keeps_the_local_label_prior_out_of_the_model(parts):
    """Text that says nothing, 90 % positive: plain cross-entropy learns the prior (p ≈ 0.9), the adjusted loss
    learns what the text says beyond it (nothing: p ≈ 0.5; 0.59 exactly, as the prior is add-one smoothed: 19/22
    against the sample's 18/20), so non-IID devices do not average their priors."""
    tok = parts[2]
    skewed = [Example("a film", None, 1)] * 18 + [Example("a film", None, 0)] * 2
    cfg = TrainConfig(local_steps=60, batch_size=10, lr=3e-2, max_length=16, seed=0)
    plain, adjusted = _fresh(parts), _fresh(parts)
    train_local(plain.model, tok, skewed, cfg)
    train_local(adjusted.model, tok, skewed, TrainConfig(**{**cfg.__dict__, "logit_adjustment": 1.0}))
    assert _p_positive(plain, tok, "a film") > 0.8
    assert 0.45 < _p_positive(adjusted, tok, "a film") < 0.65


def test_label_log_prior_is_smoothed_and_checks_labels():
    from fedlora.training import label_log_prior

    prior = label_log_prior([Example("x", None, 1)] * 3, 2).exp()
    assert prior.tolist() == pytest.approx([1 / 5, 4 / 5])  # add-one smoothing: no class gets log 0
    with pytest.raises(ValueError, match="label 2"):
        label_log_prior([Example("x", None, 2)], 2)
    with pytest.raises(ValueError, match="logit_adjustment"):
        train_local(torch.nn.Linear(1, 1), None, [Example("x", None, 0)], TrainConfig(logit_adjustment=-1.0))
