"""A user's own data: TSV/CSV/JSONL files with named columns, typed errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from integration.data import DataError, default_data_dir, load_examples, load_task


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_csv_and_jsonl_give_the_same_examples(tmp_path: Path) -> None:
    rows = [("a good film", "pos"), ("a bad one", "neg"), ("fine", "pos")]
    tsv = _write(tmp_path / "d.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    csv = _write(
        tmp_path / "d.csv", 'sentence,label\n"a good film",pos\n"a bad one",neg\nfine,pos\n'
    )
    jsonl = _write(
        tmp_path / "d.jsonl",
        "".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows),
    )
    got = [load_examples(p, text_column="sentence") for p in (tsv, csv, jsonl)]
    for ex, names in got:
        assert names == ["neg", "pos"]  # names are numbered in sorted order
        assert ex.texts == [t for t, _ in rows]
        assert ex.labels == [1, 0, 1]


def test_integer_labels_pairs_and_a_shared_numbering(tmp_path: Path) -> None:
    train = _write(
        tmp_path / "t.jsonl", '{"a": "x", "b": "y", "label": 1}\n{"a": "u", "b": "v", "label": 0}\n'
    )
    ex, names = load_examples(train, text_column="a", text_pair_column="b")
    assert ex.texts == ["x [SEP] y", "u [SEP] v"]
    assert ex.labels == [1, 0]
    assert names == ["0", "1"]
    # An evaluation file uses the training file's numbering; an unseen label is an error.
    dev = _write(tmp_path / "d.jsonl", '{"a": "p", "b": "q", "label": 1}\n')
    assert load_examples(dev, text_column="a", text_pair_column="b", label_names=names)[
        0
    ].labels == [1]
    bad = _write(
        tmp_path / "e.jsonl", '{"a": "p", "b": "q", "label": 1}\n{"a": "p", "b": "q", "label": 7}\n'
    )
    with pytest.raises(DataError, match=r"e\.jsonl:2: column 'label': label '7'"):
        load_examples(bad, text_column="a", text_pair_column="b", label_names=names)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("m.tsv", "text\tlabel\nfine\t1\n\t0\n", r"m\.tsv:3: column 'text' is missing or empty"),
        ("n.csv", "text,label\nok,1\ntoo,many,fields\n", r"n\.csv:3: 3 fields, the header names 2"),
        ("j.jsonl", '{"text": "ok", "label": 1}\n[1, 2]\n', r"j\.jsonl:2: expected a JSON object"),
        ("k.jsonl", '{"text": "ok", "label": 1}\n{"text": \n', r"k\.jsonl:2: not a JSON object"),
        ("x.parquet", "", r"unknown format '\.parquet'"),
        ("neg.tsv", "text\tlabel\na\t-1\n", r"negative label -1"),
    ],
)
def test_bad_files_name_the_file_line_and_column(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    with pytest.raises(DataError, match=match):
        load_examples(_write(tmp_path / name, text))


def test_missing_files_and_data_folders_are_typed_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.tsv")
    monkeypatch.setenv("GLORA_DATA", str(tmp_path / "empty"))
    assert default_data_dir() == tmp_path / "empty"
    monkeypatch.delenv("GLORA_DATA")
    monkeypatch.chdir(tmp_path)
    # From a folder with no shared/data beside it, the package's own location still finds
    # the repository's (a source checkout); an explicit data_dir always wins.
    with pytest.raises((DataError, FileNotFoundError)):
        load_task("sst2", "dev", data_dir=tmp_path / "empty")


def test_a_local_datasets_folder_is_read_like_a_file(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the data extra (datasets) is not installed")
    rows = {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "train"))
    ex, names = load_examples(tmp_path / "train", text_column="sentence")
    assert ex.texts == rows["sentence"]
    assert ex.labels == rows["label"]
    assert names == ["0", "1"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['train'\]"):
        load_examples(tmp_path / "dd", text_column="sentence")


@pytest.mark.parametrize("task", ["mr", "subj", "cr", "mpqa"])
def test_single_file_tasks_split_into_fixed_90_10_parts_with_every_label(task: str) -> None:
    # The files are sorted by label: an unshuffled 90/10 cut gave a one-class dev split.
    train, dev = load_task(task, "train"), load_task(task, "dev")
    assert sorted(set(dev.labels)) == sorted(set(train.labels)) == [0, 1]
    again = load_task(task, "dev")  # fixed, not drawn per call
    assert (again.texts, again.labels) == (dev.texts, dev.labels)
    total = len(train) + len(dev)
    assert len(dev) == total - int(0.9 * total)
    # Each class's share of the dev split is within a few points of its share overall.
    for c in (0, 1):
        share = (train.labels.count(c) + dev.labels.count(c)) / total
        assert abs(dev.labels.count(c) / len(dev) - share) < 0.05


def test_the_held_out_test_set_is_fixed_disjoint_and_never_sampled(tmp_path: Path) -> None:
    from integration.data import Examples, hold_out, sample

    ex = Examples([f"s{i}" for i in range(200)], [i % 2 for i in range(200)])
    rest, test = hold_out(ex, 50)
    again_rest, again_test = hold_out(ex, 50)
    assert test == again_test  # the same rows on every call
    assert rest == again_rest
    assert (len(test), len(rest)) == (50, 150)
    assert set(test.texts).isdisjoint(rest.texts)
    assert sorted(test.texts + rest.texts) == sorted(ex.texts)
    for seed in range(5):  # no seed's training sample reaches a test row
        assert set(sample(rest, 100, seed).texts).isdisjoint(test.texts)
    for bad in (0, 200, -1):
        with pytest.raises(DataError, match="held-out"):
            hold_out(ex, bad)


def test_real_files_a_bom_and_unbalanced_quotes(tmp_path: Path) -> None:
    # A GLUE-format sentence-pair TSV saved with a BOM, a field beginning with a lone quote.
    tsv = tmp_path / "pairs.tsv"
    tsv.write_bytes(
        "\ufeffsentence1\tsentence2\tlabel\n"
        '"Quoted start\tsecond one\t1\nplain\tother\t0\n'.encode()
    )
    ex, names = load_examples(tsv, text_column="sentence1", text_pair_column="sentence2")
    assert ex.texts == ['"Quoted start [SEP] second one', "plain [SEP] other"]
    assert (ex.labels, names) == ([1, 0], ["0", "1"])
    csv = tmp_path / "excel.csv"
    csv.write_bytes('\ufefftext,label\n"a, b",pos\nc,neg\n'.encode())
    ex2, names2 = load_examples(csv)
    assert (ex2.texts, names2) == (["a, b", "c"], ["neg", "pos"])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"text\tlabel\nfine\t0\nbad\xff\t1\n", r"bad\.tsv:3: not UTF-8 \(byte 0xff\)"),
        (b"text\tlabel\na\t0\nb\tpos\nc\t1\n", r"bad\.tsv:3: column 'label': label 'pos' among"),
        (b"text\tlabel\na\t0\nb\t1000000000000\n", r"bad\.tsv:3: .*not a class index"),
        (b"text\tlabel\na\t1\nb\t1\n", "every row has the label '1'"),
        (b"text\tlabel\n" + b"x" * 140_000 + b"\t0\n", r"bad\.tsv:\d+: field larger than"),
    ],
)
def test_bad_data_files_are_one_line_errors(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_examples(path)


def test_a_plain_folder_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a saved datasets dataset"):
        load_examples(tmp_path)
