"""Non-IID data partitioning across edge devices, and each device's held-out validation part.

The usual label-skew model of federated learning: for each class, the share of
that class given to each device is drawn from Dir(alpha).  Small alpha means
each device sees mostly one class; large alpha approaches an IID split.

Each device then holds out a seeded fraction of its own share for validation
(`device_splits`): the edge trains only on the rest, and the BS, which makes the
same split, weights updates by the training part and validates the global
adapter on the union of the held-out parts, so settings are chosen without
looking at the test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from config import DevicesConfig

_MAX_RESAMPLES = 100
_HOLDOUT_STREAM = 0x7A11  # the held-out draws' own seed stream, apart from the Dirichlet draw's
_SAMPLE_STREAM = 0x5A3F  # the BS's sample of the validation union


@dataclass(frozen=True)
class DeviceSplit:
    """One device's share of the training data, as sorted indices into the task's train list."""

    train: list[int]  # what the device trains on; its size is the device's weight in the aggregate
    validation: list[int]  # held out: never trained on; the BS validates the global adapter on the union


def device_splits(labels: Sequence[int], devices: DevicesConfig, seed: int) -> list[DeviceSplit]:
    """Every device's (train, validation) split: the one function the BS and the edges both call, so they agree.

    The shares are `dirichlet_split`'s (`devices.min_examples` applies to a whole share), unchanged by the
    hold-out, so `validation_fraction` 0 gives today's shards exactly. Each device then holds out
    floor(validation_fraction x share) of its examples, drawn from a generator seeded by (seed, device): one
    device's hold-out does not depend on another's share size. Deterministic given the arguments."""
    shares = dirichlet_split(
        labels, devices.count, devices.dirichlet_alpha, seed=seed, min_per_device=devices.min_examples
    )
    splits = []
    for device_id, share in enumerate(shares):
        held = int(devices.validation_fraction * len(share))  # <= half the share (the config caps the fraction)
        rng = np.random.default_rng([int(seed), _HOLDOUT_STREAM, device_id])
        chosen = {share[int(i)] for i in rng.choice(len(share), size=held, replace=False)} if held else set()
        splits.append(DeviceSplit([i for i in share if i not in chosen], sorted(chosen)))
    return splits


def validation_union(splits: Sequence[DeviceSplit], max_examples: int | None, seed: int) -> list[int]:
    """The union of the devices' held-out parts, sorted; above max_examples a seeded sample of it (bounds the
    BS's evaluation cost). The full union's accuracy equals the example-weighted mean of the devices'
    validation accuracies; the sample's is an unbiased estimate of it."""
    union = sorted(i for split in splits for i in split.validation)
    if max_examples is None or len(union) <= max_examples:
        return union
    rng = np.random.default_rng([int(seed), _SAMPLE_STREAM])
    return sorted(union[int(i)] for i in rng.choice(len(union), size=max_examples, replace=False))


def dirichlet_split(
    labels: Sequence[int],
    num_devices: int,
    alpha: float,
    seed: int,
    min_per_device: int = 8,
) -> list[list[int]]:
    """Split example indices among ``num_devices`` with Dir(alpha) label skew.

    Returns one sorted index list per device; lists are disjoint and cover all
    indices.  Every device gets at least ``min_per_device`` examples: the draw
    is repeated (up to 100 times, same seeded generator) and, if that still
    fails -- likely for tiny alpha -- examples are moved from the largest
    devices to the starved ones.  Deterministic given the arguments.
    """
    labels = list(labels)
    n = len(labels)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_per_device, bool) or not isinstance(min_per_device, (int, np.integer)) or min_per_device < 0:
        raise ValueError(f"min_per_device must be an int >= 0, got {min_per_device!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if n == 0:
        raise ValueError("labels must not be empty")
    if num_devices * min_per_device > n:
        raise ValueError(
            f"min_per_device={min_per_device} is impossible: {num_devices} devices x {min_per_device} > {n} examples"
        )

    rng = np.random.default_rng(int(seed))
    by_class: dict[int, np.ndarray] = {}
    arr = np.asarray(labels)
    for c in sorted(set(labels)):
        by_class[c] = np.flatnonzero(arr == c)

    parts: list[list[int]] = []
    for _ in range(_MAX_RESAMPLES):
        parts = _draw(by_class, num_devices, float(alpha), rng)
        if min(len(p) for p in parts) >= min_per_device:
            break
    else:
        _rebalance(parts, min_per_device)
    return [sorted(p) for p in parts]


def _draw(by_class: dict[int, np.ndarray], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(k)]
    for idx in by_class.values():
        idx = rng.permutation(idx)
        props = rng.dirichlet([alpha] * k)
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for dev, chunk in enumerate(np.split(idx, cuts)):
            parts[dev].extend(int(i) for i in chunk)
    return parts


def _rebalance(parts: list[list[int]], min_per_device: int) -> None:
    """Move examples from the currently largest device to each starved one.
    Takes from the end of the donor's list, which is in random (drawn) order."""
    for dev in range(len(parts)):
        while len(parts[dev]) < min_per_device:
            donor = max(range(len(parts)), key=lambda d: (len(parts[d]), -d))
            parts[dev].append(parts[donor].pop())
