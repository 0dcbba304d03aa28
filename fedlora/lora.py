"""Heterogeneous LoRA: one global adapter at the base station, per-device views.

The base station (BS) holds a rank-R LoRA adapter on every target module of
every transformer layer, plus a dense classification head.  A device trains a
*view* of it described by a ``ModuleSpec``: the first ``rank`` rank components
(rows of A, columns of B) on the top ``depth`` layers only, plus the head.

All ranks share one scaling ``s = lora_alpha / R``: with peft's ``alpha / r``
convention a rank-r device uses ``lora_alpha = s * r``.  Then a view is an exact
truncation -- ``s * B[:, :r] @ A[:r]`` is the contribution of those components
in the full adapter -- and the BS can add device deltas component-wise.

``AdapterState`` key names (shared with the codec and the wire format):
``"<base module path>.lora_A"`` (r, in_features), ``"<base module path>.lora_B"``
(out_features, r) and ``"head.<param name>"`` for head parameters.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections import OrderedDict
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedlora.architectures import projection_features, stores_weight_transposed, target_names
from fedlora.models import ModelConfig, num_layers
from proto.codec import AdapterState, ModuleSpec  # the wire's names for a state and a device's module

HEAD_PREFIX = "head."
A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"  # of the LoRA factor keys: <module path><suffix>
_A, _B = A_SUFFIX, B_SUFFIX
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_index(key: str) -> int | None:
    """Transformer layer of a LoRA key or module path; None for head keys."""
    if key.startswith(HEAD_PREFIX):
        return None
    m = _LAYER_RE.search(key)
    if m is None:
        raise ValueError(f"cannot find a transformer layer index in key {key!r}")
    return int(m.group(1))


def _in_view(key: str, first_layer: int) -> bool:
    """A head key, or a LoRA key of a layer at or above ``first_layer``: part of a depth-limited view."""
    layer = layer_index(key)
    return layer is None or layer >= first_layer


def module_keys(state: AdapterState) -> list[str]:
    """LoRA module paths present in ``state`` (without .lora_A/.lora_B), in order."""
    out: list[str] = []
    for k in state:
        for suffix in (_A, _B):
            if k.endswith(suffix):
                path = k[: -len(suffix)]
                if path not in out:
                    out.append(path)
    return out


def _target_modules(backbone: torch.nn.Module, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Base-model paths of the LoRA targets -> (in_features, out_features), read from the real modules (so
    grouped-query attention's narrower k/v projections get their own widths)."""
    names = target_names(backbone, cfg)
    found: dict[str, tuple[int, int]] = {}
    for path, mod in backbone.named_modules():
        features = projection_features(mod)
        if path.rsplit(".", 1)[-1] in names and features is not None:
            layer_index(path)  # raises if the module is not inside a numbered layer
            found[path] = features
    if not found:
        raise ValueError(
            f"no nn.Linear or Conv1D named {list(names)} in {type(backbone).__name__} (model.target_modules)"
        )
    return found


def _head_modules(backbone: torch.nn.Module) -> list[str]:
    """Top-level parameterised modules outside the encoder (BERT: ``classifier``).
    The pooler lives inside the encoder and stays frozen."""
    encoder = getattr(backbone, str(backbone.base_model_prefix), None)
    heads = [
        name
        for name, child in backbone.named_children()
        if child is not encoder and any(True for _ in child.parameters())
    ]
    if not heads:
        raise ValueError(f"{type(backbone).__name__} has no classification head outside the encoder")
    return heads


def _spec_range_error(spec: ModuleSpec, max_rank: int, layers: int) -> str | None:
    for field, value, hi in (("rank", spec.rank, max_rank), ("depth", spec.depth, layers)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            return f"ModuleSpec.{field}={value!r} out of range 1..{hi}"
    return None


class GlobalAdapter:
    """The BS's adapter: rank R on all target layers + the classifier head."""

    def __init__(self, backbone: torch.nn.Module, cfg: ModelConfig, seed: int):
        self.cfg = cfg
        self.max_rank = cfg.max_rank
        self.num_layers = num_layers(backbone)
        self.scaling = cfg.lora_alpha / cfg.max_rank
        self.modules = _target_modules(backbone, cfg)
        self.head_modules = [] if cfg.head == "lm" else _head_modules(backbone)  # a causal LM sends LoRA only
        gen = torch.Generator().manual_seed(seed)
        self.state: AdapterState = {}
        for path, (fan_in, fan_out) in self.modules.items():
            # peft default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0
            bound = 1.0 / math.sqrt(fan_in)
            a = (torch.rand(self.max_rank, fan_in, generator=gen) * 2 - 1) * bound
            self.state[path + _A] = a
            self.state[path + _B] = torch.zeros(fan_out, self.max_rank)
        for head in self.head_modules:
            for name, p in backbone.get_submodule(head).named_parameters():
                self.state[f"{HEAD_PREFIX}{head}.{name}"] = p.detach().clone()

    def validate_spec(self, spec: ModuleSpec) -> None:
        err = _spec_range_error(spec, self.max_rank, self.num_layers)
        if err:
            raise ValueError(err)

    def keys_for(self, spec: ModuleSpec) -> list[str]:
        """Keys of ``view(spec)``: LoRA keys of the top ``depth`` layers, then the head."""
        self.validate_spec(spec)
        first = self.num_layers - spec.depth
        return [k for k in self.state if _in_view(k, first)]

    def view(self, spec: ModuleSpec) -> AdapterState:
        """Copies of A[:r], B[:, :r] for the top ``depth`` layers, plus the head."""
        out: AdapterState = {}
        for k in self.keys_for(spec):
            t = self.state[k]
            if k.endswith(_A):
                t = t[: spec.rank]
            elif k.endswith(_B):
                t = t[:, : spec.rank]
            out[k] = t.clone()
        return out

    def apply(self, delta: AdapterState, server_lr: float = 1.0) -> None:
        """In place ``state += server_lr * delta`` for a full-shape delta (see aggregation)."""
        for k, d in delta.items():
            if k not in self.state:
                raise ValueError(f"delta key {k!r} is not in the global adapter")
            if tuple(d.shape) != tuple(self.state[k].shape):
                raise ValueError(f"delta key {k!r}: shape {tuple(d.shape)} != {tuple(self.state[k].shape)}")
        for k, d in delta.items():
            self.state[k].add_(d.to(self.state[k].dtype), alpha=server_lr)


class LocalModel:
    """Edge side: backbone + peft LoRA for one ModuleSpec at a time.

    peft rewrites the model it wraps, so each spec gets its own deep copy of the
    backbone; the last ``cache_size`` are kept (a MiniLM copy is ~90 MB).
    """

    def __init__(
        self, backbone: torch.nn.Module, cfg: ModelConfig, cache_size: int = 4, device: torch.device | None = None
    ):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.cfg = cfg
        self.scaling = cfg.lora_alpha / cfg.max_rank
        self.num_layers = num_layers(backbone)
        self._backbone = backbone
        self._modules = _target_modules(backbone, cfg)
        self._names = target_names(backbone, cfg)
        self._transposed = stores_weight_transposed(backbone, self._names)
        self._heads = [] if cfg.head == "lm" else _head_modules(backbone)
        self._cache: OrderedDict[ModuleSpec, torch.nn.Module] = OrderedDict()
        self._cache_size = cache_size
        self._spec: ModuleSpec | None = None
        self.device = device or torch.device("cpu")  # where the peft copies train; views and states stay on the CPU

    @property
    def spec(self) -> ModuleSpec | None:
        return self._spec

    @property
    def model(self) -> torch.nn.Module:
        """The active peft model (after ``load``)."""
        if self._spec is None:
            raise RuntimeError("LocalModel.load() has not been called")
        return self._cache[self._spec]

    def _build(self, spec: ModuleSpec) -> torch.nn.Module:
        first = self.num_layers - spec.depth
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=self.scaling * spec.rank,  # type: ignore[arg-type]  # peft takes a float alpha; scales by alpha / r
            target_modules=list(self._names),
            fan_in_fan_out=self._transposed,  # GPT-2's Conv1D
            layers_to_transform=list(range(first, self.num_layers)),
            lora_dropout=0.0,
            bias="none",
            modules_to_save=list(self._heads) or None,
        )
        # peft's random LoRA init (overwritten by load) must not consume the caller's RNG;
        # peft 0.21 also calls a transformers-5-deprecated gradient-checkpointing helper.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(copy.deepcopy(self._backbone), config).to(self.device)
        got = {p for p in self._modules if hasattr(model.get_base_model().get_submodule(p), "lora_A")}
        want = {p for p in self._modules if _in_view(p, first)}
        if got != want:
            raise RuntimeError(f"peft placed LoRA on {sorted(got)}, expected {sorted(want)}")
        return model

    def _params(self, spec: ModuleSpec) -> dict[str, torch.nn.Parameter]:
        """AdapterState key -> the live parameter in the active peft model."""
        # peft's layers are reached by name: nn.Module's __getattr__ hides their types from the checker
        base: Any = cast(PeftModel, self.model).get_base_model()
        out: dict[str, torch.nn.Parameter] = {}
        first = self.num_layers - spec.depth
        for path in self._modules:
            if not _in_view(path, first):
                continue
            mod = base.get_submodule(path)
            out[path + _A] = mod.lora_A["default"].weight
            out[path + _B] = mod.lora_B["default"].weight
        for head in self._heads:
            wrapper = base.get_submodule(head)
            for name, p in wrapper.modules_to_save["default"].named_parameters():
                out[f"{HEAD_PREFIX}{head}.{name}"] = p
        return out

    def load(self, spec: ModuleSpec, view: AdapterState) -> None:
        """Activate the peft model for ``spec`` and copy ``view`` into it."""
        err = _spec_range_error(spec, self.cfg.max_rank, self.num_layers)
        if err:
            raise ValueError(err)
        if spec in self._cache:
            self._cache.move_to_end(spec)
        else:
            self._cache[spec] = self._build(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._spec = spec
        params = self._params(spec)
        for k in view:
            if k not in params:
                raise ValueError(f"view key {k!r} does not belong to spec {spec}")
        for k, p in params.items():
            if k not in view:
                raise ValueError(f"view is missing key {k!r} for spec {spec}")
            if tuple(view[k].shape) != tuple(p.shape):
                raise ValueError(f"view key {k!r}: shape {tuple(view[k].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(view[k])

    def state(self) -> AdapterState:
        """Current (trained) values, same keys and shapes as ``view(spec)``."""
        if self._spec is None:
            raise RuntimeError("LocalModel.load() has not been called")
        return {k: p.detach().to("cpu", copy=True) for k, p in self._params(self._spec).items()}
