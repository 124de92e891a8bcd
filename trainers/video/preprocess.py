"""Frame preprocessing: resize the shorter side, center-crop a square, scale to [0, 1], normalise.

``Preprocess.__call__`` is the CPU reference on full-size frames. ``Preprocess.on_device``
is what the build runs: uint8 frames (full size, or already scaled by the decoder) are
uploaded and resized, cropped and normalised by torch on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .decode import resized_size


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``x * scale + shift == (x / 255 - mean) / std``, [1, 3, 1, 1] each, on ``device``."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return (1 / (255 * s)).float().view(1, 3, 1, 1).to(device), (-m / s).float().view(1, 3, 1, 1).to(device)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, center-crop ``crop`` x ``crop``, normalise by ``mean``/``std``."""

    crop: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """[n, H, W, 3] uint8 RGB -> [n, 3, crop, crop] float32 (the CPU reference)."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [n, 3, H, W]
        size = resized_size(*x.shape[-2:], self.resize, self.crop)
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 255)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[:, :, top : top + self.crop, left : left + self.crop]  # [n, 3, crop, crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std).view(1, 3, 1, 1) * 255
        return ((x - mean) / std).contiguous()

    def on_device(self, frames: torch.Tensor, source_size: tuple[int, int]) -> torch.Tensor:
        """[n, h, w, 3] uint8 on any device, scaled from ``source_size`` (H, W) or not -> [n, 3, crop, crop]
        float32 on that device. Frames already at the resized size are cropped before the float conversion."""
        size = resized_size(*source_size, self.resize, self.crop)
        x = frames.permute(0, 3, 1, 2)  # [n, 3, h, w], channels-last strides
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        if tuple(x.shape[-2:]) == size:
            x = x[:, :, top : top + self.crop, left : left + self.crop].float()  # [n, 3, crop, crop]
        else:
            x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 255)
            x = x[:, :, top : top + self.crop, left : left + self.crop]  # [n, 3, crop, crop]
        scale, shift = _affine(self.mean, self.std, frames.device)
        return torch.addcmul(shift, x, scale).contiguous()  # [n, 3, crop, crop]

    def as_dict(self) -> dict:
        return {"crop": self.crop, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
