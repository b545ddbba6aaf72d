"""Eval-time image preprocessing, the one implementation that training, export and serving all apply.

image (path, bytes, PIL image, or uint8 / float array HxW or HxWxC)
  -> color mode ("L" or "RGB", Pillow's conversion)
  -> resize to (height, width) with the stated Pillow resample filter (skipped when the size already matches)
  -> float32 in [0, 1] (pixels x rescale, rescale = 1/255)
  -> (x - mean) / std per channel
  -> float32 [channels, height, width]

The steps are a `PreprocessingSpec`, saved in a run's `model/tuneforge.json` under "preprocessing". This module
imports only numpy and Pillow (never torch or transformers), so an app without PyTorch can import it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve.bundle.errors import DataError

ColorMode = Literal["L", "RGB"]
RESAMPLE_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
ImageInput = str | Path | bytes | Image.Image | np.ndarray


class ImageError(DataError):
    """An image cannot be read, or has a shape / value range this pipeline does not take."""


@dataclass(frozen=True)
class PreprocessingSpec:
    """What `preprocess` does: target size, color mode, normalisation, resample filter and pixel scale."""

    size: tuple[int, int]  # (height, width) in pixels
    color_mode: ColorMode
    mean: tuple[float, ...]  # one per channel, in rescaled units ([0, 1] pixels)
    std: tuple[float, ...]
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    rescale: float = field(default=1 / 255)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be [height, width] with positive sides, got {list(self.size)}")
        if self.color_mode not in ("L", "RGB"):
            raise ValueError(f"color_mode must be 'L' or 'RGB', got {self.color_mode!r}")
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"mean and std need {self.num_channels} value(s) for color mode {self.color_mode}, "
                             f"got mean={list(self.mean)} std={list(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE_FILTERS)}, got {self.resample!r}")

    @property
    def num_channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved in tuneforge.json."""
        return {"size": list(self.size), "color_mode": self.color_mode, "mean": list(self.mean),
                "std": list(self.std), "resample": self.resample, "rescale": self.rescale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingSpec:
        """Read the JSON form back (the keys of `to_dict`; `resample` and `rescale` may be left out)."""
        known = {"size", "color_mode", "mean", "std", "resample", "rescale"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; expected {sorted(known)}")
        return cls(**data)


def load_image(source: ImageInput) -> Image.Image:
    """A decoded Pillow image from a path, encoded bytes, a Pillow image or an array (uint8, or float in [0, 1]).

    Files are fully decoded here (a truncated file fails now, not later) and turned upright by their EXIF tag.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    what = str(source) if isinstance(source, (str, Path)) else f"{len(source)} bytes"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise ImageError(f"image file {what} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # Pillow's decoders raise all four
        raise ImageError(f"cannot read image {what}: {str(err).splitlines()[0] or type(err).__name__}") from None
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    array = as_uint8(array)
    return Image.fromarray(np.ascontiguousarray(array))


def as_uint8(array: np.ndarray) -> np.ndarray:
    """Pixels as uint8: uint8 as is, integers in 0..255 cast, floats in [0, 1] scaled by 255 and rounded."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.isnan(array).any() or array.min() < 0.0 or array.max() > 1.0):
            raise ImageError(f"float image values must lie in [0, 1], got [{np.nanmin(array):.3g}, "
                             f"{np.nanmax(array):.3g}]; pass uint8 arrays for 0..255 pixels")
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and (not array.size or (array.min() >= 0 and array.max() <= 255)):
        return array.astype(np.uint8)
    raise ImageError(f"image arrays must be uint8 / integers in 0..255, or floats in [0, 1]; got {array.dtype}"
                     + (f" with values [{array.min()}, {array.max()}]" if array.size and array.dtype != bool else ""))


def to_model_pixels(image: ImageInput, spec: PreprocessingSpec) -> np.ndarray:
    """The image in the model's color mode and size: uint8 [channels, height, width]."""
    pil = load_image(image)
    if pil.mode != spec.color_mode:
        if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # Pillow clips these to 0..255 instead of scaling
            raise ImageError(f"{pil.mode} images (16/32-bit) are not supported; convert them to 8-bit first")
        pil = pil.convert(spec.color_mode)
    height, width = spec.size
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=RESAMPLE_FILTERS[spec.resample])
    pixels = np.asarray(pil, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def to_model_pixels_batch(images: np.ndarray | Iterable[ImageInput], spec: PreprocessingSpec) -> np.ndarray:
    """`to_model_pixels` of many images: uint8 [N, channels, height, width].

    A uint8 array [N, H, W] (grayscale) or [N, H, W, 3] (RGB) already in the spec's size and mode is reshaped
    without a per-image round trip through Pillow, which would return the same pixels.
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:3] == spec.size:
        if spec.color_mode == "L" and (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 1)):
            return np.ascontiguousarray(images.reshape(len(images), 1, *spec.size))
        if spec.color_mode == "RGB" and images.ndim == 4 and images.shape[3] == 3:
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    out = np.empty((len(images), spec.num_channels, *spec.size), dtype=np.uint8)  # type: ignore[arg-type]
    for i, image in enumerate(images):
        out[i] = to_model_pixels(image, spec)
    return out


def normalize(pixels: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """uint8 [..., C, H, W] -> float32 (pixels x rescale - mean) / std, per channel."""
    if pixels.ndim < 3 or pixels.shape[-3] != spec.num_channels:
        raise ImageError(f"expected pixels [..., {spec.num_channels}, H, W], got shape {pixels.shape}")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (pixels.astype(np.float32) * np.float32(spec.rescale) - mean) / std


def preprocess(image: ImageInput, spec: PreprocessingSpec) -> np.ndarray:
    """One image -> the model's input, float32 [channels, height, width]."""
    return normalize(to_model_pixels(image, spec), spec)


def preprocess_batch(images: Sequence[ImageInput], spec: PreprocessingSpec) -> np.ndarray:
    """Many images -> `pixel_values`, float32 [N, channels, height, width]."""
    return normalize(to_model_pixels_batch(images, spec), spec)
