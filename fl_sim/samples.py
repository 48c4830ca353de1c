"""Image grids of samples from a diffusion model: per round of a federation, end of train-prior.

Samples are drawn with the task's own DDIM sampler (:meth:`DiffusionTask.sample`) from a
generator that depends on the run seed only, so the grids of successive rounds start from the
same noise and differ only by the model. Where a grid goes (``samples/r0003.png``) is
:mod:`fl_sim.run_dir.images`' business. :class:`SamplingEMA` averages the global models of
successive rounds for the grids (``[samples] ema``). Importing this module imports neither
flwr nor ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from fl_sim.run_dir.images import image_grid
from fl_sim.seeding import torch_generator
from fl_sim.stores import read_tensors, write_tensors


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


class SamplingEMA:
    """Exponential moving average of the global model over rounds, to draw the sample grids
    from (``[samples] ema = decay``; 0 = off, the grids show the raw global model).

    After round r: ``ema_r = decay * ema_{r-1} + (1 - decay) * global_r`` for floating-point
    tensors (integer buffers are copied), starting at round 1's global. Sampling from an EMA
    of the weights is DDPM practice (Ho et al. 2020, decay 0.9999 per optimiser step), not part
    of FedAvg: the clients train and the server aggregates exactly as without it; only the
    grids (and ``eval_loss_ema`` on their rounds) see the average. Deviation from the paper:
    the average runs over the global models of successive rounds, not over optimiser steps,
    because the server only sees those. Raises ``ValueError`` for a decay outside (0, 1).
    """

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.state: dict[str, Tensor] | None = None
        self.round = 0

    def update(self, server_round: int, global_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Fold round ``server_round``'s global model (a state dict) in; returns the EMA."""
        new = {k: v.detach().to("cpu", copy=True) for k, v in global_state.items()}
        if self.state is None:
            self.state = new
        else:
            d = self.decay
            self.state = {k: (self.state[k].mul(d).add_(v, alpha=1 - d)
                              if v.is_floating_point() else v) for k, v in new.items()}
        self.round = int(server_round)
        return self.state

    def save(self, path: Path) -> None:
        """Write the EMA (and its round) to ``path`` (safetensors), for a resumed run."""
        if self.state is not None:
            write_tensors(path, self.state, {"round": self.round, "decay": self.decay})

    def load(self, path: Path, server_round: int) -> bool:
        """Read the EMA written after ``server_round``; False (EMA left empty) if ``path`` is
        missing or belongs to another round or decay."""
        if not path.is_file():
            return False
        state, meta = read_tensors(path)
        if int(meta.get("round", -1)) != server_round or meta.get("decay") != self.decay:
            return False
        self.state, self.round = state, server_round
        return True
