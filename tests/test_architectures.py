"""LoRA on several model families: targets and widths from the real modules, GPT-2's Conv1D, decoders' padding."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from config.experiment import ModelConfig
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
from fedlora.models import build_backbone, load_tokenizer
from fedlora.training import TrainConfig, evaluate, train_local
from tests.test_training import TOY

STEPS = TrainConfig(local_steps=20, batch_size=6, lr=3e-2, max_length=16, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _saved(tmp_path, model) -> ModelConfig:
    """A tiny random checkpoint in a Hugging Face folder, with the MiniLM tokenizer beside it."""
    model.save_pretrained(tmp_path)
    load_tokenizer(ModelConfig(name_or_path="tiny")).save_pretrained(tmp_path)
    return ModelConfig(name_or_path=str(tmp_path), max_rank=4)


@pytest.mark.parametrize(
    ("name", "lora_modules", "head"),
    [
        ("tiny", {"query": (32, 32), "value": (32, 32)}, {"classifier.weight", "classifier.bias"}),
        ("tiny-gpt2", {"c_attn": (32, 96)}, {"score.weight"}),  # q, k and v fused in one Conv1D
        ("tiny-llama", {"q_proj": (32, 32), "v_proj": (32, 16)}, {"score.weight"}),  # 2 of 4 heads for k/v
    ],
)
def test_each_family_gets_its_own_targets_and_widths_trains_and_sends_only_lora_and_head(name, lora_modules, head):
    cfg = ModelConfig(name_or_path=name, max_rank=4)
    backbone = build_backbone(cfg, 2, seed=0)
    adapter = GlobalAdapter(backbone, cfg, seed=0)
    assert {path.rsplit(".", 1)[-1]: wh for path, wh in adapter.modules.items()} == lora_modules
    assert len(adapter.modules) == 2 * len(lora_modules)  # every target in both layers
    for path, (fan_in, fan_out) in adapter.modules.items():
        assert adapter.state[path + ".lora_A"].shape == (4, fan_in)
        assert adapter.state[path + ".lora_B"].shape == (fan_out, 4)
    assert {k.split(".", 1)[1] for k in adapter.state if k.startswith("head.")} == head

    spec = ModuleSpec(2, 1)  # rank 2 on the top layer only
    local = LocalModel(backbone, cfg)
    local.load(spec, adapter.view(spec))
    tok = load_tokenizer(cfg)
    before = evaluate(local.model, tok, TOY)
    train_local(local.model, tok, TOY, STEPS)
    state = local.state()
    assert state.keys() == adapter.view(spec).keys()  # the top layer's LoRA and the head, nothing else
    trained = {k for k, v in state.items() if not torch.equal(v, adapter.view(spec)[k])}
    assert any(k.endswith(".lora_B") for k in trained) and any(k.startswith("head.") for k in trained)
    assert evaluate(local.model, tok, TOY)["loss"] < before["loss"]
    # the update's size is that of these tensors: embeddings and the frozen layers are not in it
    trainable = sum(p.numel() for p in local.model.parameters() if p.requires_grad)
    assert trainable == sum(v.numel() for v in state.values())


def test_a_decoder_reads_the_last_real_token_whatever_the_padding():
    cfg = ModelConfig(name_or_path="tiny-llama", max_rank=4)
    model = build_backbone(cfg, 2, seed=0)
    tok = load_tokenizer(cfg)
    short, long = TOY[0].text, TOY[4].text
    with torch.no_grad():
        batch = tok([short, long], padding="longest", return_tensors="pt")
        alone = tok([short], return_tensors="pt")
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        assert torch.allclose(
            padded, model(**{k: alone[k] for k in ("input_ids", "attention_mask")}).logits[0], atol=1e-5
        )


def test_folders_of_other_families_load_with_their_defaults(tmp_path):
    roberta = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    )
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    )
    for sub, model, target in ((tmp_path / "r", roberta, "value"), (tmp_path / "d", distil, "v_lin")):
        cfg = _saved(sub, model)
        backbone = build_backbone(cfg, 2, seed=0)
        adapter = GlobalAdapter(backbone, cfg, seed=0)
        assert sum(path.endswith(target) for path in adapter.modules) == 2
        local = LocalModel(backbone, cfg)
        local.load(ModuleSpec(4, 2), adapter.view(ModuleSpec(4, 2)))
        train_local(local.model, load_tokenizer(cfg), TOY, STEPS)  # DistilBERT takes no token_type_ids


def test_an_unknown_family_needs_explicit_targets_and_names_the_setting(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="'mystery'.*set model.target_modules"):
        GlobalAdapter(model, ModelConfig(name_or_path="tiny", max_rank=4), seed=0)
    explicit = ModelConfig(name_or_path="tiny", max_rank=4, target_modules=("key",))
    assert all(path.endswith(".key") for path in GlobalAdapter(model, explicit, seed=0).modules)
    with pytest.raises(ValueError, match=r"no nn.Linear or Conv1D named \['nothing'\].*model.target_modules"):
        GlobalAdapter(model, ModelConfig(name_or_path="tiny", max_rank=4, target_modules=("nothing",)), seed=0)


LM = ModelConfig(name_or_path="tiny-llama", max_rank=4, head="lm")


def _lm(cfg: ModelConfig = LM):
    backbone = build_backbone(cfg, 2, seed=0, task="rotten_tomatoes")
    adapter = GlobalAdapter(backbone, cfg, seed=0)
    local = LocalModel(backbone, cfg)
    spec = ModuleSpec(4, 2)
    local.load(spec, adapter.view(spec))
    return backbone, adapter, local


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_causal_lm_learns_the_task_in_prompt_form_and_sends_only_lora(name):
    cfg = ModelConfig(name_or_path=name, max_rank=4, head="lm")
    backbone, adapter, local = _lm(cfg)
    assert not any(k.startswith("head.") for k in adapter.state)  # embeddings and lm_head: frozen, never sent
    trainable = sum(p.numel() for p in local.model.parameters() if p.requires_grad)
    assert trainable == sum(v.numel() for v in local.state().values())
    assert trainable == sum(v.numel() for v in adapter.state.values())
    tok = load_tokenizer(cfg)
    before = evaluate(local.model, tok, TOY, max_length=32)
    train_local(local.model, tok, TOY, TrainConfig(local_steps=30, batch_size=6, lr=5e-2, max_length=32, seed=0))
    after = evaluate(local.model, tok, TOY, max_length=32)
    # a random width-32 LM with a frozen lm_head over 30k words moves its answers' NLL only a little (~0.6 nats
    # here), but the choice between the two label words is learnt
    assert after["loss"] < before["loss"] - 0.3 and after["accuracy"] > max(before["accuracy"], 0.6)


def test_the_loss_is_on_the_answer_tokens_and_the_prediction_compares_label_words():
    from fedlora.prompting import SENTIMENT, answer_log_likelihood, label_scores

    backbone, _, _ = _lm()
    tok = load_tokenizer(LM)
    batch = TOY[:3]
    with torch.no_grad():
        scores = label_scores(backbone, tok, batch, SENTIMENT, max_length=32)
        for i, example in enumerate(batch):
            for label, word in enumerate(SENTIMENT.label_words):  # by hand: the answer's tokens after the prompt
                prompt = tok(SENTIMENT.prompt(example), add_special_tokens=False)["input_ids"]
                answer = tok(word, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + answer])
                logp = torch.log_softmax(backbone(input_ids=ids).logits[0, :-1], -1)
                want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
                assert float(scores[i, label]) == pytest.approx(want, abs=1e-4)
        # padding the batch changes nothing, and a long prompt is cut from its start, keeping the answer
        alone = answer_log_likelihood(backbone, tok, batch[:1], SENTIMENT, [1], max_length=32)
        assert float(alone[0]) == pytest.approx(float(scores[0, 1]), abs=1e-4)
        cut = answer_log_likelihood(backbone, tok, batch[:1], SENTIMENT, [1], max_length=6)
        assert torch.isfinite(cut).all()


def test_a_causal_lm_is_refused_where_it_cannot_work():
    from config.base import ConfigError
    from config.loading import load_experiment

    with pytest.raises(ValueError, match="needs a decoder"):
        build_backbone(ModelConfig(name_or_path="tiny", head="lm"), 2, seed=0, task="rotten_tomatoes")
    with pytest.raises(ValueError, match="needs the task"):
        build_backbone(LM, 2, seed=0)
    with pytest.raises(ConfigError, match="training.logit_adjustment"):
        load_experiment(None, ["model.head=lm", "model.name_or_path=tiny-llama", "training.logit_adjustment=1.0"])


def test_single_token_label_words_are_scored_in_one_pass_with_the_same_result():
    from fedlora.prompting import PromptFormat, answer_log_likelihood, label_scores

    backbone, _, _ = _lm()
    tok = load_tokenizer(LM)
    one_token = PromptFormat("Review: {text}\nSentiment:", (" bad", " good"))  # one token each in MiniLM's vocabulary
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in one_token.label_words)
    with torch.no_grad():
        fast = label_scores(backbone, tok, TOY[:5], one_token, max_length=12)  # some prompts cut at the front
        slow = torch.stack(
            [answer_log_likelihood(backbone, tok, TOY[:5], one_token, [y] * 5, max_length=12) for y in (0, 1)], 1
        )
    assert torch.allclose(fast, slow, atol=1e-5)
