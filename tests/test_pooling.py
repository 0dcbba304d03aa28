"""`model.pooling: mean`: the classifier reads the masked mean of the token states, through LoRA and training."""

from __future__ import annotations

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from config.base import ConfigError
from config.experiment import ModelConfig
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
from fedlora.models import build_backbone, load_tokenizer
from fedlora.pooling import use_mean_pooling
from fedlora.training import TrainConfig, encode, evaluate, train_local
from tests.test_training import TOY

MEAN = ModelConfig(name_or_path="tiny", max_rank=8, pooling="mean")
CLS = ModelConfig(name_or_path="tiny", max_rank=8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _local(cfg: ModelConfig) -> LocalModel:
    backbone = build_backbone(cfg, 2, seed=0)
    local = LocalModel(backbone, cfg)
    spec = ModuleSpec(8, 2)
    local.load(spec, GlobalAdapter(backbone, cfg, seed=0).view(spec))
    return local


def test_the_head_reads_the_masked_mean_of_the_token_states_through_the_lora_wrapper():
    local = _local(MEAN)
    tok = load_tokenizer(MEAN)
    batch = encode(tok, [TOY[0], TOY[4]], max_length=16)  # two lengths: the shorter one is padded
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]
    with torch.no_grad():
        logits = local.model(**batch).logits
        hidden = local.model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        head = local.model.get_submodule("base_model.model.classifier")
        assert torch.allclose(logits, head(pooled), atol=1e-5)
        # padding does not change what a sentence pools to
        alone = local.model(**encode(tok, [TOY[0]], max_length=16)).logits
        assert torch.allclose(alone[0], logits[0], atol=1e-5)


def test_mean_pooling_adds_no_parameters_and_builds_the_same_in_every_process():
    mean, cls = build_backbone(MEAN, 2, seed=0), build_backbone(CLS, 2, seed=0)
    names = {n for n, _ in mean.named_parameters()}
    assert names == {n for n, _ in cls.named_parameters() if ".pooler." not in n}
    assert GlobalAdapter(mean, MEAN, seed=0).state.keys() == GlobalAdapter(cls, CLS, seed=0).state.keys()
    again = build_backbone(MEAN, 2, seed=0)
    enc = encode(load_tokenizer(MEAN), TOY[:3], max_length=16)
    with torch.no_grad():
        assert torch.equal(mean(**enc).logits, again(**enc).logits)
        assert not torch.allclose(mean(**enc).logits, cls(**enc).logits)


def test_a_mean_pooled_model_trains():
    local = _local(MEAN)
    tok = load_tokenizer(MEAN)
    before = evaluate(local.model, tok, TOY)
    train_local(local.model, tok, TOY, TrainConfig(local_steps=30, batch_size=8, lr=3e-2, max_length=16, seed=0))
    after = evaluate(local.model, tok, TOY)
    assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] == 1.0


def test_a_model_without_a_pooler_or_an_unknown_pooling_is_a_clear_error():
    config = DistilBertConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=2)
    with pytest.raises(ValueError, match="pooling: mean needs a BERT-family model.*DistilBert"):
        use_mean_pooling(DistilBertForSequenceClassification(config))
    with pytest.raises((ConfigError, ValueError), match="pooling"):
        ModelConfig.model_validate({"pooling": "max"})
