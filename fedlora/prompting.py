"""Generative classification for causal LMs (``model.head: lm``): the task in prompt form, scored by label words.

A decoder LLM is fine-tuned as the language model it is, not through a new classifier head: each example becomes
a prompt ("Review: ... Sentiment:") followed by its label's word (" positive"). Training minimises the negative
log-likelihood of the answer tokens only (the prompt's tokens carry no loss), and a prediction compares the
label words' log-likelihoods after the prompt (no free-running generation), so accuracy means what it means for
the encoder tasks and the same validation and test discipline applies. The embeddings and ``lm_head`` stay
frozen; only LoRA is trained and sent.

The format travels with the model (``model.config.fedlora_prompt``), so training and evaluation read it from the
model they are given, in every process alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora.accelerator import model_device
from fedlora.tasks import Example

CONFIG_ATTR = "fedlora_prompt"


@dataclass(frozen=True)
class PromptFormat:
    """``template`` with {text} (and {text_pair}); ``label_words[i]`` is the answer of label i."""

    template: str
    label_words: tuple[str, ...]

    def prompt(self, example: Example) -> str:
        return self.template.format(text=example.text, text_pair=example.text_pair or "")


SENTIMENT = PromptFormat("Review: {text}\nSentiment:", (" negative", " positive"))  # label 1 = positive
PROMPTS: dict[str, PromptFormat] = {
    "rotten_tomatoes": SENTIMENT,
    "sst2": SENTIMENT,
    # label 1 = entailment (fedlora.tasks): the sentence answers the question
    "qnli": PromptFormat(
        "Question: {text}\nSentence: {text_pair}\nDoes the sentence answer the question?", (" no", " yes")
    ),
}


def prompt_format(task_name: str, num_labels: int) -> PromptFormat:
    fmt = PROMPTS.get(task_name)
    if fmt is None:
        raise ValueError(f"task {task_name!r} has no prompt format for a causal LM (known: {', '.join(PROMPTS)})")
    if len(fmt.label_words) != num_labels:
        raise ValueError(f"task {task_name!r}: {num_labels} labels, but its prompt format has {len(fmt.label_words)}")
    return fmt


def attach(model: torch.nn.Module, fmt: PromptFormat) -> None:
    """Make ``model`` a generative classifier of ``fmt`` (read back by ``format_of``; survives copies and peft)."""
    setattr(model.config, CONFIG_ATTR, {"template": fmt.template, "label_words": list(fmt.label_words)})


def format_of(model: torch.nn.Module) -> PromptFormat | None:
    raw = getattr(getattr(model, "config", None), CONFIG_ATTR, None)
    return None if raw is None else PromptFormat(raw["template"], tuple(raw["label_words"]))


def _sequences(
    tokenizer, batch: Sequence[Example], fmt: PromptFormat, labels: Sequence[int], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer ids, attention mask and a mask of the answer tokens (the ones scored).

    A prompt too long for ``max_length`` loses tokens from its start, so the question and the answer's position
    stay; a BOS token leads where the tokenizer has one."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    rows: list[tuple[list[int], int]] = []
    for example, label in zip(batch, labels):
        answer = tokenizer(fmt.label_words[label], add_special_tokens=False)["input_ids"]
        prompt = tokenizer(fmt.prompt(example), add_special_tokens=False)["input_ids"]
        room = max_length - len(bos) - len(answer)
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for a prompt before {fmt.label_words[label]!r}")
        rows.append((bos + prompt[-room:] + answer, len(answer)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, n_answer) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        answer_mask[i, len(row) - n_answer : len(row)] = True
    return ids, attention, answer_mask


def _on_model(model: torch.nn.Module, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    device = model_device(model)
    return tuple(t.to(device) for t in tensors)


def answer_log_likelihood(
    model: torch.nn.Module,
    tokenizer,
    batch: Sequence[Example],
    fmt: PromptFormat,
    labels: Sequence[int],
    max_length: int,
) -> torch.Tensor:
    """(B,) sum of log p(answer tokens of ``labels[i]`` | prompt i): the answer tokens only."""
    ids, attention, answer_mask = _on_model(model, _sequences(tokenizer, batch, fmt, labels, max_length))
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # position t predicts token t + 1
    token_logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ids[:, 1:, None])[..., 0]
    return (token_logp * answer_mask[:, 1:]).sum(dim=1)


def label_scores(
    model: torch.nn.Module, tokenizer, batch: Sequence[Example], fmt: PromptFormat, max_length: int
) -> torch.Tensor:
    """(B, labels): each label word's log-likelihood after the prompt; the prediction is the argmax.

    When every label word is one token (SmolLM2's " positive" / " negative", " yes" / " no"), one pass over the
    prompts gives them all: the distribution at the answer's position is the same whichever answer follows, as
    the model is causal. Otherwise one pass per label."""
    answers = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in fmt.label_words]
    if all(len(ids) == 1 for ids in answers):
        ids, attention, answer_mask = _on_model(model, _sequences(tokenizer, batch, fmt, [0] * len(batch), max_length))
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        at_answer = answer_mask[:, 1:].float().argmax(dim=1)  # the position that predicts the answer token
        logp = F.log_softmax(logits[torch.arange(len(batch), device=ids.device), at_answer].float(), dim=-1)
        return logp[:, [ids_[0] for ids_ in answers]]
    scores = [
        answer_log_likelihood(model, tokenizer, batch, fmt, [label] * len(batch), max_length)
        for label in range(len(fmt.label_words))
    ]
    return torch.stack(scores, dim=1)
