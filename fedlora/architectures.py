"""Which modules LoRA adapts in each model family, and how to tell the family.

A transformer family names its attention projections its own way (BERT ``query``/``value``, DistilBERT
``q_lin``/``v_lin``, Llama-style decoders ``q_proj``/``v_proj``) and GPT-2 fuses q, k and v into one ``c_attn``,
a ``transformers`` ``Conv1D`` whose weight is stored (in, out), the transpose of ``nn.Linear``'s. Depth counts
the numbered blocks that hold those modules (``layer.N``, ``layers.N``, ``h.N``; fedlora.lora.layer_index).

``model.target_modules`` in the experiment overrides the table; a family not in it needs it set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from config import ModelConfig


@dataclass(frozen=True)
class Family:
    """Default LoRA targets of one model family (a query-like and a value-like projection, as the LoRA paper)."""

    target_modules: tuple[str, ...]
    fused_attention: bool = False  # q, k and v in one module: LoRA adapts all three


FAMILIES: dict[str, Family] = {
    "bert": Family(("query", "value")),
    "roberta": Family(("query", "value")),
    "xlm-roberta": Family(("query", "value")),
    "electra": Family(("query", "value")),
    "distilbert": Family(("q_lin", "v_lin")),
    "gpt2": Family(("c_attn",), fused_attention=True),
    "llama": Family(("q_proj", "v_proj")),  # SmolLM and SmolLM2 are llama
    "mistral": Family(("q_proj", "v_proj")),
    "qwen2": Family(("q_proj", "v_proj")),
    "qwen3": Family(("q_proj", "v_proj")),
    "gemma": Family(("q_proj", "v_proj")),
    "phi3": Family(("qkv_proj",), fused_attention=True),
}


def model_type(backbone: torch.nn.Module) -> str:
    return str(getattr(getattr(backbone, "config", None), "model_type", "") or type(backbone).__name__)


def target_names(backbone: torch.nn.Module, cfg: ModelConfig) -> tuple[str, ...]:
    """The module names LoRA adapts: the experiment's ``model.target_modules``, else the family's default."""
    if cfg.target_modules is not None:
        return tuple(cfg.target_modules)
    family = FAMILIES.get(model_type(backbone))
    if family is None:
        raise ValueError(
            f"model type {model_type(backbone)!r} ({type(backbone).__name__}) has no default LoRA targets: set "
            f"model.target_modules to its attention projections' names (known families: {', '.join(FAMILIES)})"
        )
    return family.target_modules


def projection_features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a module LoRA can adapt (``nn.Linear`` or GPT-2's ``Conv1D``), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape  # Conv1D stores its weight (in, out)
        return int(fan_in), int(fan_out)
    return None


def stores_weight_transposed(backbone: torch.nn.Module, names: tuple[str, ...]) -> bool:
    """True when the targets are ``Conv1D`` (peft's ``fan_in_fan_out``); a mix of kinds is an error."""
    kinds = {
        isinstance(mod, Conv1D)
        for path, mod in backbone.named_modules()
        if path.rsplit(".", 1)[-1] in names and projection_features(mod) is not None
    }
    if len(kinds) > 1:
        raise ValueError(f"LoRA targets {names} mix nn.Linear and Conv1D modules; choose one kind")
    return kinds == {True}
