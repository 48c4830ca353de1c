"""Image conversions and the one normalisation of fl-sim.

Every dataset is held as float32 NCHW in [0, 1]. :class:`Normalization` is the only place
where per-channel ``(x - mean) / std`` is applied or undone; tasks call it inside their loss so
attacks optimise [0, 1] pixels directly. No torchvision: resizing uses
``torch.nn.functional.interpolate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (as in Pillow's "L" mode).
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` and its inverse, broadcast over [..., C, H, W].

    >>> n = Normalization((0.5,), (0.25,))
    >>> x = torch.tensor([[[[0.0, 1.0]]]])
    >>> n.normalize(x).flatten().tolist()
    [-2.0, 2.0]
    >>> torch.allclose(n.denormalize(n.normalize(x)), x)
    True
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must be non-empty and of "
                             "equal length")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive; got {self.std}")

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() < 3 or x.shape[-3] != len(self.mean):
            raise ValueError(f"expected [..., {len(self.mean)}, H, W]; got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """[..., C, H, W] in [0, 1] -> normalised, same shape, device and dtype."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` (no clamping)."""
        mean, std = self._stats(x)
        return x * std + mean


def to_float01(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, C] (or [N, H, W]) array -> float32 [N, C, H, W] tensor in [0, 1].

    Raises:
        ValueError: for another dtype or rank.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images; got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected [N, H, W, C] or [N, H, W]; got shape {images.shape}")
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))  # a writable copy
    return x.div_(255.0).contiguous()


def to_uint8(images01: Tensor) -> Tensor:
    """Float images in [0, 1] (any shape) -> uint8 tensor, values clamped and rounded."""
    return images01.detach().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def center_crop_square(images: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, S, S] with ``S = min(H, W)``, cropped around the centre."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top:top + s, left:left + s]


def resize(images: Tensor, size: int) -> Tensor:
    """[N, C, H, W] float -> [N, C, size, size], bilinear with antialiasing, kept in [0, 1].

    Non-square inputs are centre-cropped to a square first; same size is a no-op.
    """
    images = center_crop_square(images)
    if images.shape[-1] == size:
        return images
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.clamp_(0.0, 1.0)


def convert_channels(images: Tensor, channels: int) -> Tensor:
    """[N, C, H, W] -> [N, channels, H, W]: gray repeated to RGB, RGB to gray by BT.601 luma.

    Raises:
        ValueError: for any other conversion.
    """
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * w).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels (only 1 <-> 3)")
