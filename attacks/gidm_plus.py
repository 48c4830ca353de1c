"""GIDM+: invert a diffusion-model update when the client's noise eps and timestep t are private.

"Gradient Inversion of Federated Diffusion Models" (Huang, Hong, Chen, Roos, arXiv 2405.20380),
GIDM+: the server sees the FedSGD gradient of the DDPM loss
``mean((eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t))**2)`` but neither eps nor
t, and optimises image, noise and timestep together ("triple optimisation"). Per image the
unknowns are ``x0`` ([C, H, W]), ``eps`` ([C, H, W]) and a real ``t``; a candidate's objective

    |g - g_obs|^2 / |g_obs|^2 + eps_weight * P(eps) + t_weight * (1 - cos(g_te, g_obs_te))
        (+ tv_weight * TV(x0))

is the squared L2 distance of the gradients over all parameters (the norm carries the noise
level, so scale is matched too: the same distance as GIDM's), the Gaussian prior on the noise
``P(eps) = mean_b[mean(eps_b)^2 + (var(eps_b) - 1)^2]`` (the first two moments of N(0, I); a
norm-only penalty lets eps drift to a shifted or structured pattern of the right norm), and
the cosine distance of the time-embedding MLP's gradients (``g_te``), which for one image
depends on t alone (:mod:`attacks.components.diffusion_timesteps`; measured on a digits prior at a
random start: the global L2 distance was no lower at the true t = 830 than at 900, 0.145 vs
0.140, while its time-embedding part was 9x lower, 0.16 vs 1.43).

t is searched for real, in two ways:

1. a **scored sweep** (:func:`search_t`): candidate timesteps are the best peaks of
   :func:`~attacks.components.diffusion_timesteps.timestep_scores` (equally spaced ones for a model
   without diffusers' time embedding, then refined on a finer grid around the winner); all
   candidates start from the same random latent and noise, are optimised as one batch
   (``torch.func.vmap``) for ``sweep_iterations`` with t frozen and halved by the objective;
2. a **continuous relaxation** in both phases: t is a real number, the UNet takes it as a
   float timestep (the sinusoidal embedding is continuous in t) and ``abar`` is interpolated
   linearly between integer steps (:func:`abar_at`), so Adam moves t with the rest.

Phases as GIDM's (:mod:`attacks.gidm`): phase 1 optimises the latent ``z`` of the K-step DDIM
sampler of the prior (default the record's global model), eps and t; phase 2 the pixels
(model space [-1, 1], clamped), eps and t, from phase 1's image. ``phase1_iterations=0``
skips the prior (pixel-only GIDM+).

``eps_solve="last_layer"`` (NEW, not the paper's; issue 25): t first -- for one image t is
the top peak of :func:`timestep_scores`, fixed before phase 1 (no sweep; for a batch, the
sweep's t rounded to integer steps after phase 2) -- and after phase 2 the search continues
over ``x_t`` ALONE, the noise being
solved at every evaluation from the output convolution's gradient, which is linear in the
residual ``eps_theta(x_t, t) - eps`` with coefficients from the layer's input at ``x_t``
(:mod:`attacks.components.noise_solve`; batch 1 at 16x16: 289 equations for 256 unknowns, full
rank); then ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``. The stage keeps phase 2's result when
it does not match the observed gradient better or its x0 leaves the box. What it buys
(``benchmarks/RESULTS.md``, issue 25): t exactly at batch 1; at the TRUE x_t the solve returns
eps to ~1e-6 and x0 at 90+ dB; L-BFGS over x_t converges to image and noise from starts 20 %
(relative) off the true x_t (eps error 0.02-0.07, 19-53 dB), only partly from 50 % off. But
GIDM+'s own x_t is 82-138 % off (its eps is a random draw and x_t is mostly eps at high t),
outside that basin, so the end-to-end images do not improve by the 10 dB asked for -- a
measured negative result. Why: the gradient fixes the residual GIVEN x_t, not x_t itself;
over x_t with eps solved there are far-off points of very low distance (1.6e-4 relative at
t = 800 with x_t 140 % off: lower than GIDM's own objective with the true eps reaches from a
50 % start), because the solve lets eps absorb whatever the output layer needs. The
identity turns the 256-dim eps problem into a 256-dim x_t problem, not an easier one.

Deviations from the paper, and why:

- The authors' public code starts eps from the TRUE noise and steps t a few times around a
  guess; here eps starts from a fresh N(0, I) draw of the attack's own generator and t from
  the sweep, so nothing private is used (``required_knowledge()`` is empty).
- The paper alternates the three variables; here they move jointly (one gradient of one
  objective): one double backward per step instead of three.
- The time-embedding reading of t and the cosine term are ours: without them the sweep's
  short optimisations ranked wrong timesteps first on the digits prior.
- With ``B > 1`` images, candidate c assigns the B best peaks to the B image slots (which
  slot gets which t is immaterial: the slots' images and noise are free).
- FedAvg ``delta`` records are read as one mean gradient (``mean_gradient_target``): exact
  for one local step, an approximation otherwise (each step's own eps/t are not unrolled).

Raises :class:`~fl_sim.errors.ConfigError` for bad hyper-parameters or a record that is not
of a diffusion task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from attacks.base import Attack, Reconstruction
from attacks.components.ddim_sampler import CHECKPOINT_MODES, Checkpoint
from attacks.components.diffusion_timesteps import (
    TIME_EMBEDDING_PREFIX,
    candidate_timesteps,
    score_peaks,
    timestep_scores,
)
from attacks.components.gradients import attack_task, mean_gradient_target, split_state
from attacks.components.relaxed_diffusion import (
    Candidates,
    Problem,
    Render,
    Weights,
    abar_at,
    candidate_gradients,
    eps_prior,
    objective,
    optimise,
    relaxed_loss,
)
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS

__all__ = ["GIDMPlus", "search_t", "problem_from_record", "latent_renderer",
           # re-exported: the objective (attacks.components.relaxed_diffusion) and the t scores
           "abar_at", "relaxed_loss", "Problem", "Candidates", "Weights", "objective",
           "optimise", "eps_prior", "candidate_gradients", "timestep_scores", "score_peaks",
           "candidate_timesteps"]


# -- the search over t ----------------------------------------------------------------------
def _start(problem: Problem, generator: torch.Generator, r: int, t0: float, *,
           latent: bool = False) -> Candidates:
    """One random start shared by ``r`` candidates: pixels ``~ N(0, 0.5^2)`` clamped (or a
    latent ``~ N(0, I)``), eps ``~ N(0, I)``, t = ``t0``."""
    b, c, h, wd = problem.shape
    x = torch.randn((1, b, c, h, wd), generator=generator)
    x = x if latent else (0.5 * x).clamp(-1, 1)
    eps = torch.randn((1, b, c, h, wd), generator=generator)
    t = torch.full((1, b), float(t0))
    dev = next(iter(problem.params.values())).device
    return Candidates(x.to(dev), eps.to(dev), t.to(dev)).select(torch.zeros(r, dtype=torch.long,
                                                                             device=dev))


def _sweep(problem: Problem, cand: Candidates, w: Weights, iterations: int,
           log: list[dict[str, Any]], stage: str, render: Render) -> Candidates:
    """Optimise candidates with t frozen, halving them by objective until one is left.

    ``iterations`` are split evenly over the ``ceil(log2 R) + 1`` rounds.
    """
    rounds = max(1, math.ceil(math.log2(max(cand.x.shape[0], 1))) + 1)
    per = max(1, iterations // rounds)
    while True:
        scores = optimise(problem, cand, w, per, move_t=False, decay=False, render=render)
        log.append({"stage": stage, "t": cand.t.detach().tolist(),
                    "objective": scores.tolist()})
        r = cand.x.shape[0]
        if r == 1:
            return cand
        keep = torch.argsort(scores)[:max(1, r // 2)]
        cand = cand.select(keep.sort().values)


def search_t(problem: Problem, w: Weights, *, generator: torch.Generator, candidates: int,
             sweep_iterations: int, refine_candidates: int, refine_iterations: int,
             render: Render = None) -> tuple[Candidates, list[dict[str, Any]]]:
    """Scored sweep over timestep candidates, each optimised briefly with t frozen.

    Candidates: the ``candidates`` best peaks of :func:`timestep_scores` (for ``B > 1``,
    sets of B peaks), or ``candidates`` equally spaced timesteps shared by the batch when the
    model has no time-embedding structure; the latter is followed by a finer sweep of
    ``refine_candidates`` around the winner, warm-started from its images and noise. All
    candidates start from the same random images and noise. Returns the best candidate
    (``R = 1``) and the log of every scoring round (``stage``, ``t``, ``objective``).
    """
    T = problem.num_timesteps
    ts, how = candidate_timesteps(problem, candidates)
    log: list[dict[str, Any]] = [{"stage": how, "t": ts}]
    cand = _start(problem, generator, len(ts), 0.0, latent=render is not None)
    with torch.no_grad():
        cand.t.copy_(torch.tensor(ts, device=cand.t.device))
    best = _sweep(problem, cand, w, sweep_iterations, log, "sweep", render)
    if how == "grid" and refine_candidates > 1 and refine_iterations > 0:
        step = T / candidates / refine_candidates
        centre = float(best.t.detach()[0].mean())
        offsets = [(k - (refine_candidates - 1) / 2) * step for k in range(refine_candidates)]
        fine = best.select(torch.zeros(refine_candidates, dtype=torch.long,
                                       device=best.t.device))
        with torch.no_grad():
            ts_f = torch.tensor([min(max(centre + o, 0.0), T - 1.0) for o in offsets],
                                device=fine.t.device)
            fine.t.copy_(ts_f.view(-1, 1).expand_as(fine.t))
        best = _sweep(problem, fine, w, refine_iterations, log, "refine", render)
    return best, log


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"gidm_plus.{name}: got {value!r}; allowed: {allowed}")


def problem_from_record(record: ObservationRecord, device: torch.device | str = "cpu"
                        ) -> Problem:
    """The :class:`Problem` of a diffusion record (FedSGD gradient, or a delta read as one
    mean gradient) on ``device``. Raises :class:`~fl_sim.errors.ConfigError` for a
    non-diffusion task."""
    if record.spec.task != "diffusion":
        raise ConfigError(f"gidm_plus attacks diffusion updates; the record's task is "
                          f"{record.spec.task!r}")
    task = attack_task(record)
    task.model.to(device)
    params, buffers = split_state(task, record.global_params, device=device)
    target = {k: v.to(device).contiguous()
              for k, v in mean_gradient_target(record, task).items()}
    target_sq = sum(float(v.double().square().sum()) for v in target.values())
    n = record.batch_size if record.update_kind == "gradient" else record.num_examples
    n = int(n or record.num_examples)
    shape = (n, record.spec.in_channels, record.spec.image_size, record.spec.image_size)
    time_params = tuple(k for k in target if k.startswith(TIME_EMBEDDING_PREFIX))
    return Problem(task, params, buffers, target, target_sq, shape, task.num_train_timesteps,
                   time_params)


def latent_renderer(record: ObservationRecord, problem: Problem, *, prior: str | None,
                    sampler_steps: int, checkpoint: Checkpoint = "none"
                    ) -> Callable[[Tensor], Tensor]:
    """``z [R, B, C, H, W] -> x0`` through the K-step differentiable DDIM sampler of the prior
    (GIDM's phase 1: :func:`attacks.gidm.build_sampler`; default the record's global model),
    gradient-checkpointed as ``checkpoint`` says (:meth:`~attacks.components.ddim_sampler.
    DDIMSampler.sample`)."""
    from attacks.gidm import build_sampler

    sample, _ = build_sampler(record, problem.task, problem.params, problem.buffers,
                              prior=prior, num_steps=sampler_steps,
                              device=next(iter(problem.params.values())).device)

    def render(z: Tensor) -> Tensor:
        return sample(z.flatten(0, 1), checkpoint=checkpoint).view(z.shape)
    return render


def _solve_stage(problem: Problem, cand: Candidates, total: Tensor, iterations: int
                 ) -> tuple[Candidates, Tensor, dict[str, Any]]:
    """``eps_solve="last_layer"`` (ours, issue 25): t = phase 2's, rounded to the integer
    steps DDPM trains on (for one image it is :func:`_top_peak`, fixed since the start), then
    L-BFGS over ``x_t`` alone
    from phase 2's ``sqrt(abar) x0 + sqrt(1 - abar) eps``, eps solved from ``conv_out``'s
    gradient (:mod:`attacks.components.noise_solve`). Keeps the solve's ``(x0, eps)`` only if it
    matches the observed gradient better than phase 2's AND its x0 stays (nearly) inside the
    box (mean excess over [-1, 1] at most ``_BOX_EXCESS``); both are observable."""
    from attacks.components.noise_solve import search_xt, x0_from

    t = cand.t.detach()[0].round().clamp(0, problem.num_timesteps - 1)
    abar = abar_at(problem.task.alphas_cumprod, t).view(-1, 1, 1, 1)
    x0, eps = cand.x.detach()[0], cand.eps.detach()[0]
    with torch.no_grad():
        before = float(objective(problem, cand, _NO_PRIOR)[1][0])
    x_t, eps_s, dist, history = search_xt(problem, abar.sqrt() * x0 + (1 - abar).sqrt() * eps,
                                          t, iterations=iterations)
    with torch.no_grad():
        x0_s = x0_from(problem, x_t, eps_s, t)
    # an image outside [-1, 1] is no image: at a wrong x_t the solve often matches the
    # gradient better than phase 2 with an x0 far out of the box (measured: 4.7 dB kept)
    excess = float((x0_s.abs() - 1).clamp_min(0).mean())
    keep = dist < before and excess <= _BOX_EXCESS
    extras = {"solve_matching_loss": dist, "phase2_matching_distance": before,
              "solve_evaluations": len(history), "solve_box_excess": excess,
              "solve_kept": keep}
    if not keep:
        return cand, total, extras
    return (Candidates(x0_s.clamp(-1, 1)[None], eps_s[None], t[None]), torch.tensor([dist]),
            extras)


def _top_peak(problem: Problem) -> float | None:
    """For ONE image, the top peak of :func:`timestep_scores` (the t whose embedding lies in
    the observed time-embedding gradient's row space: exact on every digits case measured,
    where the sweep's short optimisations sometimes pick an alias peak, e.g. 902 for 911);
    None for a batch or a model without that structure."""
    scores = timestep_scores(problem) if problem.shape[0] == 1 else None
    return None if scores is None else float(torch.argmax(scores))


#: the largest mean excess of the solved x0 over the box [-1, 1] (model space) still kept
_BOX_EXCESS = 0.01
#: scores the plain matching distance (no eps / t / TV terms)
_NO_PRIOR = Weights(eps_weight=0.0, tv_weight=0.0, lr=0.0, t_lr=0.0, t_weight=0.0)


@ATTACKS.register("gidm_plus")
class GIDMPlus(Attack):
    """GIDM+ (Huang et al. 2024): joint search of images, noise eps and timestep t.

    Threat model: honest-but-curious server, one client's FedSGD gradient (or FedAvg delta,
    read as one gradient) of the DDPM loss; eps and t are private (nothing is granted).
    Stages: the t sweep (:func:`search_t`: ``t_candidates`` candidates, ``sweep_iterations``
    shared by the halving rounds, then ``refine_candidates`` / ``refine_iterations`` on the
    grid fallback), run in the latent space of phase 1 when ``phase1_iterations > 0``;
    phase 1 (``phase1_iterations``): the DDIM latent (``sampler_steps``, ``lr_latent``) of
    the prior (``prior``: None = the global model, or a path from ``fl-sim train-prior``),
    eps and continuous t; phase 2 (``phase2_iterations``): pixels (``lr``), eps, t from
    phase 1's image. ``t_search``: ``"sweep"`` (default), ``"continuous"`` (t starts at
    ``t_init``, default the midpoint, and moves by gradient only) or ``"fixed"`` (t stays at
    ``t_init``; with ``learn_eps=False`` and no phase 1 this is pixel-only matching with eps
    and t guessed, the baseline). ``eps_lr``, ``t_lr`` (timesteps per step), ``eps_weight``
    (Gaussian-moment prior), ``t_weight`` (time-embedding cosine), ``tv_weight``.
    ``checkpoint``: gradient checkpointing of phase 1's sampler, as GIDM's (``"auto"``
    default, ``"none"``, ``"sampler"``, ``"full"``; docs/how-to/memory.md).
    ``eps_solve``: ``"none"`` (the paper's GIDM+) or ``"last_layer"`` (ours: then
    ``solve_iterations`` L-BFGS iterations over x_t with eps solved from ``conv_out``'s
    gradient, t rounded; see the module docstring for what it does and does not recover).
    ``extras``: recovered ``t`` (per image), ``eps`` ([B, C, H, W]), the ``t_search`` log and
    ``phase1_matching_loss`` (with ``eps_solve``: ``solve_matching_loss``,
    ``phase2_matching_distance``, ``solve_evaluations``, ``solve_kept``). Raises
    :class:`~fl_sim.errors.ConfigError` for bad values.
    """

    tasks = ("diffusion",)

    def __init__(self, *, phase1_iterations: int = 100, phase2_iterations: int = 100,
                 sampler_steps: int = 5, prior: str | None = None, t_search: str = "sweep",
                 t_candidates: int = 4, sweep_iterations: int = 24,
                 refine_candidates: int = 5, refine_iterations: int = 20,
                 t_init: float | None = None, learn_eps: bool = True, lr_latent: float = 0.1,
                 lr: float = 0.02, eps_lr: float = 0.05, t_lr: float = 1.0,
                 eps_weight: float = 0.1, t_weight: float = 1.0,
                 tv_weight: float = 0.0, eps_solve: str = "none",
                 solve_iterations: int = 100, checkpoint: Checkpoint = "auto") -> None:
        for name, v in (("phase1_iterations", phase1_iterations),
                        ("phase2_iterations", phase2_iterations),
                        ("refine_candidates", refine_candidates),
                        ("refine_iterations", refine_iterations)):
            _check(name, v >= 0, v, ">= 0")
        for name, v in (("sampler_steps", sampler_steps), ("t_candidates", t_candidates),
                        ("sweep_iterations", sweep_iterations)):
            _check(name, v >= 1, v, ">= 1")
        _check("t_search", t_search in ("sweep", "continuous", "fixed"), t_search,
               "'sweep', 'continuous', 'fixed'")
        _check("eps_solve", eps_solve in ("none", "last_layer"), eps_solve,
               "'none', 'last_layer'")
        _check("solve_iterations", solve_iterations >= 0, solve_iterations, ">= 0")
        self.eps_solve, self.solve_iterations = eps_solve, solve_iterations
        _check("checkpoint", isinstance(checkpoint, bool) or checkpoint in CHECKPOINT_MODES,
               checkpoint, ", ".join(repr(m) for m in CHECKPOINT_MODES))
        self.checkpoint = checkpoint
        for name, v in (("lr_latent", lr_latent), ("lr", lr), ("eps_lr", eps_lr)):
            _check(name, v > 0, v, "> 0")
        for name, v in (("t_lr", t_lr), ("eps_weight", eps_weight), ("t_weight", t_weight),
                        ("tv_weight", tv_weight)):
            _check(name, v >= 0, v, ">= 0")
        self.phase1_iterations, self.phase2_iterations = phase1_iterations, phase2_iterations
        self.sampler_steps, self.prior, self.t_search, self.t_init = (sampler_steps, prior,
                                                                      t_search, t_init)
        self.t_candidates, self.sweep_iterations = t_candidates, sweep_iterations
        self.refine_candidates, self.refine_iterations = refine_candidates, refine_iterations
        self.learn_eps, self.lr_latent = learn_eps, lr_latent
        self.weights = Weights(eps_weight, tv_weight, lr, t_lr, t_weight, eps_lr)

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        problem = problem_from_record(record, self.device)
        render = (latent_renderer(record, problem, prior=self.prior,
                                  sampler_steps=self.sampler_steps,
                                  checkpoint=self.checkpoint)
                  if self.phase1_iterations else None)
        w2 = self.weights
        w1 = replace(w2, lr=self.lr_latent) if render is not None else w2
        log: list[dict[str, Any]] = []
        peak = _top_peak(problem) if self.eps_solve == "last_layer" else None
        if peak is not None:  # t first (issue 25): one image, the exact subspace peak
            cand = _start(problem, generator, 1, peak, latent=render is not None)
            log = [{"stage": "peak", "t": [[peak]]}]
        elif self.t_search == "sweep":
            cand, log = search_t(problem, w1, generator=generator, candidates=self.t_candidates,
                                 sweep_iterations=self.sweep_iterations,
                                 refine_candidates=self.refine_candidates,
                                 refine_iterations=self.refine_iterations, render=render)
        else:
            t0 = (problem.num_timesteps - 1) / 2 if self.t_init is None else self.t_init
            cand = _start(problem, generator, 1, t0, latent=render is not None)
        if not self.learn_eps:
            cand.eps.requires_grad_(False)
        move_t = self.t_search != "fixed" and w2.t_lr > 0 and peak is None
        phase1, phase1_images = float("nan"), None
        if render is not None:
            phase1 = float(optimise(problem, cand, w1, self.phase1_iterations, move_t=move_t,
                                    render=render)[0])
            with torch.no_grad():
                x = render(cand.x).clamp(-1, 1)
            phase1_images = ((x[0] + 1) / 2).cpu()
            cand = Candidates(x.requires_grad_(True), cand.eps.detach().clone()
                              .requires_grad_(self.learn_eps), cand.t.detach().clone()
                              .requires_grad_(True))
        total = optimise(problem, cand, w2, self.phase2_iterations, move_t=move_t)
        extras: dict[str, Any] = {}
        if self.eps_solve == "last_layer":
            cand, total, extras = _solve_stage(problem, cand, total, self.solve_iterations)
        images = ((cand.x.detach()[0] + 1) / 2).clamp(0, 1)
        extras.update({"t": cand.t.detach()[0].tolist(), "eps": cand.eps.detach()[0].clone(),
                       "t_search": log, "phase1_matching_loss": phase1})
        if phase1_images is not None:
            extras["phase1_images"] = phase1_images
        refined = any(entry["stage"] == "refine" for entry in log)
        spent = self.phase1_iterations + self.phase2_iterations + (
            (self.sweep_iterations if log and peak is None else 0)
            + (self.refine_iterations if refined else 0)
            + (self.solve_iterations if self.eps_solve == "last_layer" else 0))
        return Reconstruction(images, None, matching_loss=float(total[0]), iterations=spent,
                              knowledge={}, extras=extras)
