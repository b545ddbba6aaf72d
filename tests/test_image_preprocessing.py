"""serve.bundle.preprocessing: the torch-free eval-time pipeline that training, export and serving share."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_shape_images
from PIL import Image
from test_imports import modules_after, top_level

from serve.bundle.preprocessing import (
    ImageError,
    PreprocessingSpec,
    as_uint8,
    load_image,
    normalize,
    preprocess,
    preprocess_batch,
    to_model_pixels,
    to_model_pixels_batch,
)

GRAY = PreprocessingSpec(size=(12, 12), color_mode="L", mean=[0.25], std=[0.5])
RGB = PreprocessingSpec(size=(6, 8), color_mode="RGB", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], resample="bicubic")


def test_module_imports_without_torch_or_transformers():
    loaded = top_level(modules_after("import serve.bundle.preprocessing"))
    assert "serve" in loaded and "PIL" in loaded and "numpy" in loaded  # the import really ran
    assert "finetune" not in loaded  # the bundle floor imports nothing else of tuneforge
    for heavy in ("torch", "transformers", "datasets", "accelerate", "sklearn"):
        assert heavy not in loaded, f"serve.bundle.preprocessing imported {heavy}"


def test_spec_round_trips_through_its_json_form():
    data = RGB.to_dict()
    assert data == {"size": [6, 8], "color_mode": "RGB", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                    "resample": "bicubic", "rescale": 1 / 255}
    assert PreprocessingSpec.from_dict(data) == RGB
    assert PreprocessingSpec.from_dict({"size": [6, 8], "color_mode": "L", "mean": [0.1], "std": [0.3]}).resample \
        == "bilinear"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"size": [0, 8]}, "positive sides"),
    ({"color_mode": "RGBA"}, "color_mode"),
    ({"mean": [0.5]}, "need 3 value"),
    ({"std": [0.2, 0.0, 0.3]}, "std must be positive"),
    ({"resample": "area"}, "resample must be one of"),
])
def test_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessingSpec(**{**RGB.to_dict(), **kwargs})
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessingSpec.from_dict({**RGB.to_dict(), "crop": 3})


def test_normalize_is_rescale_then_mean_and_std_per_channel():
    pixels = np.array([[[0, 255], [51, 102]]] * 3, dtype=np.uint8)  # [3, 2, 2]
    out = normalize(pixels, RGB)
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    for c in range(3):
        expected = (pixels[c] / 255.0 - RGB.mean[c]) / RGB.std[c]
        np.testing.assert_allclose(out[c], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ImageError, match=r"expected pixels \[..., 1, H, W\]"):
        normalize(pixels, GRAY)


def test_every_input_kind_gives_the_same_tensor(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    encoded = io.BytesIO()
    Image.fromarray(rgb).save(encoded, format="PNG")
    expected = preprocess(rgb, RGB)
    assert expected.shape == (3, 6, 8) and expected.dtype == np.float32
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), encoded.getvalue(), Image.fromarray(rgb),
                   rgb.astype(np.float32) / 255.0):
        np.testing.assert_array_equal(preprocess(source, RGB), expected)


def test_color_mode_and_resize_follow_pillow():
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 16, 3), dtype=np.uint8)
    gray = to_model_pixels(rgb, GRAY)
    expected = np.asarray(Image.fromarray(rgb).convert("L").resize((12, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(gray[0], expected)
    # Grayscale to RGB repeats the channel; an image already at the size is not resampled.
    small = np.random.default_rng(2).integers(0, 256, size=(6, 8), dtype=np.uint8)
    out = to_model_pixels(small, RGB)
    assert out.shape == (3, 6, 8)
    for c in range(3):
        np.testing.assert_array_equal(out[c], small)
    rgba = np.dstack([rgb, np.full((20, 16), 7, np.uint8)])
    np.testing.assert_array_equal(to_model_pixels(rgba, GRAY), gray)  # alpha dropped
    np.testing.assert_array_equal(to_model_pixels(rgb[:, :, :1], RGB)[0],
                                  np.asarray(Image.fromarray(rgb[:, :, 0]).resize((8, 6), Image.Resampling.BICUBIC)))


def test_batch_fast_path_equals_the_per_image_path():
    gray, _ = make_shape_images(5, seed=3)
    rgb, _ = make_shape_images(5, seed=4, rgb=True)
    for images, spec in ((gray, GRAY), (gray[..., None], GRAY), (rgb, PreprocessingSpec((12, 12), "RGB", [0.5] * 3,
                                                                                       [0.5] * 3))):
        fast = to_model_pixels_batch(images, spec)
        slow = np.stack([to_model_pixels(image, spec) for image in images])
        assert fast.dtype == np.uint8
        np.testing.assert_array_equal(fast, slow)
    # Needing a resize or a color conversion goes through Pillow.
    np.testing.assert_array_equal(to_model_pixels_batch(rgb, GRAY), np.stack([to_model_pixels(i, GRAY) for i in rgb]))
    batch = preprocess_batch(list(rgb), RGB)
    assert batch.shape == (5, 3, 6, 8)
    np.testing.assert_array_equal(batch[2], preprocess(rgb[2], RGB))


def test_as_uint8_rules():
    assert as_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert as_uint8(np.array([3, 255], dtype=np.int64)).dtype == np.uint8
    with pytest.raises(ImageError, match=r"float image values must lie in \[0, 1\]"):
        as_uint8(np.array([0.0, 255.0]))
    with pytest.raises(ImageError, match=r"integers in 0\.\.255"):
        as_uint8(np.array([-1, 300]))


def test_bad_images_raise_image_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match=r"cannot read image .*notes\.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 90).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="HxW, HxWx1, HxWx3 or HxWx4"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="16/32-bit"):
        to_model_pixels(Image.fromarray(np.zeros((4, 4), np.int32), mode="I"), RGB)
