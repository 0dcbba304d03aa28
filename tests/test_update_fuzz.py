"""10,000 mutated, well-formed updates through decode -> check -> aggregate (every aggregator and rule in turn):
each is aggregated or rejected with a CodecError or an UpdateError, never an uncaught exception, and an aggregate
never takes the adapter out of range (a re-factoring one may be refused instead, as the BS's guard does)."""

from __future__ import annotations

from collections import Counter

import pytest

from fedlora.aggregation import Absent
from fedlora.aggregators.fedavg import FedAvgAggregator
from fedlora.aggregators.flexlora import FlexLoraAggregator
from fedlora.aggregators.hetlora import HetLoraAggregator
from fedlora.lora import GlobalAdapter, ModuleSpec
from fedlora.models import ModelConfig, build_backbone
from tests.fuzz_updates import MUST_BE_DECODE_ERRORS, UpdateFuzzer, dense_update, push

TINY = ModelConfig(name_or_path="tiny", max_rank=8, target_modules=("query",))  # fewer tensors: more cases per s
CASES = 10_000
AGGREGATORS_UNDER_TEST = (
    FedAvgAggregator("eligible"),
    FedAvgAggregator("sent"),
    HetLoraAggregator(),
    FlexLoraAggregator(),
)


@pytest.fixture(scope="module")
def adapter() -> GlobalAdapter:
    g = GlobalAdapter(build_backbone(TINY, 2, seed=0), TINY, seed=0)
    # a global adapter that grew large in a few places, so that "finite, but the sum overflows" is reachable
    for layer in (0, 1):
        g.state[f"bert.encoder.layer.{layer}.attention.self.query.lora_A"][0, :4] = 3.0e38
        g.state[f"bert.encoder.layer.{layer}.attention.self.query.lora_B"][:4, 0] = -3.0e38
    g.state["head.classifier.bias"][0] = -3.0e38
    g.state["head.classifier.weight"][1, :4] = 3.0e38
    return g


def test_every_fuzzed_update_is_aggregated_or_rejected_cleanly(adapter):
    others = [dense_update(adapter, ModuleSpec(8, 2), seed=1, weight=3.0)]
    outcomes: Counter[str] = Counter()
    by_mutation: dict[str, Counter[str]] = {}
    for i, case in enumerate(UpdateFuzzer(adapter, seed=12).cases(CASES)):
        aggregator = AGGREGATORS_UNDER_TEST[i % len(AGGREGATORS_UNDER_TEST)]
        result = push(
            adapter, case, others=others, absent=[Absent(float(i % 3))] if i % 3 else [], aggregator=aggregator
        )
        outcomes[result.outcome] += 1
        for m in case.mutations or ("none",):
            by_mutation.setdefault(m, Counter())[result.outcome] += 1
        if set(case.mutations) & MUST_BE_DECODE_ERRORS:
            assert result.outcome == "codec", (case.mutations, result)
        if not case.mutations:
            assert result.outcome in ("aggregated", "refused"), result
        assert "\n" not in result.error
    assert sum(outcomes.values()) == CASES
    assert min(outcomes[o] for o in ("aggregated", "codec", "check")) > 50, outcomes  # every path is exercised
    assert by_mutation["extreme"]["aggregated"] and by_mutation["extreme"]["check"], by_mutation["extreme"]
    assert set(by_mutation) >= MUST_BE_DECODE_ERRORS | {"extreme", "none"}, sorted(by_mutation)
