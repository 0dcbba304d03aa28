"""Local training and evaluation loops (CPU, small models).

Batches are padded to the longest sequence in the batch (not to max_length):
on CPU that is ~20 % faster for short review snippets.  Local training runs a
fixed number of *steps* (not epochs) so devices with different data sizes do
comparable work per round; batches cycle over freshly shuffled epochs drawn
from a seeded generator, so a run is reproducible.

Label-skew correction (``logit_adjustment`` = tau > 0).  A device whose shard is mostly one class learns, above
all, a head bias towards that class; averaged over non-IID devices those biases do not cancel (they are log-odds,
not frequencies) and the global model predicts one class for a round or two (seen on the default experiment:
round 1 at 50 %).  Training on ``logits + tau * log(prior_k)`` (logit adjustment, Menon et al., ICLR 2021; the
same correction as FedLC, Zhang et al., ICML 2022) makes the device fit p(y|x) / prior_k instead of p(y|x): its
bias no longer has to carry the local prior, so what is averaged is the class-conditional evidence.  prior_k is
the device's own label frequency with add-one smoothing; evaluation uses the plain logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from config import TrainConfig
from fedlora.accelerator import autocast, grad_scaler, model_device
from fedlora.prompting import PromptFormat, answer_log_likelihood, format_of, label_scores
from fedlora.tasks import Example


@dataclass
class TrainStats:
    steps: int
    examples: int  # examples processed (steps x batch size, with repeats)
    mean_loss: float
    final_loss: float
    cpu_s: float  # process CPU seconds (time.process_time), all threads
    wall_s: float


def encode(tokenizer, batch: Sequence[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise a batch, as sentence pairs when the examples have ``text_pair``."""
    texts = [e.text for e in batch]
    pairs = [e.text_pair for e in batch]
    has_pair = [p is not None for p in pairs]
    if any(has_pair) and not all(has_pair):
        raise ValueError("a batch mixes single sentences and sentence pairs")
    return tokenizer(
        texts,
        text_pair=pairs if all(has_pair) else None,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless stream of index batches over successive shuffled epochs."""
    buf: list[int] = []
    while True:
        while len(buf) < batch_size:
            buf.extend(torch.randperm(n, generator=gen).tolist())
        yield buf[:batch_size]
        buf = buf[batch_size:]


def label_log_prior(examples: Sequence[Example], num_labels: int) -> torch.Tensor:
    """log of the add-one-smoothed label frequencies of ``examples`` (shape (num_labels,))."""
    counts = torch.ones(num_labels, dtype=torch.float64)
    for e in examples:
        if not 0 <= e.label < num_labels:
            raise ValueError(f"label {e.label} outside 0..{num_labels - 1}")
        counts[e.label] += 1
    return (counts / counts.sum()).log().float()


def _logits(model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    if "token_type_ids" in enc and not getattr(getattr(model, "config", None), "type_vocab_size", 0):
        # only BERT-family models have segment embeddings; GPT-2 would add its token embedding of id 0 instead
        enc = {k: v for k, v in enc.items() if k != "token_type_ids"}
    device = model_device(model)
    out = model(**{k: v.to(device) for k, v in enc.items()})
    return out.logits if hasattr(out, "logits") else out[0]


def train_local(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Run ``cfg.local_steps`` AdamW steps on the trainable parameters of ``model``.

    ``regularizer(model)`` is added to the loss (e.g. an orthogonality penalty).
    ``progress(step, loss)`` is called after each step (1-based).  The global
    torch RNG (dropout) is seeded from ``cfg.seed`` inside a fork, so the
    caller's RNG state is untouched.
    """
    if not examples:
        raise ValueError("train_local needs at least one example")
    if cfg.local_steps < 0:
        raise ValueError(f"local_steps must be >= 0, got {cfg.local_steps}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not cfg.logit_adjustment >= 0:
        raise ValueError(f"logit_adjustment must be >= 0, got {cfg.logit_adjustment}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, len(examples))
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(examples), batch_size, gen)

    was_training = model.training
    model.train()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    losses: list[float] = []
    fmt = format_of(model)  # a causal LM classifying in prompt form (fedlora.prompting)
    if fmt is not None and cfg.logit_adjustment > 0:
        raise ValueError("logit_adjustment corrects a classifier head's label prior; a causal LM has none")
    device = model_device(model)
    scaler = grad_scaler(device)  # fp16 autocast on a GPU without bf16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for step in range(1, cfg.local_steps + 1):
            idx = next(batches)
            batch = [examples[i] for i in idx]
            with autocast(device):
                loss = _batch_loss(model, tokenizer, examples, batch, cfg, fmt)
            if regularizer is not None:
                loss = loss + regularizer(model)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    model.train(was_training)
    return TrainStats(
        steps=cfg.local_steps,
        examples=cfg.local_steps * batch_size,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        cpu_s=time.process_time() - cpu0,
        wall_s=time.perf_counter() - wall0,
    )


def _batch_loss(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    batch: Sequence[Example],
    cfg: TrainConfig,
    fmt: PromptFormat | None,
) -> torch.Tensor:
    """One batch's training loss: a classifier's (logit-adjusted) cross-entropy, or a causal LM's answer NLL."""
    if fmt is not None:  # the answer tokens' negative log-likelihood; the prompt carries no loss
        labels_of = [e.label for e in batch]
        return -answer_log_likelihood(model, tokenizer, batch, fmt, labels_of, cfg.max_length).mean()
    enc = encode(tokenizer, batch, cfg.max_length)
    logits = _logits(model, enc)
    labels = torch.tensor([e.label for e in batch], device=logits.device)
    if cfg.logit_adjustment > 0:
        shift = cfg.logit_adjustment * label_log_prior(examples, logits.shape[-1])
        logits = logits + shift.to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 64,
    max_length: int = 64,
) -> dict:
    """Accuracy and mean loss over ``examples`` (eval mode, no grad): a classifier's cross-entropy, or for a causal
    LM the true answer's negative log-likelihood, with the label words' likelihoods deciding the prediction."""
    if not examples:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    fmt = format_of(model)
    device = model_device(model)
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                labels = torch.tensor([e.label for e in batch])
                with autocast(device):
                    if fmt is not None:
                        scores = label_scores(model, tokenizer, batch, fmt, max_length).float().cpu()
                        loss_sum -= float(scores.gather(1, labels[:, None]).sum())
                        correct += int((scores.argmax(-1) == labels).sum())
                        continue
                    logits = _logits(model, encode(tokenizer, batch, max_length)).float().cpu()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    n = len(examples)
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}
