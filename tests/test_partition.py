"""Dirichlet non-IID partition: coverage, disjointness, minimum size, skew, determinism; each device's held-out
validation part and the BS's capped sample of their union."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import DevicesConfig
from fedlora.partition import device_splits, dirichlet_split, validation_union


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=40, max_size=300),
    num_devices=st.integers(1, 5),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31),
    min_per_device=st.integers(0, 8),
)
def test_partition_is_a_disjoint_cover_with_minimum_size(labels, num_devices, alpha, seed, min_per_device):
    parts = dirichlet_split(labels, num_devices, alpha, seed, min_per_device)
    assert len(parts) == num_devices
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(labels)))
    assert all(len(p) >= min_per_device for p in parts)
    assert all(p == sorted(p) for p in parts)


def test_deterministic_given_seed():
    labels = [i % 2 for i in range(500)]
    a = dirichlet_split(labels, 4, 0.5, seed=7)
    assert a == dirichlet_split(labels, 4, 0.5, seed=7)
    assert a != dirichlet_split(labels, 4, 0.5, seed=8)


def _mean_majority_share(labels, parts):
    arr = np.asarray(labels)
    return np.mean([np.bincount(arr[p], minlength=2).max() / len(p) for p in parts])


def test_small_alpha_skews_labels_large_alpha_does_not():
    labels = [i % 2 for i in range(2000)]
    skewed = np.mean([_mean_majority_share(labels, dirichlet_split(labels, 4, 0.1, s)) for s in range(5)])
    iid = np.mean([_mean_majority_share(labels, dirichlet_split(labels, 4, 1000.0, s)) for s in range(5)])
    assert skewed > 0.85
    assert iid < 0.55


def test_rebalance_guarantees_minimum_for_extreme_skew():
    labels = [0] * 30 + [1] * 30
    parts = dirichlet_split(labels, 6, 1e-3, seed=0, min_per_device=10)
    assert [len(p) for p in parts] == [10] * 6


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_devices": 0}, "num_devices"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"min_per_device": -1}, "min_per_device"),
        ({"min_per_device": 11}, "min_per_device"),
        ({"seed": 1.5}, "seed"),
        ({"labels": []}, "labels"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"labels": [0, 1] * 20, "num_devices": 4, "alpha": 1.0, "seed": 0, "min_per_device": 8} | kwargs
    with pytest.raises(ValueError, match=name):
        dirichlet_split(**args)


# ---------------------------------------------------------------------------------------------- validation hold-out
@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=40, max_size=300),
    count=st.integers(1, 5),
    fraction=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**31),
)
def test_holdout_splits_each_share_into_disjoint_train_and_validation(labels, count, fraction, seed):
    devices = DevicesConfig(count=count, dirichlet_alpha=0.5, min_examples=4, validation_fraction=fraction)
    shares = dirichlet_split(labels, count, 0.5, seed, min_per_device=4)
    splits = device_splits(labels, devices, seed)
    for share, split in zip(shares, splits, strict=True):
        assert not set(split.train) & set(split.validation)  # a device never trains on what it holds out
        assert sorted(split.train + split.validation) == share  # together they are the device's share
        assert len(split.validation) == int(fraction * len(share)) and split.train == sorted(split.train)
        assert split.validation == sorted(split.validation)
    assert splits == device_splits(labels, devices, seed)  # what the BS computes, the edge computes


def test_no_holdout_reproduces_the_dirichlet_shards_exactly():
    labels = [i % 2 for i in range(500)]
    devices = DevicesConfig(count=4, dirichlet_alpha=0.3, min_examples=8, validation_fraction=0.0)
    splits = device_splits(labels, devices, seed=3)
    assert [s.train for s in splits] == dirichlet_split(labels, 4, 0.3, seed=3, min_per_device=8)
    assert all(s.validation == [] for s in splits)
    assert validation_union(splits, 1000, seed=3) == []


def test_holdout_is_seeded_and_the_union_is_capped_by_a_seeded_sample():
    labels = [i % 2 for i in range(2000)]
    devices = DevicesConfig(count=4, validation_fraction=0.1)
    splits = device_splits(labels, devices, seed=0)
    assert [s.validation for s in splits] != [s.validation for s in device_splits(labels, devices, seed=1)]
    union = sorted(i for s in splits for i in s.validation)
    assert len(union) == sum(int(0.1 * (len(s.train) + len(s.validation))) for s in splits)
    assert validation_union(splits, None, seed=0) == union == validation_union(splits, len(union), seed=0)
    sample = validation_union(splits, 50, seed=0)
    assert len(sample) == 50 and set(sample) <= set(union) and sample == sorted(sample)
    assert sample == validation_union(splits, 50, seed=0) != validation_union(splits, 50, seed=1)
