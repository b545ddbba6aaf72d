"""Datasets of every task: load (embedded, local csv/tsv/txt/json/jsonl/parquet, or hub id), hold out, subsample,
label names and ids, and the epoch sampler / loaders. Task-specific steps live in text/, lm/ and vision/.

Sources, in the order they are tried:
  - `embedded:NAME`: a dataset that ships in this package (`finetune/datasets/NAME/{train,test}.csv` or `.jsonl`);
  - a local file or a folder of files (read with `datasets`' packaged builders; a .txt file is one row, `text`);
  - a hub dataset id (needs network; fails fast with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Sampler

from finetune.config import check_bounds, check_unique
from finetune.errors import DataError

logger = logging.getLogger(__name__)

EMBEDDED_DATASETS = Path(__file__).parent / "datasets"
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class DataSourceConfig:
    """Where a dataset is: the train source, an optional eval source, and how to read and subsample them."""

    train: str = ""  # embedded:NAME, a local file / folder, or a hub dataset id
    # A local file, or a split name of `train`'s hub dataset; None: its test split or a part of train held out.
    eval: str | None = None
    hub_config: str | None = None  # the hub dataset's config name (e.g. "sst2" of "nyu-mll/glue")
    train_split: str = "train"
    eval_fraction: float = 0.1  # held out of train when no eval split exists
    # A random subset of the training examples (fixed by the seed), for quick runs and benchmarks.
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    quoting: Literal["auto", "minimal", "none"] = "auto"  # csv quoting; auto: none for .tsv, minimal for .csv
    # A csv / tsv without a header row (e.g. the original AG News files): the names of its columns, in order.
    column_names: list[str] | None = None

    def __post_init__(self) -> None:
        check_bounds(self, "in (0, 1)", "eval_fraction")
        check_bounds(self, ">= 1", "max_train_samples", "max_eval_samples")
        check_column_names(self.column_names)


def load_splits(cfg: DataSourceConfig) -> dict[str, Any]:
    """The train split and the eval split named by `cfg` (None when the source has none): {"train", "eval"}."""
    train_src = cfg.train
    eval_src = cfg.eval
    if train_src.startswith("embedded:"):
        train_src, eval_src = _embedded_files(train_src.split(":", 1)[1], eval_src)

    check_local(train_src, "data.train")
    if eval_src is not None:
        check_local(eval_src, "data.eval")
    if Path(train_src).exists():
        train = load_table(train_src, cfg.quoting, column_names=cfg.column_names)
        if eval_src is not None and Path(eval_src).exists():
            evals = load_table(eval_src, cfg.quoting, column_names=cfg.column_names)
        elif eval_src is not None:
            raise DataError(f"eval file {eval_src!r} not found; set data.eval to an existing file or leave it empty "
                            "to hold out data.eval_fraction of train")
        else:
            evals = None
    else:
        train, evals = load_hub_splits(train_src, eval_src, hub_config=cfg.hub_config,
                                       train_split=cfg.train_split)

    for name, ds in (("train", train), ("eval", evals)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {name} split of {cfg.train!r} is empty; point data.{name} at a file with rows")
    return {"train": train, "eval": evals}


def subsample(splits: dict[str, Any], cfg: DataSourceConfig, seed: int) -> dict[str, Any]:
    """Apply `max_train_samples` / `max_eval_samples`: a random subset of each split, fixed by the seed."""
    out = dict(splits)
    for name, limit in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if limit is not None and limit < len(out[name]):
            out[name] = out[name].shuffle(seed=seed).select(range(limit))
    return out


def require_columns(splits: dict[str, Any], columns: dict[str, str]) -> None:
    """Each split must have every column of `columns` (column name -> the config key that names it)."""
    for name, ds in splits.items():
        for column, key in columns.items():
            if ds is not None and column not in ds.column_names:
                raise DataError(f"column {column!r} not found in the {name} split "
                                f"(columns: {', '.join(ds.column_names)}); set {key}")


def _embedded_files(name: str, eval_src: str | None) -> tuple[str, str | None]:
    """The train (and, unless `eval_src` is set, test) file of the dataset that ships as `datasets/NAME/`."""
    def split_file(folder: Path, split: str) -> Path | None:
        return next((p for p in sorted(folder.glob(f"{split}.*")) if p.suffix in _BUILDERS), None)

    train = split_file(EMBEDDED_DATASETS / name, "train")
    if train is None:
        known = sorted(p.name for p in EMBEDDED_DATASETS.iterdir() if split_file(p, "train"))
        raise DataError(f"no embedded dataset {name!r}; embedded datasets: {', '.join(known)}")
    test = split_file(EMBEDDED_DATASETS / name, "test")
    return str(train), eval_src or (str(test) if test else None)


def check_local(source: str, key: str) -> None:
    """A source that looks like a file path (not a hub id or split name) must exist."""
    if not source.strip():
        raise DataError(f"{key} is empty; set it to a data file, a folder of them, or a hub dataset id")
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _BUILDERS
    if looks_local and not Path(source).expanduser().exists():
        raise DataError(f"data file {source!r} does not exist; fix {key} (paths are relative to {Path.cwd()})")


def check_column_names(names: list[str] | None) -> None:
    """data.column_names, when set, names each column once."""
    if names is not None and (not names or any(not str(n).strip() for n in names)):
        raise ValueError(f"column_names must name every column of a headerless csv / tsv, got {names}")
    check_unique(names, "column_names")


def load_table(path: str, quoting: str = "auto", *, column_names: list[str] | None = None) -> Any:
    """A local csv/tsv/txt/json/jsonl/parquet file (or a folder of them) as one `datasets.Dataset`; `column_names`
    reads a csv / tsv without a header row (its first row is data)."""
    import datasets

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _BUILDERS)
        if not files:
            raise DataError(f"folder {path!r} holds no data files ({', '.join(_BUILDERS)}); point at a file instead")
        suffix = files[0].suffix
        data_files = [str(f) for f in files if f.suffix == suffix]
    else:
        suffix = p.suffix.lower()
        data_files = [str(p)]
    if suffix not in _BUILDERS:
        raise DataError(f"cannot read {path!r}: unknown extension {suffix!r}; use one of {', '.join(_BUILDERS)}")
    builder = _BUILDERS[suffix]
    if p.is_file() and p.stat().st_size == 0:
        what = "some text" if builder == "text" else "a header row and at least one data row"
        raise DataError(f"{path!r} is empty; it needs {what}")
    kwargs: dict[str, Any] = {}
    if builder == "text":  # one row per file, line breaks kept: a text file is one document
        kwargs["sample_by"] = "document"
    if column_names is not None:
        if builder != "csv":
            raise DataError(f"data.column_names names the columns of a headerless csv / tsv, but {path!r} is "
                            f"{suffix}; remove data.column_names")
        kwargs["column_names"] = list(column_names)
    if builder == "csv":
        kwargs["delimiter"] = "\t" if suffix == ".tsv" else ","
        no_quoting = quoting == "none" or (quoting == "auto" and suffix == ".tsv")
        kwargs["quoting"] = csv.QUOTE_NONE if no_quoting else csv.QUOTE_MINIMAL
    try:
        return datasets.load_dataset(builder, data_files=data_files, split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        cause = err.__cause__ or err
        if "corresponds to no data" in str(cause):  # a header row and nothing else
            raise DataError(f"{path!r} is empty: it has a header row but no data rows; add rows") from None
        raise DataError(f"cannot parse {path!r} as {suffix} ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
                        "check the file's format") from None


def load_hub_splits(dataset_id: str, eval_split: str | None, *, hub_config: str | None,
                    train_split: str) -> tuple[Any, Any]:
    """Train and eval splits of a hub dataset: `eval_split`, else its validation or test split, else None."""
    import datasets

    try:
        dsd = datasets.load_dataset(dataset_id, hub_config)
    except Exception as err:
        why = (str(err).splitlines() or [""])[0][:300]
        raise DataError(f"data.train {dataset_id!r} is not a local file or folder, and loading it from the hub "
                        f"failed ({type(err).__name__}: {why}); check the path (and data.hub_config), or go online "
                        "for a hub dataset") from None
    if train_split not in dsd:
        raise DataError(f"{dataset_id!r} has no split {train_split!r} (splits: {', '.join(dsd)}); "
                        "set data.train_split")
    train = dsd[train_split]
    if eval_split is None:
        eval_split = next((s for s in ("validation", "test") if s in dsd), None)
    if eval_split is None:
        return train, None
    if eval_split not in dsd:
        raise DataError(f"{dataset_id!r} has no split {eval_split!r} (splits: {', '.join(dsd)}); set data.eval")
    return train, dsd[eval_split]


def hold_out(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split rows at random (fixed by the seed) into (train, eval), `fraction` of them in eval."""
    if len(ds) < 2:
        raise DataError(f"cannot hold out an eval split from {len(ds)} row(s); add rows or set data.eval")
    parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def resolve_label_names(train_values: Sequence[Any], *, label_names: Sequence[str] | None, num_labels: int | None,
                        column: str) -> list[str]:
    """The label names, in id order, for the distinct labels of the train split (strings or integers >= 0).

    String labels: `label_names` order, default sorted. Integer labels: `label_names`, default "0", "1", ...
    (as many as `num_labels` or the largest label + 1). `num_labels`, when given, must match.
    """
    if any(v is None for v in train_values):
        raise DataError(f"the train split has empty labels in column {column!r}; fill or drop those rows")
    if all(isinstance(v, bool) for v in train_values):  # a true/false column: the names "False" and "True"
        train_values = [str(v) for v in train_values]
    if all(isinstance(v, str) for v in train_values):
        names = list(label_names) if label_names else sorted(train_values)
        unknown = sorted(set(train_values) - set(names))
        if unknown:
            raise DataError(f"labels {unknown} are not in data.label_names {names}; add them or fix the data")
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in train_values):
        if min(train_values) < 0:
            raise DataError(f"integer labels must be >= 0, found {min(train_values)} in column {column!r}")
        count = max(len(label_names or []), num_labels or 0, max(train_values) + 1)
        names = list(label_names) if label_names else [str(i) for i in range(count)]
        if max(train_values) >= len(names):
            raise DataError(f"label {max(train_values)} is out of range for {len(names)} label names; "
                            "fix data.label_names")
    else:
        raise DataError(f"column {column!r} holds {sorted({type(v).__name__ for v in train_values})} "
                        "values; classification needs strings or integers (for numbers, set task: regression)")
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"the data has {len(names)} labels ({', '.join(names)}) but model.num_labels is "
                        f"{num_labels}; set model.num_labels to {len(names)} or leave it empty")
    return names


def label_ids(values: Sequence[Any], names: Sequence[str], *, split: str) -> list[int]:
    """Label values (names, or integer ids into `names`) -> ids; an unknown label is a DataError naming the split."""
    to_id = {name: i for i, name in enumerate(names)}
    ids = []
    for v in values:
        if isinstance(v, bool):
            v = str(v)
        key = v if isinstance(v, str) else (names[v] if isinstance(v, int) and 0 <= v < len(names) else None)
        if key not in to_id:
            raise DataError(f"label {v!r} in the {split} split is not one of the train labels {list(names)}; "
                            "fix the data or set data.label_names")
        ids.append(to_id[key])
    return ids


def is_number(v: Any) -> bool:
    """Whether `v` reads as a number (a regression target, a numeric label)."""
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches.

    With `lengths`, indices are grouped by length: shuffled, cut into megabatches of 50 global batches, each sorted
    longest first (as transformers' LengthGroupedSampler), so batches pad little; then, unlike that sampler, the
    order of the batches is shuffled too (the longest first, so an out-of-memory shows at step 1). Sorted runs of
    batches train long-to-short: the last steps of a short run saw only the shortest texts, which cost SST-2 about a
    point of test accuracy. `global_batch_size` is the batch size summed over processes, so 1 process x 8 and
    2 processes x 4 see the same examples per step.
    """

    def __init__(self, size: int, *, seed: int, lengths: Sequence[int] | None = None, global_batch_size: int = 1):
        self.size = size
        self.seed = seed
        self.lengths = lengths
        self.global_batch_size = global_batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        size, mega = self.global_batch_size, 50 * self.global_batch_size
        chunks = [sorted(order[i:i + mega], key=lambda j: -self.lengths[j]) for i in range(0, self.size, mega)]
        batches = [chunk[i:i + size] for chunk in chunks for i in range(0, len(chunk), size)]
        tail = batches.pop() if batches and len(batches[-1]) < size else []  # a short batch stays last
        batches = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([i for batch in [*batches, tail] for i in batch])


def build_dataloaders(tokenized: dict[str, Any], collate_fn: Callable[[list[dict]], dict[str, Any]], *,
                      batch_size: int, eval_batch_size: int, seed: int, num_processes: int,
                      group_by_length: bool = False) -> tuple[Any, Any]:
    """Train loader (deterministic shuffle, optional length grouping) and eval loader (length-sorted, no shuffle).

    Each split needs a `length` column (tokens per example); `collate_fn` pads a list of examples into a batch.
    """
    from torch.utils.data import DataLoader

    train = tokenized["train"]
    sampler = EpochSampler(len(train), seed=seed, lengths=list(train["length"]) if group_by_length else None,
                           global_batch_size=batch_size * num_processes)
    train_loader = DataLoader(train.remove_columns("length"), batch_size=batch_size, sampler=sampler,
                              collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
    evals = tokenized["eval"]
    # Sorting eval by length keeps padding (and time) low; metrics do not depend on order.
    eval_lengths = list(evals["length"])
    eval_order = sorted(range(len(eval_lengths)), key=eval_lengths.__getitem__)
    eval_loader = DataLoader(evals.select(eval_order).remove_columns("length"), batch_size=eval_batch_size,
                             shuffle=False, collate_fn=collate_fn)
    return train_loader, eval_loader
