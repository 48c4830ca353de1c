"""Restarts shared by the optimisation attacks: successive halving inside one batched run.

All ``R`` restarts of an attack are optimised as one ``[R, N, C, H, W]`` tensor. Successive
halving keeps the better half (by the attack's own matching objective) at a few early points
of the budget, so ``R`` restarts cost a small multiple of one instead of ``R`` times one on a
CPU, where a batch of ``R`` already costs about ``R`` times a batch of one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pruning_schedule", "sliced_adam"]


def pruning_schedule(restarts: int, max_iterations: int, keep: int = 1
                     ) -> list[tuple[int, int]]:
    """Successive halving of restarts: ``[(iteration, survivors after it), ...]``.

    ``m = ceil(log2(restarts / keep))`` halvings (each keeps ``ceil(r / 2)``, at least
    ``keep``) happen at ``1/4 * 2^-(m-1), ..., 1/8, 1/4`` of the budget (1/16, 1/8, 1/4 for
    eight restarts and ``keep = 1``), all before the first learning-rate drop of the step
    schedule (3/8), while every restart still moves at full speed. At a pruning iteration the
    objective of the current images is the one that iteration computes anyway, so pruning
    costs nothing extra. Iterations are strictly increasing; halvings that would fall at or
    after ``max_iterations`` are left out (the final choice then picks among more survivors).
    With ``restarts <= keep`` the schedule is empty.
    """
    sizes: list[int] = []
    r = restarts
    while r > keep:
        r = max(keep, (r + 1) // 2)
        sizes.append(r)
    m = len(sizes)
    out: list[tuple[int, int]] = []
    last = 0
    for j, size in enumerate(sizes):
        it = max(last + 1, round(max_iterations * 2.0 ** (j + 1 - m) / 4))
        if it >= max_iterations:
            break
        out.append((it, size))
        last = it
    return out


def sliced_adam(opt: torch.optim.Adam, z: Tensor, keep: Tensor) -> tuple[Tensor, torch.optim.Adam]:
    """A new leaf ``z[keep]`` and an Adam over it that carries the sliced moment estimates."""
    new_z = z.detach()[keep].clone().requires_grad_(True)
    new_opt = torch.optim.Adam([new_z], **opt.defaults)
    old = opt.state.get(z, {})
    new_opt.state[new_z] = {k: (v[keep].clone() if isinstance(v, Tensor) and v.dim() > 0
                                and v.shape[0] == z.shape[0] else
                                (v.clone() if isinstance(v, Tensor) else v))
                            for k, v in old.items()}
    for g_new, g_old in zip(new_opt.param_groups, opt.param_groups, strict=True):
        g_new["lr"] = g_old["lr"]
    return new_z, new_opt
