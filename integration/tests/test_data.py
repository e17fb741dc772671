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


def test_glora_data_prints_the_layout_and_checks_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from glora_math.cli import main

    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    assert main(["data", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "glue/SST-2/train.tsv" in out
    assert "sst2   ok: train 67349 rows, 2 classes" in out
    # A folder with only SST-2: the other tasks name the file they miss; exit 1.
    (tmp_path / "glue").mkdir()
    shutil.copytree(shared / "glue" / "SST-2", tmp_path / "glue" / "SST-2")
    (tmp_path / "sentence").mkdir()
    (tmp_path / "sentence" / "TREC.train.all").write_text("NUM:x what is it\n")
    assert main(["data", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "sst2   ok" in out
    assert f"{tmp_path / 'glue' / 'CoLA' / 'train.tsv'} is missing" in out
    assert "trec   problem: task 'trec'" in out  # a line that is not '<int label> <text>'
    assert main(["data", str(tmp_path / "nope")]) == 2


def test_the_hub_route_maps_each_task_to_its_dataset_and_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real loading code with the Hub call replaced (tests never fetch): the right dataset,
    # configuration and split, pairs joined as the local RTE files are, labels as integers.
    import datasets

    from integration.data import load_task

    calls = []

    def fake(path: str, name: str | None, split: str) -> dict[str, list[object]]:
        calls.append((path, name, split))
        return {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1],
                "text": ["x", "y"], "coarse_label": [5, 2], "sentence": ["s", "t"]}  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rte = load_task("rte", "dev", Path("hub"))
    assert (rte.texts, rte.labels) == (["a [SEP] c", "b [SEP] d"], [0, 1])
    trec = load_task("trec", "train", "hub")  # type: ignore[arg-type]
    assert trec.labels == [5, 2]
    assert calls == [("nyu-mll/glue", "rte", "validation"), ("CogComp/trec", None, "train")]

    def offline(*args: object, **kw: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"task 'sst2' from the Hub \(nyu-mll/glue\): ConnectionError"
    ):
        load_task("sst2", "train", Path("hub"))


def test_a_fixed_label_vocabulary_and_a_rare_class_reported(tmp_path: Path) -> None:
    from integration.data.loaders import RareLabelWarning
    from integration.runner.config import SimConfig, parse_args

    rows = "".join(f"text {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(1200))
    (tmp_path / "t.tsv").write_text("text\tlabel\n" + rows + "one more\tpso\n")
    # A label seen once in 1,201 rows is reported with its line (a typo?).
    with pytest.warns(RareLabelWarning, match=r"t.tsv:1202: column 'label': label 'pso' appears 1"):
        load_examples(tmp_path / "t.tsv")
    # With the vocabulary fixed, the typo is an error naming the row; the order is the given one.
    with pytest.raises(DataError, match=r"t.tsv:1202: column 'label': label 'pso' is not one of"):
        load_examples(tmp_path / "t.tsv", label_names=["pos", "neg"])
    (tmp_path / "u.tsv").write_text("text\tlabel\n" + rows)
    ex, names = load_examples(tmp_path / "u.tsv", label_names=["pos", "neg"])
    assert names == ["pos", "neg"]
    assert ex.labels[:2] == [1, 0]
    cfg, _ = parse_args(["--train-file", "u.tsv", "--eval-file", "u.tsv", "--labels", "pos,neg"])
    assert cfg.labels == ["pos", "neg"]
    assert any("--labels = pos must name at least two" in p
               for p in SimConfig(labels=["pos"]).problems())  # fmt: skip
