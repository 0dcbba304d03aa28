"""Component-wise aggregation of heterogeneous LoRA updates: the eligibility rule (docs/aggregation.md), the
earlier "sent" rule it is measured against, and the checks every update passes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import Absent, ClientUpdate, UpdateError, aggregate, check_update
from fedlora.lora import GlobalAdapter, ModuleSpec, layer_index, module_keys
from fedlora.models import ModelConfig, build_backbone

TINY = ModelConfig(name_or_path="tiny", max_rank=8)
L0Q = "bert.encoder.layer.0.attention.self.query"
L1Q = "bert.encoder.layer.1.attention.self.query"


@pytest.fixture(scope="module")
def adapter() -> GlobalAdapter:
    return GlobalAdapter(build_backbone(TINY, 2, seed=0), TINY, seed=0)


def _delta(adapter: GlobalAdapter, spec: ModuleSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in adapter.view(spec).items()}


def test_equal_dense_modules_is_exactly_fedavg(adapter):
    spec = ModuleSpec(8, 2)
    deltas = [_delta(adapter, spec, s) for s in range(3)]
    weights = [10.0, 30.0, 60.0]
    out = aggregate(adapter, [ClientUpdate(spec, d, w) for d, w in zip(deltas, weights)])
    assert out.keys() == adapter.state.keys()
    for k in out:
        fedavg = sum(w * d[k] for d, w in zip(deltas, weights)) / sum(weights)
        torch.testing.assert_close(out[k], fedavg, atol=1e-6, rtol=1e-6)


def test_components_beyond_a_devices_capability_are_not_its_to_vote_on(adapter):
    big, small = ModuleSpec(8, 2), ModuleSpec(2, 2)
    d1, d2 = _delta(adapter, big, 1), _delta(adapter, small, 2)
    out = aggregate(adapter, [ClientUpdate(big, d1, 1.0), ClientUpdate(small, d2, 3.0, capability=small)])
    a, b = L1Q + ".lora_A", L1Q + ".lora_B"
    assert torch.equal(out[a][2:], d1[a][2:])
    assert torch.equal(out[b][:, 2:], d1[b][:, 2:])
    torch.testing.assert_close(out[a][:2], (d1[a][:2] + 3 * d2[a]) / 4)
    torch.testing.assert_close(out[b][:, :2], (d1[b][:, :2] + 3 * d2[b]) / 4)
    # the head is trained densely by everybody: plain weighted mean
    h = "head.classifier.weight"
    torch.testing.assert_close(out[h], (d1[h] + 3 * d2[h]) / 4)


def test_a_smaller_plan_than_the_capability_counts_as_zero_beyond_it(adapter):
    """A device able to train rank 8 that was planned rank 2 this round: its missing components are zero updates
    (it would have voted on them); the earlier "sent" rule let the others decide them alone."""
    big, small = ModuleSpec(8, 2), ModuleSpec(2, 2)
    d1, d2 = _delta(adapter, big, 1), _delta(adapter, small, 2)
    updates = [ClientUpdate(big, d1, 1.0), ClientUpdate(small, d2, 3.0)]  # capability: the whole adapter
    a = L1Q + ".lora_A"
    torch.testing.assert_close(aggregate(adapter, updates)[a][2:], d1[a][2:] / 4)
    assert torch.equal(aggregate(adapter, updates, rule="sent")[a][2:], d1[a][2:])


def test_shallower_plans_and_capabilities(adapter):
    deep, shallow = ModuleSpec(4, 2), ModuleSpec(4, 1)
    d1, d2 = _delta(adapter, deep, 1), _delta(adapter, shallow, 2)
    capable = [ClientUpdate(deep, d1, 1.0), ClientUpdate(shallow, d2, 1.0, capability=shallow)]
    out = aggregate(adapter, capable)
    assert torch.equal(out[L0Q + ".lora_A"][:4], d1[L0Q + ".lora_A"])  # layer 0 is beyond device 2's depth
    torch.testing.assert_close(out[L1Q + ".lora_A"][:4], (d1[L1Q + ".lora_A"] + d2[L1Q + ".lora_A"]) / 2)
    assert torch.count_nonzero(out[L0Q + ".lora_A"][4:]) == 0  # nobody has components 4..7
    assert torch.count_nonzero(out[L0Q + ".lora_B"][:, 4:]) == 0
    planned_shallow = [ClientUpdate(deep, d1, 1.0), ClientUpdate(shallow, d2, 1.0)]  # able to go deep
    torch.testing.assert_close(aggregate(adapter, planned_shallow)[L0Q + ".lora_A"][:4], d1[L0Q + ".lora_A"] / 2)
    assert torch.equal(aggregate(adapter, planned_shallow, rule="sent")[L0Q + ".lora_A"][:4], d1[L0Q + ".lora_A"])


def test_unsent_components_count_as_zero_updates(adapter):
    spec = ModuleSpec(4, 2)
    d1, d2 = _delta(adapter, spec, 1), _delta(adapter, spec, 2)
    paths = module_keys(d1)
    kept1 = {p: torch.tensor([True, False, True, False]) for p in paths}
    kept2 = {p: torch.tensor([True, True, False, False]) for p in paths}
    updates = [ClientUpdate(spec, d1, 1.0, kept1), ClientUpdate(spec, d2, 1.0, kept2)]
    a, b = L1Q + ".lora_A", L1Q + ".lora_B"
    out = aggregate(adapter, updates)
    torch.testing.assert_close(out[a][0], (d1[a][0] + d2[a][0]) / 2)
    torch.testing.assert_close(out[a][1], d2[a][1] / 2)  # device 1 kept component 1 back: a zero, for now
    torch.testing.assert_close(out[b][:, 2], d1[b][:, 2] / 2)
    assert torch.count_nonzero(out[a][3]) == 0 and torch.count_nonzero(out[b][:, 3]) == 0  # nobody sent it
    sent = aggregate(adapter, updates, rule="sent")  # the earlier rule: only the senders vote
    assert torch.equal(sent[a][1], d2[a][1]) and torch.equal(sent[a][2], d1[a][2])


def test_empty_update_list_is_a_zero_delta(adapter):
    out = aggregate(adapter, [])
    assert out.keys() == adapter.state.keys()
    for k, v in out.items():
        assert v.shape == adapter.state[k].shape and torch.count_nonzero(v) == 0


def test_bad_updates_name_the_device_and_key(adapter):
    spec = ModuleSpec(2, 1)
    good = ClientUpdate(spec, _delta(adapter, spec, 0), 1.0)
    bad = _delta(adapter, spec, 1)
    bad[L1Q + ".lora_A"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match=rf"device 1: key '{L1Q}.lora_A' has shape \(3, 32\)"):
        aggregate(adapter, [good, ClientUpdate(spec, bad, 1.0)])
    outside = _delta(adapter, ModuleSpec(2, 2), 1)
    with pytest.raises(ValueError, match=rf"device 1: key '{L0Q}.lora_A' is not part"):
        aggregate(adapter, [good, ClientUpdate(spec, outside, 1.0)])
    missing = _delta(adapter, spec, 1)
    del missing["head.classifier.bias"]
    with pytest.raises(ValueError, match="device 0: missing key 'head.classifier.bias'"):
        aggregate(adapter, [ClientUpdate(spec, missing, 1.0)])
    with pytest.raises(ValueError, match="device 0: weight"):
        aggregate(adapter, [ClientUpdate(spec, _delta(adapter, spec, 1), 0.0)])
    with pytest.raises(ValueError, match="device 0: ModuleSpec.rank"):
        aggregate(adapter, [ClientUpdate(ModuleSpec(9, 1), {}, 1.0)])
    masks = {p: torch.ones(2, dtype=torch.bool) for p in module_keys(good.delta)}
    masks[L1Q] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"device 0: kept mask for '{L1Q}'"):
        aggregate(adapter, [ClientUpdate(spec, good.delta, 1.0, masks)])
    masks[L1Q] = torch.ones(2)  # not bool
    with pytest.raises(
        UpdateError, match=rf"device 0: kept mask for '{L1Q}' must be bool of shape \(2,\), got torch.float32"
    ):
        aggregate(adapter, [ClientUpdate(spec, good.delta, 1.0, masks)])


def test_check_update_names_what_aggregation_cannot_use(adapter):
    spec = ModuleSpec(2, 1)
    a = L1Q + ".lora_A"
    check_update(adapter, ClientUpdate(spec, _delta(adapter, spec, 0), 1.0))  # a good one passes
    nan = _delta(adapter, spec, 0)
    nan[a][0, 0] = float("nan")
    with pytest.raises(UpdateError, match=f"key '{a}' has non-finite values"):
        check_update(adapter, ClientUpdate(spec, nan, 1.0))
    ints = _delta(adapter, spec, 0)
    ints[a] = torch.zeros(2, 32, dtype=torch.int64)
    with pytest.raises(UpdateError, match=f"key '{a}' is not a floating-point tensor"):
        check_update(adapter, ClientUpdate(spec, ints, 1.0))
    with pytest.raises(UpdateError, match="weight must be a finite number > 0, got True"):
        check_update(adapter, ClientUpdate(spec, _delta(adapter, spec, 0), True))
    # finite, but the global adapter plus it is not: the next round's view could not be encoded
    g = GlobalAdapter(build_backbone(TINY, 2, seed=0), TINY, seed=0)
    g.state[a][:2] = 2.0e38  # grown there by earlier (finite) updates
    huge = _delta(g, spec, 0)
    huge[a] = torch.full((2, 32), 2.0e38)
    with pytest.raises(UpdateError, match=f"key '{a}': the global adapter plus this update exceeds"):
        check_update(g, ClientUpdate(spec, huge, 1.0))
    huge[a] = -huge[a]  # the other way it is fine
    check_update(g, ClientUpdate(spec, huge, 1.0))
    assert isinstance(UpdateError("x"), ValueError)


def test_a_module_without_a_mask_was_sent_whole(adapter):
    """The codec lets modules be coded differently (some by components, some whole): no mask means all sent."""
    spec = ModuleSpec(4, 2)
    d1, d2 = _delta(adapter, spec, 1), _delta(adapter, spec, 2)
    only_l0 = {L0Q: torch.tensor([True, False, False, False])}  # every other module of device 1 went whole
    out = aggregate(adapter, [ClientUpdate(spec, d1, 1.0, only_l0), ClientUpdate(spec, d2, 1.0)])
    a0, a1 = L0Q + ".lora_A", L1Q + ".lora_A"
    torch.testing.assert_close(out[a1][:4], (d1[a1] + d2[a1]) / 2)  # whole: every component arrived
    torch.testing.assert_close(out[a0][0], (d1[a0][0] + d2[a0][0]) / 2)
    torch.testing.assert_close(out[a0][1:4], d2[a0][1:4] / 2)  # device 1 did not send components 1..3 of layer 0


def _eligible(spec: ModuleSpec | None, key: str, i: int, adapter) -> bool:
    spec = spec or ModuleSpec(adapter.max_rank, adapter.num_layers)
    return i < spec.rank and layer_index(key) >= adapter.num_layers - spec.depth


def _reference(adapter, updates, absent=(), rule="eligible"):
    """Per-component loop straight from the rule's formula; slow but obviously right."""
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in adapter.state.items()}
    for k in out:
        if layer_index(k) is None:
            tot = sum(u.weight for u in updates) + sum(a.weight for a in absent)
            if tot:
                out[k] = sum(u.weight * u.delta[k].double() for u in updates) / tot
            continue
        path = k.rsplit(".", 1)[0]
        for i in range(adapter.max_rank):
            senders = [
                u
                for u in updates
                if k in u.delta and i < u.spec.rank and (not u.kept or path not in u.kept or bool(u.kept[path][i]))
            ]
            if rule == "eligible":
                tot = sum(
                    u.weight
                    for u in updates
                    if _eligible(u.capability, k, i, adapter) or (k in u.delta and i < u.spec.rank)
                ) + sum(a.weight for a in absent if _eligible(a.capability, k, i, adapter))
            else:
                tot = sum(u.weight for u in senders) + sum(a.weight for a in absent)
            for u in senders:
                if k.endswith("lora_A"):
                    out[k][i] += u.weight * u.delta[k][i].double() / tot
                else:
                    out[k][:, i] += u.weight * u.delta[k][:, i].double() / tot
    return out


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_matches_the_per_component_rule(adapter, data):
    n = data.draw(st.integers(1, 4))
    updates = []
    for _ in range(n):
        spec = ModuleSpec(data.draw(st.integers(1, 8)), data.draw(st.integers(1, 2)))
        delta = _delta(adapter, spec, data.draw(st.integers(0, 1000)))
        kept = None
        if data.draw(st.booleans()):
            kept = {
                p: torch.tensor(data.draw(st.lists(st.booleans(), min_size=spec.rank, max_size=spec.rank)))
                for p in module_keys(delta)
                if data.draw(st.integers(0, 3))  # now and then a module goes whole, without a mask
            }
        capability = data.draw(st.sampled_from([None, spec, ModuleSpec(8, 1), ModuleSpec(4, 2)]))
        updates.append(ClientUpdate(spec, delta, data.draw(st.floats(0.1, 100.0)), kept, capability))
    absent = [
        Absent(data.draw(st.floats(0.0, 50.0)), data.draw(st.sampled_from([None, ModuleSpec(2, 1)])))
        for _ in range(data.draw(st.integers(0, 2)))
    ]
    rule = data.draw(st.sampled_from(["eligible", "sent"]))
    out = aggregate(adapter, updates, absent, rule)
    ref = _reference(adapter, updates, absent, rule)
    for k in out:
        torch.testing.assert_close(out[k].double(), ref[k], atol=1e-5, rtol=1e-5)


def test_apply_after_aggregate_moves_global_state():
    g = GlobalAdapter(build_backbone(TINY, 2, seed=0), TINY, seed=0)
    before = {k: v.clone() for k, v in g.state.items()}
    spec = ModuleSpec(2, 1)
    d = _delta(g, spec, 3)
    g.apply(aggregate(g, [ClientUpdate(spec, d, 5)]))
    torch.testing.assert_close(g.state[L1Q + ".lora_A"][:2], before[L1Q + ".lora_A"][:2] + d[L1Q + ".lora_A"])
    assert torch.equal(g.state[L1Q + ".lora_A"][2:], before[L1Q + ".lora_A"][2:])
    assert torch.equal(g.state[L0Q + ".lora_A"], before[L0Q + ".lora_A"])


def test_absent_devices_count_as_zero_updates_where_they_are_eligible(adapter):
    full, shallow = ModuleSpec(8, 2), ModuleSpec(8, 1)
    d_full, d_shallow = _delta(adapter, full, 1), _delta(adapter, shallow, 2)
    updates = [ClientUpdate(full, d_full, 30.0), ClientUpdate(shallow, d_shallow, 10.0, capability=shallow)]
    out = aggregate(adapter, updates, [Absent(40.0), Absent(20.0, capability=shallow)])  # 60 % sent nothing
    top = [k for k in d_shallow if k in d_full and layer_index(k) is not None]
    bottom = [k for k in d_full if layer_index(k) is not None and k not in d_shallow]
    assert top and bottom
    for k in top:  # everybody is eligible: (30 d + 10 d') / (30 + 10 + 40 + 20)
        torch.testing.assert_close(out[k], (30 * d_full[k] + 10 * d_shallow[k]) / 100, atol=1e-6, rtol=1e-6)
    for k in bottom:  # the shallow devices, present or not, do not dilute the layer they cannot train
        torch.testing.assert_close(out[k], 30 * d_full[k] / 70, atol=1e-6, rtol=1e-6)
    sent = aggregate(adapter, updates, [Absent(40.0), Absent(20.0, capability=shallow)], rule="sent")
    torch.testing.assert_close(sent[bottom[0]], 30 * d_full[bottom[0]] / 90, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(aggregate(adapter, [], [Absent(5.0)])[bottom[0]]) == 0
    with pytest.raises(ValueError, match="absent device's weight"):
        aggregate(adapter, updates, [Absent(float("nan"))])
