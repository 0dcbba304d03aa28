"""The BS's learning state: the task, the global adapter, the evaluator and each device's data share.

The round logic (`bs_node.rounds`) sees this only through its `RoundModel` protocol, so the round state machine
stays free of torch details and can be driven in tests with the tiny model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from bs_node.controllers.costs import ModelShape
from config import ExperimentConfig
from fedlora.accelerator import resolve_device
from fedlora.aggregation import FLOAT32_MAX, Absent, ClientUpdate, check_update
from fedlora.aggregators import make_aggregator
from fedlora.lora import GlobalAdapter, LocalModel, ModuleSpec
from fedlora.models import build_backbone, load_tokenizer, num_layers
from fedlora.partition import device_splits, validation_union
from fedlora.tasks import Example, load_task
from fedlora.training import evaluate
from proto.codec import CodecError, decode_update, encode_update, encoded_size, expected_shapes, largest_value
from proto.framing import BS_DEVICE_ID

log = logging.getLogger("bs")


def model_shape(adapter: GlobalAdapter, layers: int) -> ModelShape:
    """The global adapter's tensor names and shapes: what the controllers need to predict update bytes."""
    return ModelShape.from_shapes(expected_shapes(adapter.state), layers)


def receive_update(
    adapter: GlobalAdapter,
    payload: bytes,
    *,
    spec: ModuleSpec,
    round_idx: int,
    device_id: int,
    weight: float,
    max_abs: float = FLOAT32_MAX,
) -> ClientUpdate:
    """A device's update bytes as something `aggregate` takes, or the error that names what is wrong with them:
    `CodecError` (the bytes, or not the round, device or module its plan named) or `UpdateError` (aggregation's
    own rules, `fedlora.aggregation.check_update`; max_abs bounds the adapter plus the update). What returns can
    be aggregated with the adapter as it is."""
    decoded = decode_update(payload, expected_shapes=expected_shapes(adapter.view(spec)))
    if (decoded.round_idx, decoded.device_id, decoded.spec) != (round_idx, device_id, spec):
        raise CodecError(
            f"update is for round {decoded.round_idx}, device {decoded.device_id}, module "
            f"{decoded.spec}; expected round {round_idx}, device {device_id}, module {spec}"
        )
    update = ClientUpdate(spec=spec, delta=decoded.state, weight=weight, kept=decoded.kept or None)
    check_update(adapter, update, max_abs=max_abs)
    return update


def checked_step(
    state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], max_abs: float
) -> dict[str, torch.Tensor]:
    """The adapter's new tensors (``state + delta`` as `GlobalAdapter.apply` adds them), or ValueError naming the
    first key whose aggregate or new value is non-finite or beyond ``max_abs`` (the next views must encode)."""
    stepped = {}
    for key, d in delta.items():
        if key not in state or tuple(d.shape) != tuple(state[key].shape):
            raise ValueError(f"the aggregate's {key!r} does not fit the adapter; the adapter did not step")
        new = state[key] + d.to(state[key].dtype)
        if not bool(torch.isfinite(d).all()) or not bool(torch.isfinite(new).all()):
            raise ValueError(f"the aggregate of {key!r} is not finite; the adapter did not step")
        if not bool((new.abs() <= max_abs).all()):
            raise ValueError(f"the aggregate would take {key!r} beyond {max_abs:g}; the adapter did not step")
        stepped[key] = new
    return stepped


class GlobalModel:
    """Loads the experiment's task and model once; then encodes views, decodes updates, aggregates, evaluates."""

    def __init__(self, experiment: ExperimentConfig):
        exp = self.exp = experiment
        t0 = time.perf_counter()
        self.task = load_task(
            exp.task.name, exp.task.path, test_size=exp.task.test_size, seed=exp.seed, max_train=exp.task.max_train
        )
        self.tokenizer = load_tokenizer(exp.model)
        backbone = build_backbone(exp.model, self.task.num_labels, exp.seed, task=self.task.name)
        self.num_layers: int = num_layers(backbone)
        self.adapter = GlobalAdapter(backbone, exp.model, exp.seed)
        self.max_rank: int = self.adapter.max_rank
        self.full_spec = ModuleSpec(self.max_rank, self.num_layers)
        self.max_abs = largest_value(exp.codec.downlink_dtype)  # what the adapter may reach: views must encode
        self.evaluator = LocalModel(backbone, exp.model, device=resolve_device(exp.model.device))  # evaluates there
        # The same deterministic split the edges make: the BS weights updates by each training part, so a complete
        # update whose report never came is still aggregated correctly; the held-out parts are its validation set.
        splits = device_splits([ex.label for ex in self.task.train], exp.devices, exp.seed)
        self.device_examples = [len(split.train) for split in splits]
        self.validation = [self.task.train[i] for i in validation_union(splits, exp.task.max_validation, seed=exp.seed)]
        self.model_shape = model_shape(self.adapter, self.num_layers)
        self.aggregator = make_aggregator(exp.round.aggregator, exp.round.aggregation_rule, exp.round.trim_fraction)
        log.info(
            "model and task ready in %.1f s: %s, %d train (%d held out, %d validated on) / %d test examples, "
            "%d layers, rank %d",
            time.perf_counter() - t0,
            exp.task.name,
            len(self.task.train),
            len(self.task.train) - sum(self.device_examples),
            len(self.validation),
            len(self.task.test),
            self.num_layers,
            self.max_rank,
        )

    def examples(self, device_id: int) -> int:
        """Training examples of a device (its held-out part not counted): its weight in the aggregate."""
        return self.device_examples[device_id]

    def adapter_view(self, rank: int, depth: int, round_idx: int) -> bytes:
        """The downlink: the global adapter's view for module (rank, depth), encoded."""
        spec = ModuleSpec(rank, depth)
        self.adapter.validate_spec(spec)
        return encode_update(
            self.adapter.view(spec),
            spec=spec,
            round_idx=round_idx,
            device_id=BS_DEVICE_ID,
            dtype=self.exp.codec.downlink_dtype,
        )

    def decode_update(self, payload: bytes, *, rank: int, depth: int, round_idx: int, device_id: int) -> ClientUpdate:
        """A device's update, decoded and checked against the module its plan named (`receive_update`); a
        `ValueError` (CodecError or UpdateError) names what is wrong: that device's failure, not the round's."""
        return receive_update(
            self.adapter,
            payload,
            spec=ModuleSpec(rank, depth),
            round_idx=round_idx,
            device_id=device_id,
            weight=float(self.examples(device_id)),
            max_abs=self.max_abs,
        )

    def aggregate(
        self, updates: Mapping[int, ClientUpdate], absent: Sequence[int], capabilities: Mapping[int, tuple[int, int]]
    ) -> dict[str, Any]:
        """Apply the round's aggregate (`RoundModel.aggregate`). The adapter steps only if every value stays
        within the downlink dtype's range (else ValueError, nothing changed): the next round's views must still
        encode; every new value is finite. Returns the aggregator's name, rule, what it measured, and the step's
        L2 norm (`step_norm`, ||new adapter - old||: what docs/security.md bounds)."""

        def capability(device_id: int) -> ModuleSpec | None:
            cap = capabilities.get(device_id)
            return ModuleSpec(*cap) if cap is not None else None

        devices = list(updates)
        delta = self.aggregator.aggregate(
            self.adapter,
            [replace(updates[d], capability=capability(d)) for d in devices],
            [Absent(float(self.examples(d)), capability(d)) for d in absent],
        )
        stepped = checked_step(self.adapter.state, delta, self.max_abs)
        state = self.adapter.state
        step_norm = math.sqrt(sum(float((new.double() - state[k].double()).pow(2).sum()) for k, new in stepped.items()))
        for key, value in stepped.items():
            state[key].copy_(value)
        stats = dict(self.aggregator.last_stats)
        if "tail_shares" in stats:  # per update, in the order given: name the devices
            stats["tail_share"] = dict(zip(devices, stats.pop("tail_shares")))
        return {"aggregator": self.aggregator.name, "rule": self.aggregator.rule_name, "step_norm": step_norm, **stats}

    def evaluate(self) -> dict[str, float]:
        """Accuracy and loss of the global adapter on the held-out test set: reported, never chosen on."""
        return self._evaluate_on(self.task.test)

    def validate(self) -> dict[str, float]:
        """Accuracy and loss of the global adapter on the devices' held-out parts (`task.max_validation` of them
        at most): what settings are chosen on. NaN, n = 0 when nothing is held out."""
        return self._evaluate_on(self.validation)

    def _evaluate_on(self, examples: Sequence[Example]) -> dict[str, float]:
        self.evaluator.load(self.full_spec, self.adapter.state)
        return evaluate(self.evaluator.model, self.tokenizer, examples, max_length=self.exp.model.max_length)

    def adapter_state(self) -> dict[str, Any]:
        return self.adapter.state

    def max_update_bytes(self, rank: int, depth: int) -> int:
        """The largest encoding of an update of this module the codec accepts (fp32, every component with a
        mask): what reassembly holds at most for a device planned to train it (docs/security.md)."""
        shapes = expected_shapes(self.adapter.view(ModuleSpec(rank, depth)))
        return max(encoded_size(shapes, dtype="fp32"), encoded_size(shapes, dtype="fp32", kept=rank))

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's adapter: the same keys and shapes, or ValueError naming the first misfit."""
        own = self.adapter.state
        if set(state) != set(own):
            raise ValueError(f"adapter keys differ: {sorted(set(state) ^ set(own))[:4]}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"adapter {key}: shape {tuple(value.shape)}, this model has {tuple(own[key].shape)}")
            own[key].copy_(value)
