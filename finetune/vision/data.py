"""Image datasets: load, label, preprocess once into uint8 arrays in memory, and batch.

Sources (`data.train`, `data.eval`):
  - `embedded:digits`: scikit-learn's 1,797 8x8 digits (no download; 0..16 scaled to 0..255);
  - a `.npz` file of arrays (N x H x W, N x H x W x C or N x C x H x W; uint8, or float in [0, 1]);
  - MNIST-format idx files (`*-images-idx3-ubyte[.gz]` with their `*-labels-idx1-ubyte[.gz]`), or a folder of them;
  - an image folder (one subfolder per class, optionally under train/ and test/), read with `datasets`;
  - a csv/tsv/json/jsonl/parquet table with an image-path column and a label column;
  - a hub dataset id (needs network).

Every source yields uint8 images first. Images are decoded (and checked) when loaded, never mid-epoch; the
eval-time steps come from `serve.bundle.preprocessing`, the module that export and serving use too.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from finetune.config import check_bounds, check_unique
from finetune.data import (
    EpochSampler,
    check_column_names,
    check_local,
    label_ids,
    load_hub_splits,
    load_table,
    resolve_label_names,
)
from finetune.errors import ConfigError, DataError
from serve.bundle.preprocessing import (
    ImageError,
    PreprocessingSpec,
    as_uint8,
    load_image,
    normalize,
    to_model_pixels_batch,
)

logger = logging.getLogger(__name__)

EMBEDDED_IMAGE_DATASETS = ("digits",)
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val", "eval")


@dataclass
class ImageDataConfig:
    """Where the images are, how they are labelled, and the preprocessing that the model is trained with."""

    train: str = "embedded:digits"  # embedded:digits, .npz, idx(.gz) file or folder, image folder, table, hub id
    # Same kinds as train (its test split if it has one); for a hub dataset, a split name. None: train's own
    # test split, else a held-out eval_fraction of train.
    eval: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_fraction: float = 0.2
    image_column: str = "image"  # tables: image paths (relative to the table's folder); hub datasets: images
    label_column: str = "label"
    label_names: list[str] | None = None  # fixes the label order; default: sorted names, or "0", "1", ... for ids
    npz_train_keys: list[str] = field(default_factory=lambda: ["x_train", "y_train"])  # images, labels
    npz_eval_keys: list[str] = field(default_factory=lambda: ["x_test", "y_test"])
    bad_images: Literal["error", "skip"] = "error"  # an unreadable image file: stop naming it, or skip with a warning
    column_names: list[str] | None = None  # a csv / tsv table without a header row: its columns' names, in order
    max_train_samples: int | None = None  # a random subset (fixed by the seed), for quick runs
    max_eval_samples: int | None = None
    # Preprocessing (saved with the model; None: the pretrained model's, else taken from the train images).
    image_size: list[int] | None = None  # [height, width]; default: the train images' own size
    color_mode: Literal["L", "RGB"] | None = None  # default: L when every train image is grayscale, else RGB
    mean: list[float] | None = None  # per channel, of pixels scaled to [0, 1]; default: measured on train
    std: list[float] | None = None
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] | None = None  # default: bilinear

    def __post_init__(self) -> None:
        check_bounds(self, "in (0, 1)", "eval_fraction")
        check_bounds(self, ">= 1", "max_train_samples", "max_eval_samples")
        check_bounds(self, "> 0", "std")
        check_unique(self.label_names, "label_names")
        check_column_names(self.column_names)
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image_size must be [height, width], got {self.image_size}")
        for name in ("npz_train_keys", "npz_eval_keys"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} must name two arrays, [images, labels], got {getattr(self, name)}")


@dataclass
class ImageSet:
    """Images and integer labels of one split.

    Loaded: `images` is a uint8 array [N, H, W] or [N, H, W, C], or a list of decoded Pillow images.
    Prepared: uint8 [N, C, H, W] at the model's size and color mode (what `normalize` turns into pixel_values).
    """

    images: np.ndarray | list[Image.Image]
    labels: np.ndarray  # int64 [N], ids into the label names

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSet:
        images = self.images[indices] if isinstance(self.images, np.ndarray) else [self.images[i] for i in indices]
        return ImageSet(images, self.labels[indices])


# --- loading --------------------------------------------------------------------------------------------------

Loaded = tuple[np.ndarray | list[Image.Image], list[Any]]  # images and raw label values of one split


def load_image_splits(cfg: ImageDataConfig, *, seed: int,
                      num_labels: int | None = None) -> tuple[dict[str, ImageSet], list[str]]:
    """{"train": ..., "eval": ...} as loaded uint8 images with label ids, and the label names in id order."""
    train_src, eval_src = cfg.train, cfg.eval
    if _is_hub_id(train_src):
        train_ds, eval_ds = load_hub_splits(train_src, eval_src, hub_config=cfg.hub_config, train_split=cfg.train_split)
        raw = {"train": _decode_rows(train_ds, cfg, None, "train")}
        if eval_ds is not None:  # else held out below
            raw["eval"] = _decode_rows(eval_ds, cfg, None, "eval")
    else:
        train_splits = _load_source(train_src, cfg, "data.train")
        raw = {"train": _pick(train_splits, ("train",), train_src)}
        if eval_src:  # its test split, or all of it
            raw["eval"] = _pick(_load_source(eval_src, cfg, "data.eval"), (*EVAL_SPLIT_NAMES, "train"), eval_src)
        elif len(train_splits) > 1 and any(name in train_splits for name in EVAL_SPLIT_NAMES):
            raw["eval"] = _pick(train_splits, EVAL_SPLIT_NAMES, train_src)

    train_values = raw["train"][1]
    names = resolve_label_names(list(dict.fromkeys(train_values)), label_names=cfg.label_names, num_labels=num_labels,
                                column=cfg.label_column)
    splits = {name: ImageSet(imgs, np.asarray(label_ids(vals, names, split=name), dtype=np.int64))
              for name, (imgs, vals) in raw.items()}
    if "eval" not in splits:
        splits["train"], splits["eval"] = _hold_out(splits["train"], cfg.eval_fraction, seed)
    for name, limit in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if len(splits[name]) == 0:
            raise DataError(f"the {name} split of {cfg.train!r} holds no images; point data.{name} at images")
        if limit is not None and limit < len(splits[name]):
            pick = np.sort(np.random.default_rng(seed).permutation(len(splits[name]))[:limit])
            splits[name] = splits[name].subset(pick)
    return splits, names


def _load_source(source: str, cfg: ImageDataConfig, key: str) -> dict[str, Loaded]:
    """Every split one local source holds, by name ("train", "test", ...)."""
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        if name not in EMBEDDED_IMAGE_DATASETS:
            raise DataError(f"no embedded image dataset {name!r}; embedded: {', '.join(EMBEDDED_IMAGE_DATASETS)}")
        return {"train": _load_digits()}
    check_local(source, key)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{key} {source!r} does not exist; fix {key} (paths are relative to {Path.cwd()})")
    if path.suffix == ".npz":
        return _load_npz(path, cfg)
    if _is_idx(path) or (path.is_dir() and any(_is_idx(p) for p in path.iterdir())):
        return _load_idx(path)
    if path.suffix.lower() in TABLE_SUFFIXES or (path.is_dir() and any(
            p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith("metadata") for p in path.iterdir())):
        table = load_table(str(path), column_names=cfg.column_names)
        return {"train": _decode_rows(table, cfg, path if path.is_dir() else path.parent, "train")}
    if path.is_dir():
        return _load_image_folder(path, cfg)
    raise DataError(f"cannot read {key} {source!r}: expected embedded:digits, a .npz file, idx(.gz) files, an image "
                    f"folder or a table ({', '.join(TABLE_SUFFIXES)})")


def _pick(splits: dict[str, Loaded], names: Sequence[str], source: str) -> Loaded:
    """The first of `names` that `splits` has, else its only split."""
    for name in names:
        if name in splits:
            return splits[name]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise DataError(f"{source!r} has no {names[0]} split (splits: {', '.join(splits)})")


def _is_hub_id(source: str) -> bool:
    looks_local = source.startswith((".", "/", "~", "embedded:")) or Path(source).suffix != ""
    return not looks_local and not Path(source).expanduser().exists()


def _load_digits() -> Loaded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8, values 0..16 -> 0..255
    return images, digits.target.tolist()


def _load_npz(path: Path, cfg: ImageDataConfig) -> dict[str, Loaded]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {str(path)!r} as a numpy .npz file ({err})") from None
    with arrays:
        keys = {"train": cfg.npz_train_keys, "test": cfg.npz_eval_keys}
        found = {split: pair for split, pair in keys.items() if all(k in arrays.files for k in pair)}
        if "train" not in found and len(found) == 0:
            raise DataError(f"{str(path)!r} has none of the arrays {cfg.npz_train_keys} or {cfg.npz_eval_keys} "
                            f"(arrays: {', '.join(arrays.files)}); set data.npz_train_keys / data.npz_eval_keys")
        out = {}
        for split, (x_key, y_key) in found.items():
            images, labels = _images_array(arrays[x_key], f"{path.name}:{x_key}"), arrays[y_key]
            if labels.ndim != 1 or len(labels) != len(images):
                raise DataError(f"{path.name}:{y_key} must be one label per image ({len(images)}), got shape "
                                f"{labels.shape}; store class ids, not one-hot rows")
            out[split] = (images, labels.tolist())
        return out


def _images_array(array: np.ndarray, what: str) -> np.ndarray:
    """N x H x W, N x H x W x C or N x C x H x W (C in 1, 3) -> uint8 N x H x W (x C)."""
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[3] not in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3, 4)):
        raise DataError(f"{what} has shape {array.shape}; images must be N x H x W, N x H x W x C or "
                        "N x C x H x W (reshape flat rows to their height and width)")
    try:
        return as_uint8(array)
    except ImageError as err:
        raise DataError(f"{what}: {err}") from None


def _is_idx(path: Path) -> bool:
    return path.is_file() and any(tag in path.name for tag in ("idx1", "idx3"))


def _read_idx(path: Path) -> np.ndarray:
    """One idx file (http://yann.lecun.com/exdb/mnist/ format): magic 0 0 dtype ndim, big-endian int32 dims, data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an unsigned-byte idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).tolist()
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{str(path)!r} is truncated: its header says {dims} ({int(np.prod(dims))} values), "
                        f"the file holds {data.size}")
    return data.reshape(dims)


def _load_idx(path: Path) -> dict[str, Loaded]:
    image_files = [path] if path.is_file() else sorted(p for p in path.iterdir() if _is_idx(p) and "idx3" in p.name)
    out: dict[str, Loaded] = {}
    for image_file in image_files:
        label_file = image_file.with_name(image_file.name.replace("images", "labels").replace("idx3", "idx1"))
        if "idx3" not in image_file.name or not label_file.is_file():
            raise DataError(f"no labels for {str(image_file)!r}: expected {label_file.name} next to it "
                            "(point data.train at the *-images-idx3-ubyte file or its folder)")
        images, labels = _read_idx(image_file), _read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{image_file.name} ({images.shape}) and {label_file.name} ({labels.shape}) do not "
                            "hold N images and N labels")
        split = "test" if image_file.name.startswith(("t10k", "test")) else "train"
        if split in out:
            raise DataError(f"{str(path)!r} holds more than one {split} idx file; point data.train at one file")
        out[split] = (images, labels.tolist())
    return out


def _load_image_folder(path: Path, cfg: ImageDataConfig) -> dict[str, Loaded]:
    import datasets

    known = set(Image.registered_extensions())
    ignored = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in known
               and not p.name.startswith(("metadata.", "."))]
    if ignored:
        logger.warning("ignored %d file(s) in %s that are not images: %s", len(ignored), path,
                       ", ".join(str(p.relative_to(path)) for p in ignored[:5]))
    try:
        dsd = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as err:  # datasets raises several types for empty or malformed folders
        raise DataError(f"cannot read image folder {str(path)!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0]}); it needs one subfolder of images per class") from None
    return {split: _decode_rows(ds, cfg, None, split) for split, ds in dsd.items()}


def _decode_rows(ds: Any, cfg: ImageDataConfig, base: Path | None, split: str) -> Loaded:
    """Decode every image of a `datasets.Dataset` now (bad ones: error or skip, per data.bad_images)."""
    import datasets

    for column in (cfg.image_column, cfg.label_column):
        if column not in ds.column_names:
            key = "data.image_column" if column == cfg.image_column else "data.label_column"
            hint = "; an image folder needs one subfolder per class" if column == "label" and base is None else ""
            raise DataError(f"column {column!r} not found in the {split} split "
                            f"(columns: {', '.join(ds.column_names)}); set {key}{hint}")
    feature = ds.features[cfg.label_column]
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    images, labels, bad = [], [], []
    for row in ds:
        source = row[cfg.image_column]
        if isinstance(source, dict):  # datasets' Image(decode=False): {"path": ..., "bytes": ...}
            source = source["bytes"] or source["path"]
        elif isinstance(source, str) and base is not None:
            source = str(base / source)
        try:
            images.append(load_image(source))
        except ImageError as err:
            bad.append(str(err))
            continue
        label = row[cfg.label_column]
        labels.append(names[label] if names is not None and isinstance(label, int) else label)
    if bad and cfg.bad_images == "error":
        raise DataError(f"{len(bad)} unreadable image(s) in the {split} split, first: {bad[0]}; remove them or set "
                        "data.bad_images=skip")
    if bad:
        logger.warning("skipped %d unreadable image(s) in the %s split: %s", len(bad), split, "; ".join(bad[:3]))
    return images, labels


def _hold_out(split: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    if len(split) < 2:
        raise DataError(f"cannot hold out an eval split from {len(split)} image(s); add images or set data.eval")
    order = np.random.default_rng(seed).permutation(len(split))
    n_eval = max(1, round(fraction * len(split)))
    return split.subset(np.sort(order[n_eval:])), split.subset(np.sort(order[:n_eval]))


# --- preprocessing ---------------------------------------------------------------------------------------------

def resolve_preprocessing(cfg: ImageDataConfig, train: ImageSet,
                          pretrained: dict[str, Any] | None = None) -> PreprocessingSpec:
    """The spec the model trains with: data.* settings, else the pretrained model's, else the train images'.

    Mean and std left unset are measured on the train images after resizing (per channel, in [0, 1] units).
    """
    pretrained = pretrained or {}
    size = cfg.image_size or pretrained.get("size") or _native_size(train.images)
    color_mode = cfg.color_mode or pretrained.get("color_mode") or _native_color_mode(train.images)
    provisional = PreprocessingSpec(size=size, color_mode=color_mode, mean=[0.0] * (1 if color_mode == "L" else 3),
                                    std=[1.0] * (1 if color_mode == "L" else 3),
                                    resample=cfg.resample or pretrained.get("resample") or "bilinear",
                                    rescale=pretrained.get("rescale", 1 / 255))
    mean, std = cfg.mean or pretrained.get("mean"), cfg.std or pretrained.get("std")
    if mean is None or std is None:
        pixels = to_model_pixels_batch(train.images, provisional)
        measured_mean, measured_std = _channel_stats(pixels, provisional.rescale)
        mean, std = mean or measured_mean, std or measured_std
    try:
        return PreprocessingSpec(size=provisional.size, color_mode=color_mode, mean=mean, std=std,
                                 resample=provisional.resample, rescale=provisional.rescale)
    except ValueError as err:
        raise ConfigError(f"data preprocessing settings: {err}") from None


def _native_size(images: np.ndarray | list[Image.Image]) -> list[int]:
    if isinstance(images, np.ndarray):
        return list(images.shape[1:3])
    sizes = {(img.height, img.width) for img in images}
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise DataError(f"the train images have {len(sizes)} different sizes ({shown}, ...); set "
                        "data.image_size=[height, width] to resize them all")
    return list(sizes.pop())


def _native_color_mode(images: np.ndarray | list[Image.Image]) -> Literal["L", "RGB"]:
    if isinstance(images, np.ndarray):
        return "L" if images.ndim == 3 or images.shape[3] == 1 else "RGB"
    return "L" if all(img.mode in ("1", "L", "LA", "I", "I;16", "F") for img in images) else "RGB"


def _channel_stats(pixels: np.ndarray, rescale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 [N, C, H, W] pixels after rescaling, rounded to 4 decimals."""
    flat = pixels.transpose(1, 0, 2, 3).reshape(pixels.shape[1], -1)
    mean = flat.mean(axis=1, dtype=np.float64) * rescale
    std = flat.std(axis=1, dtype=np.float64) * rescale
    return [round(float(m), 4) for m in mean], [round(float(s), 4) if s > 0 else 1.0 for s in std]


def prepare_images(splits: dict[str, ImageSet], spec: PreprocessingSpec) -> dict[str, ImageSet]:
    """Every split at the model's size and color mode: uint8 [N, C, H, W] (the deterministic eval-time steps)."""
    return {name: ImageSet(to_model_pixels_batch(split.images, spec), split.labels) for name, split in splits.items()}


# --- batching --------------------------------------------------------------------------------------------------

class ImageArrayDataset(torch.utils.data.Dataset):
    """Prepared uint8 images in memory; a batch is gathered with one index and normalised as a whole.

    `__getitems__` lets the DataLoader fetch a whole batch at once (no per-image Python work), so feeding the
    model costs far less than a training step even for MNIST-sized images. `extras`: more per-image arrays that
    batches carry under their names (e.g. a teacher's cached logits for distillation).
    """

    def __init__(self, split: ImageSet, spec: PreprocessingSpec, extras: dict[str, np.ndarray] | None = None):
        self.pixels = split.images
        self.labels = split.labels
        self.spec = spec
        self.extras = extras or {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = np.asarray(indices)
        return {"pixel_values": torch.from_numpy(normalize(self.pixels[index], self.spec)),
                "labels": torch.from_numpy(self.labels[index]),
                **{name: torch.from_numpy(values[index]) for name, values in self.extras.items()}}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.__getitems__([index])
        return {k: v[0] for k, v in item.items()}


def _batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collate function for `ImageArrayDataset.__getitems__`, which already returns a batch."""
    return batch


def build_image_dataloaders(splits: dict[str, ImageSet], spec: PreprocessingSpec, *, batch_size: int,
                            eval_batch_size: int, seed: int, num_processes: int,
                            train_extras: dict[str, np.ndarray] | None = None) -> tuple[Any, Any]:
    """Train loader (shuffled by (seed, epoch), so a resumed run sees the same batches) and eval loader (in order);
    `train_extras`: per-image arrays of the train split that its batches carry too."""
    from torch.utils.data import DataLoader

    train = ImageArrayDataset(splits["train"], spec, train_extras)
    sampler = EpochSampler(len(train), seed=seed, global_batch_size=batch_size * num_processes)
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, collate_fn=_batched,
                              generator=torch.Generator().manual_seed(seed))
    eval_loader = DataLoader(ImageArrayDataset(splits["eval"], spec), batch_size=eval_batch_size, shuffle=False,
                             collate_fn=_batched)
    return train_loader, eval_loader
