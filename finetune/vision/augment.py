"""Train-time augmentation of whole batches on the model's device: shift, small rotation, horizontal flip.

One random affine transform per image, applied with `grid_sample` to normalised `pixel_values`; pixels moved in from
outside the image are black (the normalised value of 0). Eval never sees this: only the training loop calls it.
The randomness of a batch is a function of (seed, process, key), so a resumed run augments exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve.bundle.preprocessing import PreprocessingSpec


@dataclass
class AugmentConfig:
    """Random transforms of training images (off by default: digits are not mirror- or rotation-invariant)."""

    enabled: bool = False
    max_shift: float = 0.1  # fraction of the height / width; shifts are whole pixels (a random crop of a padded image)
    max_rotation: float = 0.0  # degrees, either way
    horizontal_flip: bool = False  # mirror half of the images (not for digits or text)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {self.max_shift}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")


class BatchAugmenter:
    """Augments a batch of normalised images [N, C, H, W] in one `grid_sample` call."""

    def __init__(self, cfg: AugmentConfig, spec: PreprocessingSpec, *, seed: int, process_index: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.process_index = process_index
        # The normalised value of a black pixel, per channel: what shifted-in borders are filled with.
        self.black = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std, strict=True)]).view(1, -1, 1, 1)

    @property
    def active(self) -> bool:
        cfg = self.cfg
        return cfg.enabled and (cfg.max_shift > 0 or cfg.max_rotation > 0 or cfg.horizontal_flip)

    def __call__(self, pixel_values: torch.Tensor, *, key: int) -> torch.Tensor:
        """The augmented batch (same shape and dtype); `key` (e.g. samples seen so far) picks the randomness."""
        if not self.active:
            return pixel_values
        n, _, height, width = pixel_values.shape
        device = pixel_values.device
        generator = torch.Generator().manual_seed(hash((self.seed, self.process_index, key)) & (2**63 - 1))

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) * (high - low) + low

        angle = uniform(-1, 1) * math.radians(self.cfg.max_rotation)
        # Whole-pixel shifts; in grid_sample's [-1, 1] coordinates one pixel is 2 / size.
        max_dy, max_dx = math.floor(self.cfg.max_shift * height), math.floor(self.cfg.max_shift * width)
        dy = torch.randint(-max_dy, max_dy + 1, (n,), generator=generator) * (2.0 / height)
        dx = torch.randint(-max_dx, max_dx + 1, (n,), generator=generator) * (2.0 / width)
        flip = torch.ones(n)
        if self.cfg.horizontal_flip:
            flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # theta maps output to input coordinates; the aspect ratio keeps rotations rigid on non-square images.
        theta = torch.stack([
            torch.stack([cos * flip, -sin * height / width, dx], dim=1),
            torch.stack([sin * flip * width / height, cos, dy], dim=1),
        ], dim=1).to(device=device, dtype=pixel_values.dtype)
        grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
        black = self.black.to(device=device, dtype=pixel_values.dtype)
        # Sampled relative to black, so the zeros that grid_sample pads with are black pixels.
        moved = F.grid_sample(pixel_values - black, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return moved + black
