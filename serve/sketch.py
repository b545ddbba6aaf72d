"""Turn a drawing from the demo's sketchpad into an image like the training digits. numpy and Pillow only.

A sketch is a few strokes on a large canvas; MNIST-style digits are centred in their frame with a margin, bright
ink on a dark background (or the reverse). So: take the ink, crop to it, centre it on a square with a margin, and
match the training images' polarity (from the saved mean: a dark-background dataset has a mean pixel below 0.5).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from serve.bundle.preprocessing import PreprocessingSpec

MARGIN = 0.15  # blank border around the digit, as a fraction of the square's side (MNIST: 4 px of 28)
INK_THRESHOLD = 16  # 0..255: fainter pixels are canvas noise, not strokes


def ink(canvas: np.ndarray) -> np.ndarray:
    """uint8 [H, W] ink intensity of a sketchpad image: its alpha where the canvas is transparent, else darkness."""
    if canvas.ndim == 3 and canvas.shape[-1] == 4 and canvas[..., 3].min() < 255:
        return canvas[..., 3].astype(np.uint8)
    gray = np.asarray(Image.fromarray(canvas[..., :3] if canvas.ndim == 3 else canvas).convert("L"))
    return (255 - gray).astype(np.uint8)


def sketch_to_image(canvas: np.ndarray, spec: PreprocessingSpec) -> Image.Image | None:
    """The drawing as an "L" image framed like the training digits, or None when nothing was drawn."""
    strokes = ink(canvas)
    rows, cols = np.nonzero(strokes > INK_THRESHOLD)
    if not len(rows):
        return None
    crop = strokes[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    side = int(max(crop.shape) / (1 - 2 * MARGIN)) + 1
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    dark_background = float(np.mean(spec.mean)) < 0.5
    return Image.fromarray(square if dark_background else 255 - square)
