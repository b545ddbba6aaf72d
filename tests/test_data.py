"""finetune.data: loading local files in every format, label encoding, tokenization, samplers and loaders."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from transformers import DataCollatorWithPadding

from finetune.data import EpochSampler, build_dataloaders
from finetune.errors import DataError
from finetune.text.data import TextDataConfig, encode_labels, load_raw_splits, tokenize_splits

ROWS = [
    {"text": 'he said "great" twice', "label": "positive"},
    {"text": '"quoted" at the start', "label": "negative"},
    {"text": "a 5\" screen, sadly", "label": "negative"},
    {"text": "it's fine", "label": "neutral"},
    {"text": "lovely and happy", "label": "positive"},
]


def write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def write_table(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format named by the file extension."""
    import pandas as pd

    ext = path.suffix
    if ext == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif ext == ".tsv":  # written raw: no quoting, quotes are part of the text
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    elif ext == ".json":  # a JSON array of records
        path.write_text(json.dumps(rows))
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


def numbered_rows(path: Path, n: int) -> Path:
    """`n` rows with unique texts ("row 0" ... ) and alternating labels."""
    return write_csv(path, "text,label", [f"row {i},{'positive' if i % 2 else 'negative'}" for i in range(n)])


def splits_from(train: dict, eval_: dict | None = None) -> dict:
    return {"train": datasets.Dataset.from_dict(train), "eval": datasets.Dataset.from_dict(eval_ or train)}


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


# --- loading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_loads_the_same_texts_and_labels(tmp_path, ext):
    path = write_table(tmp_path / f"data{ext}", ROWS)
    splits = load_raw_splits(TextDataConfig(train=str(path), eval=str(path)), seed=0)
    for split in ("train", "eval"):
        assert list(splits[split]["text"]) == [r["text"] for r in ROWS]
        assert list(splits[split]["label"]) == [r["label"] for r in ROWS]


def test_headerless_csv_and_tsv_read_with_column_names(tmp_path):
    """Public datasets such as the original AG News files have no header row: data.column_names names the columns."""
    (tmp_path / "train.csv").write_text('3,"Wall St. Bears Claw Back",Short-sellers see green\n'
                                        '4,"Carlyle Looks Toward Aerospace",Private investment firm\n'
                                        "3,Oil and Economy,Soaring crude prices\n")
    (tmp_path / "train.tsv").write_text("a great film\tpositive\nawful\tnegative\nfine\tpositive\n")
    cfg = TextDataConfig(train=str(tmp_path / "train.csv"), eval=str(tmp_path / "train.csv"),
                         column_names=["label", "title", "text"])
    raw = load_raw_splits(cfg, seed=0)
    assert raw["train"].column_names == ["label", "title", "text"] and len(raw["train"]) == 3  # the first row is data
    assert raw["train"][0]["title"] == "Wall St. Bears Claw Back" and str(raw["train"][0]["label"]) == "3"
    raw = load_raw_splits(TextDataConfig(train=str(tmp_path / "train.tsv"), column_names=["text", "label"],
                                         eval_fraction=0.34), seed=0)
    assert len(raw["train"]) + len(raw["eval"]) == 3
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": "b"}\n')
    with pytest.raises(DataError, match=r"data.column_names names the columns of a headerless csv / tsv"):
        load_raw_splits(TextDataConfig(train=str(tmp_path / "rows.jsonl"), column_names=["text", "label"]), seed=0)


@pytest.mark.parametrize("names", [[], ["text", "text"], ["text", " "]])
def test_column_names_must_name_each_column_once(names):
    from finetune.config import config_from_dict
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="column_names"):
        config_from_dict(TextDataConfig, {"column_names": names})


def test_json_lines_with_json_extension_loads(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    splits = load_raw_splits(TextDataConfig(train=str(path), eval=str(path)), seed=0)
    assert list(splits["train"]["text"]) == [r["text"] for r in ROWS]


def test_tsv_quoting_can_be_switched_back_on(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text('text\tlabel\n"a\tb"\tpositive\nplain\tnegative\n')
    splits = load_raw_splits(TextDataConfig(train=str(path), eval=str(path), quoting="minimal"), seed=0)
    assert list(splits["train"]["text"]) == ["a\tb", "plain"]


def test_folder_with_train_csv_loads(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    numbered_rows(folder / "train.csv", 12)
    evals = numbered_rows(tmp_path / "eval.csv", 3)
    splits = load_raw_splits(TextDataConfig(train=str(folder), eval=str(evals)), seed=0)
    assert list(splits["train"]["text"]) == [f"row {i}" for i in range(12)]
    assert len(splits["eval"]) == 3


def test_embedded_dataset_loads_with_its_test_split():
    splits = load_raw_splits(TextDataConfig(train="embedded:reviews"), seed=0)
    assert len(splits["train"]) > len(splits["eval"]) > 0
    assert {"text", "sentiment"} <= set(splits["train"].column_names)


def test_unknown_embedded_dataset_lists_the_embedded_ones():
    with pytest.raises(DataError, match=r"no embedded dataset 'nope'; embedded datasets: json-extraction, reviews"):
        load_raw_splits(TextDataConfig(train="embedded:nope"), seed=0)


@pytest.mark.parametrize("key", ["train", "eval"])
def test_missing_file_does_not_exist(tmp_path, key):
    good = numbered_rows(tmp_path / "good.csv", 4)
    paths = {"train": str(good), "eval": str(good), key: str(tmp_path / "missing.csv")}
    with pytest.raises(DataError, match=rf"does not exist; fix data\.{key}"):
        load_raw_splits(TextDataConfig(train=paths["train"], eval=paths["eval"]), seed=0)


@pytest.mark.parametrize("key", ["train", "eval"])
def test_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, key):
    good = numbered_rows(tmp_path / "good.csv", 4)
    paths = {"train": str(good), "eval": str(good), key: ""}
    with pytest.raises(DataError, match=rf"data\.{key} is empty; set it to a data file"):
        load_raw_splits(TextDataConfig(train=paths["train"], eval=paths["eval"]), seed=0)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_raw_splits(TextDataConfig(train=str(empty)), seed=0)


def test_header_only_csv_is_empty(tmp_path):
    header_only = write_csv(tmp_path / "header.csv", "text,label", [])
    good = numbered_rows(tmp_path / "good.csv", 4)
    # Library bug: datasets raises 'Instruction "train" corresponds to no data!', reported as a parse error.
    with pytest.raises(DataError, match="is empty"):
        load_raw_splits(TextDataConfig(train=str(header_only), eval=str(good)), seed=0)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("text,label\na,b\n")
    with pytest.raises(DataError, match=r"unknown extension '\.xlsx'"):
        load_raw_splits(TextDataConfig(train=str(path)), seed=0)


def test_held_out_eval_is_deterministic_and_disjoint(tmp_path):
    path = numbered_rows(tmp_path / "train.csv", 50)
    cfg = TextDataConfig(train=str(path), eval_fraction=0.2)
    first = load_raw_splits(cfg, seed=3)
    second = load_raw_splits(cfg, seed=3)
    train, evals = list(first["train"]["text"]), list(first["eval"]["text"])
    assert train == list(second["train"]["text"]) and evals == list(second["eval"]["text"])
    assert len(evals) == 10 and len(train) == 40
    assert not set(train) & set(evals)
    assert set(train) | set(evals) == {f"row {i}" for i in range(50)}
    other = load_raw_splits(cfg, seed=4)
    assert set(other["eval"]["text"]) != set(evals), "a different seed should hold out different rows"


def test_max_samples_take_a_seeded_subset(tmp_path):
    path = numbered_rows(tmp_path / "train.csv", 40)
    evals = numbered_rows(tmp_path / "eval.csv", 30)
    cfg = TextDataConfig(train=str(path), eval=str(evals), max_train_samples=15, max_eval_samples=7)
    a = load_raw_splits(cfg, seed=0)
    b = load_raw_splits(cfg, seed=0)
    assert len(a["train"]) == 15 and len(a["eval"]) == 7
    assert list(a["train"]["text"]) == list(b["train"]["text"])
    assert set(a["train"]["text"]) <= {f"row {i}" for i in range(40)}
    assert len(set(a["train"]["text"])) == 15
    bigger = load_raw_splits(TextDataConfig(train=str(path), eval=str(evals), max_train_samples=100), seed=0)
    assert len(bigger["train"]) == 40


# --- labels -------------------------------------------------------------------------------------------------

def test_string_labels_sorted_by_default():
    splits = splits_from({"text": list("abcd"), "label": ["positive", "negative", "neutral", "positive"]})
    out, names = encode_labels(splits, TextDataConfig(), regression=False)
    assert names == ["negative", "neutral", "positive"]
    assert list(out["train"]["labels"]) == [2, 0, 1, 2]


def test_label_names_fix_the_order():
    splits = splits_from({"text": list("abc"), "label": ["positive", "negative", "positive"]},
                         {"text": ["d"], "label": ["negative"]})
    out, names = encode_labels(splits, TextDataConfig(label_names=["positive", "negative"]), regression=False)
    assert names == ["positive", "negative"]
    assert list(out["train"]["labels"]) == [0, 1, 0]
    assert list(out["eval"]["labels"]) == [1]


def test_label_names_may_list_labels_missing_from_train():
    splits = splits_from({"text": list("ab"), "label": ["positive", "negative"]})
    _, names = encode_labels(splits, TextDataConfig(label_names=["negative", "neutral", "positive"]),
                             regression=False, num_labels=3)
    assert names == ["negative", "neutral", "positive"]


def test_integer_labels_map_by_index_to_label_names():
    splits = splits_from({"text": list("abcd"), "label": [1, 0, 2, 1]}, {"text": ["e"], "label": [2]})
    out, names = encode_labels(splits, TextDataConfig(label_names=["neg", "neu", "pos"]), regression=False)
    assert names == ["neg", "neu", "pos"]
    assert list(out["train"]["labels"]) == [1, 0, 2, 1]
    assert list(out["eval"]["labels"]) == [2]


def test_integer_labels_without_names_and_num_labels():
    splits = splits_from({"text": list("ab"), "label": [0, 1]})
    _, names = encode_labels(splits, TextDataConfig(), regression=False, num_labels=3)
    assert names == ["0", "1", "2"]


def test_integer_label_beyond_label_names_errors():
    splits = splits_from({"text": list("ab"), "label": [0, 2]})
    with pytest.raises(DataError, match="label 2 is out of range for 2 label names"):
        encode_labels(splits, TextDataConfig(label_names=["neg", "pos"]), regression=False)


def test_eval_label_not_in_train_labels_is_named():
    splits = splits_from({"text": list("ab"), "label": ["positive", "negative"]},
                         {"text": list("cd"), "label": ["negative", "neutral"]})
    with pytest.raises(DataError, match=r"label 'neutral' in the eval split is not one of the train labels"):
        encode_labels(splits, TextDataConfig(), regression=False)


def test_train_labels_not_in_label_names_are_named():
    splits = splits_from({"text": list("ab"), "label": ["positive", "negative"]})
    with pytest.raises(DataError, match=r"labels \['negative'\] are not in data.label_names"):
        encode_labels(splits, TextDataConfig(label_names=["positive"]), regression=False)


def test_negative_integer_label_errors():
    splits = splits_from({"text": list("ab"), "label": [0, -1]})
    with pytest.raises(DataError, match="integer labels must be >= 0, found -1"):
        encode_labels(splits, TextDataConfig(), regression=False)


def test_float_labels_in_classification_suggest_regression():
    splits = splits_from({"text": list("ab"), "label": [1.5, 2.0]})
    with pytest.raises(DataError, match=r"holds \['float'\] values.*set task: regression"):
        encode_labels(splits, TextDataConfig(), regression=False)


def test_empty_labels_in_train_error():
    splits = splits_from({"text": list("ab"), "label": ["positive", None]})
    with pytest.raises(DataError, match="empty labels"):
        encode_labels(splits, TextDataConfig(), regression=False)


def test_regression_yields_float_labels():
    splits = splits_from({"text": list("abc"), "label": [1, 2.5, 4]}, {"text": ["d"], "label": ["3.25"]})
    out, names = encode_labels(splits, TextDataConfig(), regression=True)
    assert names is None
    assert list(out["train"]["labels"]) == [1.0, 2.5, 4.0]
    assert list(out["eval"]["labels"]) == [3.25]
    assert out["train"].features["labels"].dtype in ("float32", "float64")


def test_regression_rejects_non_numeric_labels():
    splits = splits_from({"text": list("abc"), "label": ["1.0", "bad", "2"]})
    with pytest.raises(DataError, match=r"regression needs numeric labels in column 'label'; found 'bad'"):
        encode_labels(splits, TextDataConfig(), regression=True)


def test_num_labels_mismatch_errors():
    splits = splits_from({"text": list("ab"), "label": ["positive", "negative"]})
    expected = r"the data has 2 labels \(negative, positive\) but model\.num_labels is 3"
    with pytest.raises(DataError, match=expected):
        encode_labels(splits, TextDataConfig(), regression=False, num_labels=3)


@pytest.mark.parametrize(("override", "key", "column"), [
    ({"text_column": "review"}, "data.text_column", "review"),
    ({"label_column": "sentiment"}, "data.label_column", "sentiment"),
    ({"text_pair_column": "second"}, "data.text_pair_column", "second"),
])
def test_missing_column_names_the_key_and_lists_columns(override, key, column):
    splits = splits_from({"text": list("ab"), "label": ["x", "y"]})
    with pytest.raises(DataError) as info:
        encode_labels(splits, TextDataConfig(**override), regression=False)
    message = str(info.value)
    assert f"column {column!r} not found in the train split" in message
    assert "(columns: text, label)" in message
    assert message.endswith(f"set {key}")


# --- tokenization and loaders -------------------------------------------------------------------------------

def test_truncation_to_max_length(tokenizer):
    long = " ".join(["good"] * 40)
    splits = splits_from({"text": [long, "bad", "the movie was fine"], "labels": [1, 0, 1]})
    out = tokenize_splits(splits, tokenizer, TextDataConfig(max_length=8))
    lengths = [len(ids) for ids in out["train"]["input_ids"]]
    assert max(lengths) == 8 and lengths[1] == 3  # [CLS] bad [SEP]
    assert list(out["train"]["length"]) == lengths
    columns = {"input_ids", "token_type_ids", "attention_mask", "length", "labels"}
    assert set(out["train"].column_names) == columns


def test_empty_texts_are_named_and_numbers_are_text(tokenizer):
    splits = splits_from({"text": ["good", None, "bad"], "labels": [1, 0, 1]})
    with pytest.raises(DataError, match=r"the train split has 1 empty texts in column 'text' \(data\.text_column\), "
                                        "first at row 1"):
        tokenize_splits(splits, tokenizer, TextDataConfig())
    splits = splits_from({"text": ["good", "bad"], "second": [12, 7], "labels": [1, 0]})
    out = tokenize_splits(splits, tokenizer, TextDataConfig(text_pair_column="second"))
    assert list(out["train"]["input_ids"]) == [tokenizer("good", "12")["input_ids"], tokenizer("bad", "7")["input_ids"]]


def test_class_label_columns_keep_their_names():
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    train = datasets.Dataset.from_dict({"text": list("abc"), "label": [1, 0, 1]}, features=features)
    out, names = encode_labels({"train": train}, TextDataConfig(), regression=False)
    assert names == ["negative", "positive"] and list(out["train"]["labels"]) == [1, 0, 1]


def test_true_false_labels_are_named_false_and_true():
    splits = splits_from({"text": list("abc"), "label": [True, False, True]}, {"text": ["d"], "label": [False]})
    out, names = encode_labels(splits, TextDataConfig(), regression=False)
    assert names == ["False", "True"]
    assert list(out["train"]["labels"]) == [1, 0, 1] and list(out["eval"]["labels"]) == [0]


def test_text_pairs_get_segment_ids(tokenizer):
    splits = splits_from({"text": ["good movie", "bad"], "second": ["awful", "the product is fine"],
                          "labels": [1, 0]})
    out = tokenize_splits(splits, tokenizer, TextDataConfig(text_pair_column="second", max_length=32))
    for ids, types in zip(out["train"]["input_ids"], out["train"]["token_type_ids"], strict=True):
        assert types[0] == 0 and types[-1] == 1
        assert types.count(1) >= 2  # second text + its [SEP]
        assert types == sorted(types)  # all 0s, then all 1s
        assert ids.count(tokenizer.sep_token_id) == 2


@pytest.fixture(scope="module")
def loaders(sentiment_data, tokenizer):
    cfg = TextDataConfig(train=str(sentiment_data["train"]), eval=str(sentiment_data["eval"]),
                         label_column="sentiment", max_length=16, group_by_length=True)
    raw = load_raw_splits(cfg, seed=0)
    labelled, names = encode_labels(raw, cfg, regression=False)
    tokenized = tokenize_splits(labelled, tokenizer, cfg)
    train, evals = build_dataloaders(tokenized, DataCollatorWithPadding(tokenizer), batch_size=8,
                                     eval_batch_size=5, seed=0, num_processes=1, group_by_length=True)
    return {"raw": raw, "labelled": labelled, "names": names, "train": train, "eval": evals}


def test_loaders_yield_only_model_inputs_and_labels(loaders):
    for name in ("train", "eval"):
        batch = next(iter(loaders[name]))
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}, name
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
        assert batch["labels"].dtype == torch.long


def test_train_loader_covers_the_epoch_once(loaders):
    labels = torch.cat([b["labels"] for b in loaders["train"]]).tolist()
    assert len(labels) == 96
    assert Counter(labels) == Counter(loaders["labelled"]["train"]["labels"])


def test_eval_loader_yields_every_example_once_padded_per_batch(loaders):
    batches = list(loaders["eval"])
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert len(labels) == 17
    assert Counter(labels) == Counter(loaders["labelled"]["eval"]["labels"])
    widths = []
    for batch in batches:
        real = batch["attention_mask"].sum(dim=1)
        assert int(real.max()) == batch["input_ids"].shape[1], "batch padded past its own longest example"
        widths.append(batch["input_ids"].shape[1])
    assert widths == sorted(widths)  # sorted by length: padding stays low
    assert len(set(widths)) > 1


def test_eval_loader_is_the_same_every_pass(loaders):
    first = [b["input_ids"].tolist() for b in loaders["eval"]]
    second = [b["input_ids"].tolist() for b in loaders["eval"]]
    assert first == second


# --- EpochSampler -------------------------------------------------------------------------------------------

def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(100, seed=5), EpochSampler(100, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    order = list(a)
    assert order == list(b) == list(a)
    assert sorted(order) == list(range(100))
    b.set_epoch(3)
    assert list(b) != order
    assert list(EpochSampler(100, seed=6)) != list(EpochSampler(100, seed=5))
    assert len(a) == 100


def padding(order: list[int], lengths: list[int], batch_size: int) -> int:
    total = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        total += max(batch) * len(batch) - sum(batch)
    return total


@pytest.mark.parametrize("batch_size", [2, 8])
def test_grouping_by_length_cuts_padding(batch_size):
    rng = random.Random(0)
    lengths = [rng.randint(2, 100) for _ in range(400)]
    grouped = EpochSampler(400, seed=1, lengths=lengths, global_batch_size=batch_size)
    plain = EpochSampler(400, seed=1, global_batch_size=batch_size)
    grouped_order = list(grouped)
    assert sorted(grouped_order) == list(range(400))
    assert padding(grouped_order, lengths, batch_size) < 0.5 * padding(list(plain), lengths, batch_size)
    assert lengths[grouped_order[0]] == max(lengths), "the longest batch should come first"
    grouped.set_epoch(1)
    assert list(grouped) != grouped_order
    assert sorted(grouped) == list(range(400))


def test_grouped_batches_come_in_shuffled_order_with_a_short_last_batch_last():
    rng = random.Random(2)
    lengths = [rng.randint(2, 100) for _ in range(405)]
    order = list(EpochSampler(405, seed=3, lengths=lengths, global_batch_size=8))
    batches = [order[i:i + 8] for i in range(0, 405, 8)]
    longest = [max(lengths[j] for j in batch) for batch in batches[:-1]]
    assert longest[0] == max(lengths)
    # Not a long-to-short run: later batches are as long as earlier ones on average.
    assert longest != sorted(longest, reverse=True)
    assert abs(sum(longest[:25]) - sum(longest[25:50])) < 0.25 * sum(longest[:50])
    assert len(batches[-1]) == 5 and sorted(order) == list(range(405))


def test_one_process_batch_8_equals_two_processes_batch_4():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    rng = random.Random(1)
    lengths = [rng.randint(2, 100) for _ in range(96)]
    # What build_dataloaders makes for 1 process x 8 and for 2 processes x 4: the same global batch size.
    one = EpochSampler(96, seed=7, lengths=lengths, global_batch_size=8 * 1)
    two = EpochSampler(96, seed=7, lengths=lengths, global_batch_size=4 * 2)
    steps_one = [sorted(b) for b in BatchSampler(one, 8, drop_last=False)]
    shards = [list(BatchSamplerShard(BatchSampler(two, 4, drop_last=False), num_processes=2, process_index=p))
              for p in range(2)]
    steps_two = [sorted(a + b) for a, b in zip(*shards, strict=True)]
    assert len(steps_one) == len(steps_two) == 12
    assert steps_one == steps_two


def test_build_dataloaders_sets_the_global_batch_size(loaders, sentiment_data, tokenizer):
    sampler = loaders["train"].sampler
    assert isinstance(sampler, EpochSampler)
    assert sampler.global_batch_size == 8 and sampler.lengths is not None
