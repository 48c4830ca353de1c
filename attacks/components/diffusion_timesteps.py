"""Which timesteps explain a diffusion update: candidates for GIDM+'s search over t.

Huang et al., "Gradient Inversion of Federated Diffusion Models" (arXiv 2405.20380), GIDM+
searches the client's private timesteps. diffusers' ``UNet2DModel`` embeds ``t`` with a fixed
sinusoidal ``time_proj`` followed by the MLP ``time_embedding`` (``linear_1``, SiLU,
``linear_2``). The FedSGD gradient of ``linear_1.weight`` over a batch of B images is
``sum_b delta_b emb(t_b)^T / B``, so its row space is spanned by the B embeddings
``emb(t_b)``: scoring every integer t by how much of ``emb(t)`` lies in that space ranks
the timesteps without any optimisation (:func:`timestep_scores`). The attack then scores
the best peaks with the full matching objective (:func:`attacks.gidm_plus.search_t`).
This reading of the embedding layer is ours, not the paper's (which steps t by trial).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TIME_EMBEDDING_PREFIX", "timestep_scores", "score_peaks", "candidate_timesteps"]

#: parameters of diffusers' timestep-embedding MLP (``UNet2DModel.time_embedding``)
TIME_EMBEDDING_PREFIX = "time_embedding."


def timestep_scores(problem: Any) -> Tensor | None:
    """How well each integer timestep explains the observed time-embedding gradient -> [T].

    The first time-embedding layer's weight gradient is ``sum_b delta_b emb(t_b)^T / B``: its
    row space is spanned by the B images' sinusoidal embeddings. Score of ``t``: the fraction
    ``|P emb(t)|^2 / |emb(t)|^2`` of ``emb(t)`` inside the top-B right-singular subspace
    ``P`` (1 for a true timestep, ~B / dim for others). ``None`` when the model has no
    diffusers ``time_proj`` + ``time_embedding.linear_1`` (no such structure to read).
    """
    key = TIME_EMBEDDING_PREFIX + "linear_1.weight"
    proj = getattr(problem.task.model, "time_proj", None)
    if key not in problem.target or proj is None:
        return None
    w1 = problem.target[key].double()
    b = min(problem.shape[0], *w1.shape)
    vh = torch.linalg.svd(w1, full_matrices=False).Vh[:b]
    with torch.no_grad():
        emb = proj(torch.arange(problem.num_timesteps, dtype=torch.float32,
                                device=w1.device)).double()
    return (emb @ vh.T).square().sum(1) / emb.square().sum(1).clamp_min(1e-30)


def score_peaks(scores: Tensor, k: int, *, min_gap: int = 1) -> list[int]:
    """The ``k`` highest local maxima of ``scores`` [T], at least ``min_gap`` apart."""
    order = torch.argsort(scores, descending=True).tolist()
    out: list[int] = []
    for t in order:
        if all(abs(t - u) >= min_gap for u in out):
            out.append(t)
            if len(out) == k:
                break
    return out


def candidate_timesteps(problem: Any, candidates: int) -> tuple[list[list[float]], str]:
    """Per candidate, one timestep per image, and how they were chosen."""
    T, b = problem.num_timesteps, problem.shape[0]
    scores = timestep_scores(problem)
    if scores is None:
        grid = [(c + 0.5) * T / candidates for c in range(candidates)]
        return [[g] * b for g in grid], "grid"
    gap = max(1, T // 100)  # neighbours of one peak are the same candidate
    if b == 1:
        return [[float(t)] for t in score_peaks(scores, candidates, min_gap=gap)], "subspace"
    peaks = [float(t) for t in score_peaks(scores, b * max(1, candidates), min_gap=gap)]
    # candidate c: the B best peaks, rotated by c (which image slot gets which t is free)
    sets = [sorted(peaks[:b])]
    for c in range(1, candidates):
        alt = peaks[:b - 1] + peaks[b - 1 + c:b + c]
        if len(alt) == b:
            sets.append(sorted(alt))
    return sets, "subspace"
