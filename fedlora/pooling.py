"""Mean pooling for BERT-family classifiers (``model.pooling: mean``).

Sentence encoders such as all-MiniLM-L6-v2 are trained to be read as the mean of their token states, while
``BertForSequenceClassification`` reads the first token through BERT's pooler (dense + tanh), which sentence
training never tuned. ``use_mean_pooling`` swaps the pooler for a parameter-free masked mean, so the classifier
head reads the representation the model was trained to produce. It has no parameters, so every process builds
the same model and nothing extra travels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MeanPooler(nn.Module):
    """Masked mean over tokens; the mask is the one the encoder was last called with."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)  # no (or a mismatched) mask: every position counts
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> None:
    """Replace ``model``'s encoder pooler by ``MeanPooler``; a clear error where the model has no pooler."""
    prefix = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, prefix, None)
    if encoder is None or not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ValueError(
            f"model.pooling: mean needs a BERT-family model with an encoder pooler; {type(model).__name__} has none "
            "(set model.pooling: cls)"
        )
    encoder.pooler = MeanPooler()
    encoder.register_forward_pre_hook(_keep_mask, with_kwargs=True)


def _keep_mask(encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Hand the encoder's attention mask to its pooler. It finds the pooler through the module it is called on,
    not a closure, so a deep copy of the model (each LocalModel holds one) pools with its own mask."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    pooler = encoder.pooler
    if isinstance(pooler, MeanPooler):
        pooler.attention_mask = mask
