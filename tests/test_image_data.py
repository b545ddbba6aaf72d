"""finetune.vision.data and finetune.vision.augment: every loader, labels, preprocessing, batches, augmentation."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHAPES, make_shape_images
from PIL import Image

from finetune.errors import ConfigError, DataError
from finetune.vision.augment import AugmentConfig, BatchAugmenter
from finetune.vision.data import (
    ImageDataConfig,
    ImageSet,
    build_image_dataloaders,
    load_image_splits,
    prepare_images,
    resolve_preprocessing,
)
from serve.bundle.preprocessing import PreprocessingSpec, preprocess


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An unsigned-byte idx file (MNIST format), gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train/ and test/ with one subfolder per shape (RGB PNGs of two sizes), a corrupt .png and a text file."""
    root = tmp_path / "shapes"
    for split, count, seed in (("train", 24, 5), ("test", 9, 6)):
        images, labels = make_shape_images(count, seed=seed, rgb=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / SHAPES[label]
            folder.mkdir(parents=True, exist_ok=True)
            # Every third image larger: a resize is part of the pipeline under test.
            pil = Image.fromarray(image)
            (pil.resize((18, 15)) if i % 3 == 0 else pil).save(folder / f"{i}.png")
    (root / "train" / "box" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "train" / "bar" / "notes.txt").write_text("collected on Tuesday")
    return root


# --- loaders -----------------------------------------------------------------------------------------------------

def test_digits_is_embedded_with_a_held_out_eval_split():
    splits, names = load_image_splits(ImageDataConfig(), seed=0)
    assert names == [str(i) for i in range(10)]
    assert len(splits["train"]) + len(splits["eval"]) == 1797 and len(splits["eval"]) == round(0.2 * 1797)
    images = splits["train"].images
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8) and images.max() == 255
    again, _ = load_image_splits(ImageDataConfig(), seed=0)
    np.testing.assert_array_equal(again["eval"].labels, splits["eval"].labels)  # the seed fixes the hold-out


def test_npz_train_and_test_arrays(shape_npz):
    splits, names = load_image_splits(ImageDataConfig(train=str(shape_npz), label_names=SHAPES), seed=0)
    assert names == SHAPES
    assert len(splits["train"]) == 48 and len(splits["eval"]) == 17
    x = np.load(shape_npz)
    np.testing.assert_array_equal(splits["eval"].images, x["x_test"])
    np.testing.assert_array_equal(splits["eval"].labels, x["y_test"])


def test_npz_custom_keys_channels_first_floats_and_string_labels(tmp_path):
    images, labels = make_shape_images(12, seed=0, rgb=True)
    path = tmp_path / "custom.npz"
    np.savez(path, imgs=images.transpose(0, 3, 1, 2) / 255.0, names=np.array(SHAPES)[labels])
    cfg = ImageDataConfig(train=str(path), npz_train_keys=["imgs", "names"], eval_fraction=0.25)
    splits, names = load_image_splits(cfg, seed=0)
    assert names == sorted(SHAPES)  # string labels: sorted
    assert len(splits["eval"]) == 3 and splits["train"].images.shape[1:] == (12, 12, 3)
    merged = np.concatenate([splits["train"].images, splits["eval"].images])
    assert merged.dtype == np.uint8 and sorted(merged.sum(axis=(1, 2, 3))) == sorted(images.sum(axis=(1, 2, 3)))


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((4, 8, 8), np.uint8)}, "has none of the arrays"),
    ({"x_train": np.zeros((4, 64), np.uint8), "y_train": np.zeros(4, np.int64)}, "reshape flat rows"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros((4, 10))}, "not one-hot"),
    ({"x_train": np.full((4, 8, 8), 2.0), "y_train": np.zeros(4, np.int64)}, r"values must lie in \[0, 1\]"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_image_splits(ImageDataConfig(train=str(path)), seed=0)


def test_idx_folder_gz_and_plain_files(tmp_path):
    train_x, train_y = make_shape_images(15, seed=0)
    test_x, test_y = make_shape_images(6, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y)
    splits, names = load_image_splits(ImageDataConfig(train=str(tmp_path)), seed=0)
    assert names == ["0", "1", "2"]
    np.testing.assert_array_equal(splits["train"].images, train_x)
    np.testing.assert_array_equal(splits["eval"].labels, test_y)
    # One images file: its labels file is found next to it; the eval split is held out.
    single, _ = load_image_splits(ImageDataConfig(train=str(tmp_path / "t10k-images-idx3-ubyte"), eval_fraction=0.5),
                                  seed=0)
    assert len(single["train"]) == len(single["eval"]) == 3


def test_idx_errors(tmp_path):
    images = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="expected a-labels-idx1-ubyte next to it"):
        load_image_splits(ImageDataConfig(train=str(images)), seed=0)
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros(3, np.uint8))
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DataError, match="is truncated"):
        load_image_splits(ImageDataConfig(train=str(images)), seed=0)
    images.write_bytes(b"\x00\x00\x0d\x03" + images.read_bytes()[4:])
    with pytest.raises(DataError, match="bad magic number"):
        load_image_splits(ImageDataConfig(train=str(images)), seed=0)


def test_image_folder_with_a_corrupt_image_fails_up_front_naming_it(image_folder):
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) in the train split, first: cannot read image "
                                        r".*broken.png.*set data.bad_images=skip"):
        load_image_splits(ImageDataConfig(train=str(image_folder)), seed=0)


def test_image_folder_skips_bad_files_with_warnings(image_folder, caplog):
    cfg = ImageDataConfig(train=str(image_folder), bad_images="skip")
    with caplog.at_level(logging.WARNING):
        splits, names = load_image_splits(cfg, seed=0)
    assert names == sorted(SHAPES)  # class folders, sorted
    assert len(splits["train"]) == 24 and len(splits["eval"]) == 9  # train/ and test/ subfolders are the splits
    assert "skipped 1 unreadable image(s) in the train split" in caplog.text and "broken.png" in caplog.text
    assert "ignored 1 file(s)" in caplog.text and "notes.txt" in caplog.text
    assert {img.size for img in splits["train"].images} == {(12, 12), (18, 15)}
    with pytest.raises(DataError, match=r"different sizes .* set data.image_size"):
        resolve_preprocessing(cfg, splits["train"])


def test_image_folder_without_class_subfolders(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="needs one subfolder per class"):
        load_image_splits(ImageDataConfig(train=str(tmp_path)), seed=0)


def test_csv_of_paths_and_labels(tmp_path):
    images, labels = make_shape_images(9, seed=7)
    (tmp_path / "img").mkdir()
    rows = ["file,shape"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{SHAPES[label]}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = ImageDataConfig(train=str(tmp_path / "train.csv"), eval=str(tmp_path / "train.csv"), image_column="file",
                          label_column="shape", label_names=SHAPES)
    splits, names = load_image_splits(cfg, seed=0)
    assert names == SHAPES and len(splits["eval"]) == 9
    np.testing.assert_array_equal(splits["eval"].labels, labels)
    np.testing.assert_array_equal(np.asarray(splits["eval"].images[4]), images[4])
    with pytest.raises(DataError, match=r"column 'image' not found in the train split \(columns: file, shape\); "
                                        "set data.image_column"):
        load_image_splits(ImageDataConfig(train=str(tmp_path / "train.csv"), label_column="shape"), seed=0)


def test_headerless_csv_of_paths_and_labels_with_column_names(tmp_path):
    images, labels = make_shape_images(6, seed=8)
    (tmp_path / "img").mkdir()
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{SHAPES[label]}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")  # no header row: the first row is an image
    cfg = ImageDataConfig(train=str(tmp_path / "train.csv"), eval=str(tmp_path / "train.csv"), image_column="file",
                          label_column="shape", label_names=SHAPES, column_names=["file", "shape"])
    splits, _ = load_image_splits(cfg, seed=0)
    assert len(splits["eval"]) == 6  # every row, the first included
    np.testing.assert_array_equal(splits["eval"].labels, labels)


def test_labels_subsets_and_missing_sources(shape_npz):
    cfg = ImageDataConfig(train=str(shape_npz), max_train_samples=10, max_eval_samples=5)
    splits, names = load_image_splits(cfg, seed=3)
    assert names == ["0", "1", "2"] and len(splits["train"]) == 10 and len(splits["eval"]) == 5
    _, four = load_image_splits(ImageDataConfig(train=str(shape_npz)), seed=0, num_labels=4)
    assert four == ["0", "1", "2", "3"]  # integer ids: a class may be missing from the data
    with pytest.raises(DataError, match="out of range for 2 label names"):
        load_image_splits(ImageDataConfig(train=str(shape_npz), label_names=["a", "b"]), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_image_splits(ImageDataConfig(train="/nonexistent/data.npz"), seed=0)
    with pytest.raises(DataError, match="no embedded image dataset 'cifar'"):
        load_image_splits(ImageDataConfig(train="embedded:cifar"), seed=0)


# --- preprocessing and batches -------------------------------------------------------------------------------

def test_preprocessing_defaults_come_from_the_train_images(shape_npz):
    splits, _ = load_image_splits(ImageDataConfig(train=str(shape_npz)), seed=0)
    spec = resolve_preprocessing(ImageDataConfig(), splits["train"])
    x = splits["train"].images / 255.0
    assert spec.size == (12, 12) and spec.color_mode == "L" and spec.resample == "bilinear"
    assert spec.mean[0] == pytest.approx(x.mean(), abs=1e-4) and spec.std[0] == pytest.approx(x.std(), abs=1e-4)
    # Settings win over the pretrained model's, which win over the data's.
    pretrained = {"size": [16, 16], "color_mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bicubic"}
    spec = resolve_preprocessing(ImageDataConfig(image_size=[10, 14]), splits["train"], pretrained=pretrained)
    assert spec.size == (10, 14) and spec.color_mode == "RGB" and spec.mean == (0.5,) * 3
    assert spec.resample == "bicubic"
    with pytest.raises(ConfigError, match="mean and std need 1 value"):
        resolve_preprocessing(ImageDataConfig(mean=[0.1, 0.2, 0.3]), splits["train"])


def test_eval_batches_equal_the_torch_free_pipeline_exactly(image_folder):
    """What the model sees at eval time is what serve/ computes from the image files with image_preprocessing."""
    cfg = ImageDataConfig(train=str(image_folder), bad_images="skip", image_size=[10, 14], color_mode="RGB")
    loaded, _ = load_image_splits(cfg, seed=0)
    spec = resolve_preprocessing(cfg, loaded["train"])
    assert spec.size == (10, 14) and len(set(spec.mean)) == 3
    splits = prepare_images(loaded, spec)
    _, eval_loader = build_image_dataloaders(splits, spec, batch_size=4, eval_batch_size=4, seed=0, num_processes=1)
    batches = list(eval_loader)
    pixel_values = torch.cat([b["pixel_values"] for b in batches])
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (9, 3, 10, 14)
    files = sorted((image_folder / "test").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    expected = np.stack([preprocess(path, spec) for path in files])
    assert sorted(map(bytes, expected)) == sorted(map(bytes, pixel_values.numpy()))  # bit-exact, in any order
    np.testing.assert_array_equal(torch.cat([b["labels"] for b in batches]).numpy(), splits["eval"].labels)


def test_train_batches_are_shuffled_by_seed_and_epoch(shape_npz):
    loaded, _ = load_image_splits(ImageDataConfig(train=str(shape_npz)), seed=0)
    spec = resolve_preprocessing(ImageDataConfig(), loaded["train"])
    splits = prepare_images(loaded, spec)

    def epoch_labels(epoch: int) -> list[int]:
        loader, _ = build_image_dataloaders(splits, spec, batch_size=8, eval_batch_size=8, seed=5, num_processes=1)
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["labels"] for b in loader]).tolist()

    assert epoch_labels(0) == epoch_labels(0) != epoch_labels(1)
    assert sorted(epoch_labels(1)) == sorted(splits["train"].labels.tolist())


# --- augmentation ------------------------------------------------------------------------------------------------

SPEC = PreprocessingSpec(size=(12, 12), color_mode="L", mean=[0.2], std=[0.4])


def normalized_shapes(count: int = 16) -> torch.Tensor:
    images, _ = make_shape_images(count, seed=9)
    return torch.from_numpy(prepare_images({"x": ImageSet(images, np.zeros(count))}, SPEC)["x"].images / 255.0
                            ).float().sub(0.2).div(0.4)


def test_augmentation_keeps_shape_and_dtype_and_is_keyed():
    x = normalized_shapes()
    augment = BatchAugmenter(AugmentConfig(enabled=True, max_shift=0.2, max_rotation=15.0, horizontal_flip=True),
                             SPEC, seed=1)
    out = augment(x, key=32)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    assert torch.equal(out, augment(x, key=32))  # a resumed run repeats it
    assert not torch.equal(out, augment(x, key=48))
    other_process = BatchAugmenter(augment.cfg, SPEC, seed=1, process_index=1)
    assert not torch.equal(out, other_process(x, key=32))


def test_augmentation_off_returns_the_batch_untouched():
    x = normalized_shapes()
    assert BatchAugmenter(AugmentConfig(), SPEC, seed=1)(x, key=0) is x  # the default: off
    assert BatchAugmenter(AugmentConfig(enabled=True, max_shift=0.0), SPEC, seed=1)(x, key=0) is x


def test_shift_moves_whole_pixels_and_fills_with_black():
    x = normalized_shapes(64)
    out = BatchAugmenter(AugmentConfig(enabled=True, max_shift=0.2), SPEC, seed=0)(x, key=7)
    black = -0.2 / 0.4
    shifted = 0
    for before, after in zip(x[:, 0], out[:, 0], strict=True):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.allclose(after[max(0, -dy):12 - max(0, dy), max(0, -dx):12 - max(0, dx)],
                                   before[max(0, dy):12 + min(0, dy), max(0, dx):12 + min(0, dx)], atol=1e-4)]
        assert match, "a shift must move the image by whole pixels"
        dy, dx = match[0]
        shifted += (dy, dx) != (0, 0)
        border = torch.ones_like(after, dtype=torch.bool)
        border[max(0, -dy):12 - max(0, dy), max(0, -dx):12 - max(0, dx)] = False
        assert torch.allclose(after[border], torch.tensor(black), atol=1e-5)
    assert shifted > 40  # 24 of 25 offsets move the image


def test_train_batches_carry_per_image_extras(shape_npz):
    """An extra per-image array (e.g. a teacher's cached logits) travels with its image through the shuffle."""
    loaded, _ = load_image_splits(ImageDataConfig(train=str(shape_npz)), seed=0)
    spec = resolve_preprocessing(ImageDataConfig(), loaded["train"])
    splits = prepare_images(loaded, spec)
    index = np.arange(len(splits["train"]))
    loader, eval_loader = build_image_dataloaders(splits, spec, batch_size=8, eval_batch_size=8, seed=5,
                                                  num_processes=1, train_extras={"index": index})
    batches = list(loader)
    seen = torch.cat([b["index"] for b in batches])
    assert sorted(seen.tolist()) == index.tolist() and seen.tolist() != index.tolist()
    for batch in batches:
        np.testing.assert_array_equal(batch["labels"].numpy(), splits["train"].labels[batch["index"].numpy()])
    assert "index" not in next(iter(eval_loader))
