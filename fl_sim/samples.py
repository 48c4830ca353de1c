"""Image grids of samples from a diffusion model: per round of a federation, end of train-prior.

Samples are drawn with the task's own DDIM sampler (:meth:`DiffusionTask.sample`) from a
generator that depends on the run seed only, so the grids of successive rounds start from the
same noise and differ only by the model. Where a grid goes (``samples/r0003.png``) is
:mod:`fl_sim.run_dir.images`' business. Importing this module imports neither flwr nor ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_sim.run_dir.images import image_grid
from fl_sim.seeding import torch_generator


def save_sample_grid(task: Any, path: Path, *, num_images: int, num_steps: int, seed: int,
                     per_row: int = 8) -> Path:
    """Write ``num_images`` DDIM samples ([N, C, H, W] in [0, 1]) of ``task``'s model, drawn
    from ``torch_generator(seed, "samples")`` in ``min(num_steps, T)`` steps, as one PNG grid
    of ``per_row`` images a row. Raises ``ValueError`` for ``num_images < 1``."""
    from PIL import Image  # lazy: Pillow only where a PNG is written

    steps = min(num_steps, task.num_train_timesteps)
    imgs = task.sample(num_images, torch_generator(seed, "samples"),
                       num_inference_steps=steps).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray(image_grid(list(imgs.split(per_row)))).save(tmp, format="PNG")
    tmp.replace(path)
    return path
