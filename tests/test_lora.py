"""Global adapter views and the edge-side peft model: keys, truncation, scaling, round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec, layer_index, module_keys
from fedlora.models import ModelConfig, build_backbone, load_tokenizer, num_layers
from fedlora.tasks import Example
from fedlora.training import encode

TINY = ModelConfig(name_or_path="tiny", max_rank=8, lora_alpha=16.0)
Q1 = "bert.encoder.layer.1.attention.self.query"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(TINY, num_labels=2, seed=0)


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer(TINY)
    exs = [Example("a gripping, well acted film", None, 1), Example("dull and far too long", None, 0)]
    return encode(tok, exs, 32)


def _randomised(adapter: GlobalAdapter, seed: int = 1) -> GlobalAdapter:
    """Non-zero B (and head) so that every component influences the output."""
    gen = torch.Generator().manual_seed(seed)
    for v in adapter.state.values():
        v.copy_(torch.randn(v.shape, generator=gen) * 0.5)
    return adapter


def test_global_adapter_keys_shapes_and_init(backbone):
    g = GlobalAdapter(backbone, TINY, seed=0)
    assert g.max_rank == 8 and g.num_layers == 2 == num_layers(backbone) and g.scaling == 2.0
    assert module_keys(g.state) == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    ]
    assert g.state[Q1 + ".lora_A"].shape == (8, 32)
    assert g.state[Q1 + ".lora_B"].shape == (32, 8)
    assert torch.count_nonzero(g.state[Q1 + ".lora_B"]) == 0
    a = g.state[Q1 + ".lora_A"]
    assert a.abs().max() <= 1 / 32**0.5 and a.std() > 0.05  # kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in)
    assert torch.equal(g.state["head.classifier.weight"], backbone.classifier.weight)
    assert torch.equal(g.state["head.classifier.bias"], backbone.classifier.bias)
    assert torch.equal(GlobalAdapter(backbone, TINY, seed=0).state[Q1 + ".lora_A"], a)
    assert not torch.equal(GlobalAdapter(backbone, TINY, seed=1).state[Q1 + ".lora_A"], a)


def test_layer_index_and_module_keys():
    assert layer_index("bert.encoder.layer.5.attention.self.query.lora_A") == 5
    assert layer_index("head.classifier.weight") is None
    with pytest.raises(ValueError, match="layer index"):
        layer_index("bert.embeddings.word_embeddings.lora_A")
    state = {"x.layer.0.q.lora_A": torch.zeros(1), "x.layer.0.q.lora_B": torch.zeros(1), "head.w": torch.zeros(1)}
    assert module_keys(state) == ["x.layer.0.q"]


def test_view_is_a_truncated_copy(backbone):
    g = _randomised(GlobalAdapter(backbone, TINY, seed=0))
    v = g.view(ModuleSpec(rank=3, depth=1))
    assert sorted(v) == sorted(
        [f"bert.encoder.layer.1.attention.self.{m}.lora_{x}" for m in ("query", "value") for x in "AB"]
        + ["head.classifier.weight", "head.classifier.bias"]
    )
    assert torch.equal(v[Q1 + ".lora_A"], g.state[Q1 + ".lora_A"][:3])
    assert torch.equal(v[Q1 + ".lora_B"], g.state[Q1 + ".lora_B"][:, :3])
    v[Q1 + ".lora_A"].zero_()
    assert torch.count_nonzero(g.state[Q1 + ".lora_A"][:3]) > 0  # a copy, not a view into state


@pytest.mark.parametrize(
    "spec, field",
    [(ModuleSpec(0, 1), "rank"), (ModuleSpec(9, 1), "rank"), (ModuleSpec(2, 3), "depth"), (ModuleSpec(2, 0), "depth")],
)
def test_bad_spec_names_the_field(backbone, spec, field):
    g = GlobalAdapter(backbone, TINY, seed=0)
    with pytest.raises(ValueError, match=f"ModuleSpec.{field}"):
        g.validate_spec(spec)
    with pytest.raises(ValueError, match=f"ModuleSpec.{field}"):
        LocalModel(backbone, TINY).load(spec, {})


@pytest.mark.parametrize("spec", [ModuleSpec(1, 1), ModuleSpec(3, 2), ModuleSpec(8, 2)])
def test_load_then_state_round_trips(backbone, spec):
    g = _randomised(GlobalAdapter(backbone, TINY, seed=0))
    lm = LocalModel(backbone, TINY)
    view = g.view(spec)
    lm.load(spec, view)
    state = lm.state()
    assert list(state) == list(view)
    for k in view:
        assert torch.equal(state[k], view[k]), k
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(view)  # exactly the LoRA factors of the view + the head


def test_truncated_view_computes_the_same_function_as_the_full_adapter(backbone, batch):
    """Zero the components a rank-2/depth-1 device lacks: its model must then equal the
    full (R, L) model -- the view is a truncation with the same scaling."""
    g = _randomised(GlobalAdapter(backbone, TINY, seed=0))
    spec, full = ModuleSpec(rank=2, depth=1), ModuleSpec(rank=8, depth=2)
    lm = LocalModel(backbone, TINY)

    lm.load(full, g.state)
    lm.model.eval()
    with torch.no_grad():
        before = lm.model(**batch).logits
    for k, v in g.state.items():
        if layer_index(k) is None:
            continue
        if layer_index(k) < g.num_layers - spec.depth:
            v.zero_()
        elif k.endswith("lora_A"):
            v[spec.rank :] = 0
        else:
            v[:, spec.rank :] = 0
    lm.load(full, g.state)
    with torch.no_grad():
        full_out = lm.model(**batch).logits
    lm.load(spec, g.view(spec))
    lm.model.eval()
    with torch.no_grad():
        small_out = lm.model(**batch).logits
    assert not torch.allclose(before, full_out, atol=1e-4)  # the zeroed components mattered
    torch.testing.assert_close(small_out, full_out, atol=1e-5, rtol=1e-5)


def test_adapter_equals_merged_weights_with_global_scaling(backbone, batch):
    """W + (lora_alpha / R) * B @ A on every target, head replaced: same logits as peft."""
    g = _randomised(GlobalAdapter(backbone, TINY, seed=0))
    lm = LocalModel(backbone, TINY)
    lm.load(ModuleSpec(3, 2), g.view(ModuleSpec(3, 2)))
    lm.model.eval()
    merged = copy.deepcopy(backbone).eval()
    with torch.no_grad():
        for path in module_keys(g.state):
            a, b = g.state[path + ".lora_A"][:3], g.state[path + ".lora_B"][:, :3]
            merged.get_submodule(path).weight += (TINY.lora_alpha / TINY.max_rank) * b @ a
        merged.classifier.weight.copy_(g.state["head.classifier.weight"])
        merged.classifier.bias.copy_(g.state["head.classifier.bias"])
        torch.testing.assert_close(lm.model(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-5)


def test_load_rejects_wrong_shapes_and_keys(backbone):
    g = GlobalAdapter(backbone, TINY, seed=0)
    lm = LocalModel(backbone, TINY)
    spec = ModuleSpec(2, 1)
    bad = g.view(spec)
    bad[Q1 + ".lora_B"] = torch.zeros(32, 3)
    with pytest.raises(ValueError, match=f"{Q1}.lora_B.*shape"):
        lm.load(spec, bad)
    missing = g.view(spec)
    del missing["head.classifier.bias"]
    with pytest.raises(ValueError, match="missing key 'head.classifier.bias'"):
        lm.load(spec, missing)
    extra = g.view(ModuleSpec(2, 2))
    with pytest.raises(ValueError, match="layer.0"):
        lm.load(spec, extra)


def test_backbone_is_never_mutated_and_cache_evicts(backbone):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    g = _randomised(GlobalAdapter(backbone, TINY, seed=0))
    lm = LocalModel(backbone, TINY, cache_size=1)
    for spec in (ModuleSpec(2, 1), ModuleSpec(8, 2), ModuleSpec(2, 1)):
        lm.load(spec, g.view(spec))
        assert lm.spec == spec
        with torch.no_grad():
            for p in lm.model.parameters():
                p.add_(1.0)  # even mutating every parameter of the peft copy
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in n for n, _ in backbone.named_modules())


def test_apply_adds_in_place_and_checks_shapes(backbone):
    g = GlobalAdapter(backbone, TINY, seed=0)
    a0 = g.state[Q1 + ".lora_A"].clone()
    delta = {Q1 + ".lora_A": torch.ones(8, 32), "head.classifier.bias": torch.ones(2)}
    g.apply(delta, server_lr=0.5)
    torch.testing.assert_close(g.state[Q1 + ".lora_A"], a0 + 0.5)
    with pytest.raises(ValueError, match="lora_B"):
        g.apply({Q1 + ".lora_B": torch.ones(32, 2)})
    with pytest.raises(ValueError, match="not in the global adapter"):
        g.apply({"head.pooler.weight": torch.ones(1)})


def test_tiny_backbone_is_reproducible():
    a = build_backbone(TINY, 2, seed=5).state_dict()
    b = build_backbone(TINY, 2, seed=5).state_dict()
    c = build_backbone(TINY, 2, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_unknown_model_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        build_backbone(ModelConfig(name_or_path=str(tmp_path / "missing")), 2, 0)


@pytest.mark.integration
def test_minilm_view_and_local_model_shapes():
    cfg = ModelConfig()  # embedded MiniLM
    backbone = build_backbone(cfg, 2, seed=0)
    g = GlobalAdapter(backbone, cfg, seed=0)
    assert g.num_layers == 6 and len(module_keys(g.state)) == 12
    spec = ModuleSpec(rank=4, depth=2)
    view = g.view(spec)
    assert module_keys(view) == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (4, 5) for m in ("query", "value")
    ]
    assert view["bert.encoder.layer.5.attention.self.value.lora_A"].shape == (4, 384)
    assert view["bert.encoder.layer.5.attention.self.value.lora_B"].shape == (384, 4)
    assert view["head.classifier.weight"].shape == (2, 384)
    lm = LocalModel(backbone, cfg)
    lm.load(spec, view)
    state = lm.state()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in view.items()}
    tok = load_tokenizer(cfg)
    with torch.no_grad():
        out = lm.model.eval()(**encode(tok, [Example("a fine film", None, 1)], 16)).logits
    assert out.shape == (1, 2)
    # B = 0 at init, so the adapted model equals the backbone
    with torch.no_grad():
        ref = backbone.eval()(**encode(tok, [Example("a fine film", None, 1)], 16)).logits
    torch.testing.assert_close(out, ref)
