"""Task loaders: GLUE fixtures, malformed files, and the embedded Rotten Tomatoes set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedlora.tasks import TASK_NAMES, Example, TaskError, label_counts, load_task

GLUE = Path(__file__).parent / "fixtures" / "glue"


def test_sst2_fixture_parses_all_rows():
    data = load_task("sst2", str(GLUE / "SST-2"))
    assert data.name == "sst2" and data.num_labels == 2
    assert len(data.train) == 22 and len(data.test) == 20
    assert data.train[0] == Example("hide new secretions from the parental units", None, 0)
    assert data.train[2].label == 1
    assert label_counts(data.test) == {0: 10, 1: 10}


def test_qnli_fixture_is_a_sentence_pair_with_entailment_as_1():
    data = load_task("qnli", str(GLUE / "QNLI"))
    assert len(data.train) == 20 and len(data.test) == 20
    first = data.train[0]
    assert first.text == "When did the third Digimon series begin?"
    assert first.text_pair.startswith("Unlike the two seasons")
    assert first.label == 0  # not_entailment
    assert data.train[2].label == 1  # entailment
    # bare double quotes inside a GLUE field must survive (GLUE TSVs are unquoted)
    assert '"customer"' in data.train[8].text_pair


def test_glue_test_size_and_max_train_subsample_deterministically():
    a = load_task("sst2", str(GLUE / "SST-2"), test_size=5, max_train=7, seed=3)
    b = load_task("sst2", str(GLUE / "SST-2"), test_size=5, max_train=7, seed=3)
    c = load_task("sst2", str(GLUE / "SST-2"), test_size=5, max_train=7, seed=4)
    full = load_task("sst2", str(GLUE / "SST-2"))
    assert len(a.test) == 5 and len(a.train) == 7
    assert a == b
    assert a.test != c.test or a.train != c.train
    assert set(a.test) <= set(full.test) and set(a.train) <= set(full.train)


def _write(tmp_path: Path, train: str, dev: str | None = None) -> str:
    (tmp_path / "train.tsv").write_text(train, encoding="utf-8")
    (tmp_path / "dev.tsv").write_text(dev if dev is not None else train, encoding="utf-8")
    return str(tmp_path)


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("sst2", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n", "line 3"),
        ("sst2", "sentence\tlabel\ngood film\t1\nbad film\tpositive\n", "unknown label 'positive'"),
        ("sst2", "text\tlabel\ngood film\t1\n", "missing column(s) ['sentence']"),
        ("sst2", "sentence\tlabel\n\t1\n", "line 2: empty text"),
        ("sst2", "", "empty file"),
        ("qnli", "index\tquestion\tsentence\tlabel\n0\tq?\ts.\tentailment\n1\tq?\ts.\tcontradiction\n", "line 3"),
        ("qnli", "index\tquestion\tlabel\n0\tq?\tentailment\n", "missing column(s) ['sentence']"),
        ("qnli", "index\tquestion\tsentence\tlabel\n0\tq?\ts.\n", "line 2: expected 4"),
    ],
)
def test_malformed_glue_files_name_file_and_line(tmp_path, name, content, needle):
    folder = _write(tmp_path, content)
    with pytest.raises(TaskError) as err:
        load_task(name, folder)
    msg = str(err.value)
    assert "train.tsv" in msg
    assert needle in msg


def test_bad_dev_file_is_named(tmp_path):
    folder = _write(tmp_path, "sentence\tlabel\ngood\t1\n", "sentence\tlabel\nbad\t7\n")
    with pytest.raises(TaskError, match=r"dev\.tsv: line 2: unknown label '7'"):
        load_task("sst2", folder)


def test_missing_glue_file_and_folder(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(TaskError, match=r"dev\.tsv: file not found"):
        load_task("sst2", str(tmp_path))
    with pytest.raises(TaskError, match="not a directory"):
        load_task("sst2", str(tmp_path / "nope"))


def test_without_path_or_datasets_asks_for_a_glue_folder(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskError, match="GLUE QNLI folder"):
        load_task("qnli")


def test_unknown_task_and_bad_arguments():
    with pytest.raises(TaskError, match="unknown task 'mnli'"):
        load_task("mnli")
    with pytest.raises(TaskError, match="test_size"):
        load_task("sst2", str(GLUE / "SST-2"), test_size=0)
    with pytest.raises(TaskError, match="max_train"):
        load_task("sst2", str(GLUE / "SST-2"), max_train=0)
    assert TASK_NAMES == ("rotten_tomatoes", "sst2", "qnli")


@pytest.fixture(scope="module")
def rt():
    return load_task("rotten_tomatoes", test_size=1000, seed=0)


def test_rotten_tomatoes_size_balance_and_disjointness(rt):
    assert rt.num_labels == 2
    assert label_counts(rt.test) == {0: 500, 1: 500}
    assert len(rt.train) + len(rt.test) == 12752
    train_texts = {e.text for e in rt.train}
    assert len(train_texts) == len(rt.train)  # duplicates removed
    assert not train_texts & {e.text for e in rt.test}
    pos = label_counts(rt.train)[1] / len(rt.train)
    assert 0.55 < pos < 0.62  # ~58 % fresh, minus the balanced hold-out
    assert all(e.text_pair is None and e.text for e in rt.train[:100])


def test_rotten_tomatoes_is_deterministic_given_seed(rt):
    again = load_task("rotten_tomatoes", test_size=1000, seed=0)
    other = load_task("rotten_tomatoes", test_size=1000, seed=1, max_train=300)
    assert again.test == rt.test and again.train == rt.train
    assert {e.text for e in other.test} != {e.text for e in rt.test}
    assert len(other.train) == 300


def test_rotten_tomatoes_custom_csv(tmp_path):
    csv_path = tmp_path / "rt.csv"
    rows = ["category,text,movie_name,has_plot_and_reviews", "plot,A long plot.,m,True"]
    rows += [f"fresh,great {i},m,True" for i in range(5)] + [f"rotten,awful {i},m,True" for i in range(5)]
    rows += ["fresh,great 0,m,True"]  # duplicate text
    csv_path.write_text("\n".join(rows) + "\n")
    data = load_task("rotten_tomatoes", str(csv_path), test_size=4)
    assert label_counts(data.test) == {0: 2, 1: 2}
    assert len(data.train) == 6
    csv_path.write_text("category,text\nneutral,meh\n")
    with pytest.raises(TaskError, match=r"rt\.csv: line 2: unknown category 'neutral'"):
        load_task("rotten_tomatoes", str(csv_path))
