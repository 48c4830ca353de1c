"""The run directory's images: attack grids (``attacks/*.png``) and the per-round sample grids
of a diffusion run (``samples/r0003.png``), their names, writer and reader.

Importing this module imports neither flwr nor ray (PIL only when a PNG is written).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

#: per-round sample grids of a diffusion run's global model
SAMPLES_DIR = "samples"
_ROUND_FILE = re.compile(r"r(\d+)\.png$")


def image_grid(rows: Sequence[Tensor], *, pad: int = 2, scale: int = 0) -> np.ndarray:
    """Stack rows of [B, C, H, W] images in [0, 1] into one uint8 HWC array.

    Rows may have different lengths (missing cells stay white). ``scale`` upsamples by an
    integer factor (nearest); 0 picks one so that a cell is at least 96 px tall.
    """
    rows = [r.detach().float().cpu().clamp(0, 1) for r in rows if r.numel()]
    if not rows:
        raise ValueError("image_grid: no images")
    c, h, w = rows[0].shape[1:]
    if scale == 0:
        scale = max(1, -(-96 // h))
    ncol = max(r.shape[0] for r in rows)
    ch, cw = h * scale + pad, w * scale + pad
    grid = np.ones((len(rows) * ch + pad, ncol * cw + pad, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        up = row.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        if up.shape[1] == 1:
            up = up.expand(-1, 3, -1, -1)
        for j, img in enumerate(up):
            y, x = pad + i * ch, pad + j * cw
            grid[y:y + h * scale, x:x + w * scale] = img.permute(1, 2, 0).numpy()[..., :3]
    return (grid * 255 + 0.5).astype(np.uint8)


def save_grid(path: Path, originals: Tensor, reconstructions: Tensor,
              plain: Tensor | None = None) -> Path:
    """PNG with the originals over their (matched) reconstructions; with ``plain`` (the same
    attack's images before its prior, in the same order) a middle row: original / plain /
    with-prior side by side per column."""
    from PIL import Image  # lazy: Pillow is needed only where a PNG is written
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [originals, reconstructions] if originals.numel() else [reconstructions]
    if plain is not None and plain.numel():
        rows.insert(len(rows) - 1, plain)
    Image.fromarray(image_grid(rows)).save(path)
    return path


def round_samples_path(run_dir: Path, server_round: int) -> Path:
    """``RUN_DIR/samples/r0003.png`` for round 3."""
    return Path(run_dir) / SAMPLES_DIR / f"r{server_round:04d}.png"


def round_sample_files(run_dir: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every per-round sample grid in ``run_dir``, in round order."""
    out = []
    for f in (Path(run_dir) / SAMPLES_DIR).glob("r*.png"):
        m = _ROUND_FILE.fullmatch(f.name)
        if m:
            out.append((int(m.group(1)), f))
    return sorted(out)
