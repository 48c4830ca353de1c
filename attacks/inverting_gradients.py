"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

"Inverting Gradients -- How easy is it to break privacy in federated learning?": find images
whose gradient points in the same DIRECTION as the observed one,

    min_x  1 - cos(grad_theta L(x, y), g_obs) + tv_weight * TV(x),   x in [0, 1],

with Adam on the sign of the gradient, a step-decayed learning rate (x0.1 at 3/8, 5/8, 7/8 of
the budget), a random-normal start and the best of ``restarts`` runs (by final objective).
For FedAvg deltas the client's local SGD steps are unrolled differentiably (sec. 5 of the
paper). An optional BatchNorm-statistics prior follows GradInversion (Yin et al., CVPR 2021).

Conventions (as breaching, the reference implementation): the image is optimised and its TV
measured in the task's NORMALISED coordinates ``z = (x - mean) / std`` (so ``lr = 0.1`` and
``tv_weight = 0.2`` mean what they mean there); the model is evaluated at the record's global
state with BatchNorm in eval mode (running statistics, as in the reference cases).
All ``R`` restarts are optimised as one ``[R, N, C, H, W]`` tensor; the per-restart updates
come from one :func:`torch.func.vmap` call. By default the batch is pruned by successive
halving (:func:`pruning_schedule`): the worse half by the matching objective is dropped at
1/16, 1/8 and 1/4 of the budget (eight restarts), so eight restarts cost about two plain
runs instead of eight; ``restart_pruning="none"`` is the paper's protocol.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.base import Attack, Reconstruction
from attacks.diffusion_matching import granted_aux, is_diffusion
from attacks.gradients import (
    Params,
    attack_task,
    mean_gradient_target,
    split_state,
    target_from_record,
)
from attacks.objectives import (
    BNStatistics,
    NormalisedImages,
    bn_prior,
    cosine_distance,
    l2_distance,
    lr_multiplier,
    simulated_update,
    total_variation,
)
from attacks.restarts import pruning_schedule, sliced_adam
from attacks.second_order import LeanSecondOrder
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.tasks.base import Batch

LabelSource = Literal["granted", "idlg", "batch", "auto"]
MultiStep = Literal["auto", "unroll", "single"]
Schedule = Literal["step", "cosine", "linear"]
Distance = Literal["cosine", "l2"]
RestartPruning = Literal["halving", "none"]
DoubleBackward = Literal["lean", "autograd"]
AuxSource = Literal["none", "granted"]
#: called as ``callback(iteration, images [R, N, C, H, W])`` after each step (benchmarks)
Callback = Callable[[int, Tensor], None]


@dataclass(frozen=True)
class Unroll:
    """How to simulate a multi-step update: each of ``clients`` clients takes ``steps`` SGD
    steps at ``lr`` on ``batch_size`` of its own images; their deltas are averaged."""

    lr: float
    steps: int
    batch_size: int
    clients: int = 1


@dataclass
class InversionProblem:
    """Everything the optimisation needs, built from one record (no ground truth).

    ``target``: the observed update per parameter (sign-flipped, scaled delta when a delta is
    matched as one gradient); ``labels``: ``[N]``; ``unroll``: None for gradient matching;
    ``aux``: the client's private randomness the loss needs (diffusion ``eps [S, C, H, W]``
    and ``t [S]``, all local steps' rows; ``{}`` for a classifier).
    """

    task: Any
    params: Params
    buffers: Params
    target: Params
    labels: Tensor
    unroll: Unroll | None
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aux: Mapping[str, Tensor] = field(default_factory=dict)


def _update_fn(problem: InversionProblem, bn: BNStatistics | None, double_backward: str = "lean"
               ) -> Callable[[Tensor], tuple[Params, Tensor | None]]:
    """``images [R, N, C, H, W] -> ({name: [R, ...]}, bn prior [R] | None)`` of the problem."""
    u = problem.unroll
    if u is None:
        return _gradient_fn(problem, bn, double_backward)
    if u.clients == 1:
        plan = (u.lr, u.steps, u.batch_size)

        def fn(images: Tensor) -> tuple[Params, Tensor | None]:
            return simulated_update(problem.task, problem.params, problem.buffers, images,
                                    problem.labels, unroll=plan, bn=bn, aux=problem.aux)
        return fn

    def several(images: Tensor) -> tuple[Params, Tensor | None]:
        # FedAvg over `clients` equal-sized clients: mean of each client's unrolled delta.
        per = images.shape[1] // u.clients
        total: dict[str, Tensor] = {}
        prior: Tensor | None = None
        for c in range(u.clients):
            upd, pc = simulated_update(
                problem.task, problem.params, problem.buffers,
                images[:, c * per:(c + 1) * per], problem.labels[c * per:(c + 1) * per],
                unroll=(u.lr, u.steps, u.batch_size), bn=bn)
            for k, v in upd.items():
                total[k] = total[k] + v / u.clients if k in total else v / u.clients
            if pc is not None:
                prior = pc / u.clients if prior is None else prior + pc / u.clients
        return total, prior
    return several


@dataclass
class Inversion:
    """Result of :func:`invert`.

    ``images [S, N, C, H, W]`` in [0, 1], ``objective [S]`` and ``distance [S]`` at the final
    (clamped) images of the ``S`` restarts that ran the whole budget, whose original indices
    are ``survivors``; ``pruning`` lists each halving (iteration, objective per candidate,
    kept/dropped original indices); ``evaluations`` counts image-gradient evaluations
    (restarts x iterations, plus the final scoring pass of the survivors).
    """

    images: Tensor
    objective: Tensor
    distance: Tensor
    survivors: list[int]
    pruning: list[dict[str, Any]]
    evaluations: int


def _gradient_fn(problem: InversionProblem, bn: BNStatistics | None, double_backward: str
                 ) -> Callable[[Tensor], tuple[Params, Tensor | None]]:
    """The FedSGD gradient of the candidates: vmapped :func:`simulated_update` for ``R > 1``,
    plain double-backprop autograd for ``R = 1`` (no ``torch.func`` wrappers: the common
    single-restart case and the tail of successive halving), built inside
    :class:`~attacks.second_order.LeanSecondOrder` when ``double_backward == "lean"``. Same
    values either way (to float rounding)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in problem.params.items()}
    names = list(leaves)
    order = [leaves[k] for k in names]

    def fn(images: Tensor) -> tuple[Params, Tensor | None]:
        if images.shape[0] != 1:
            return simulated_update(problem.task, problem.params, problem.buffers, images,
                                    problem.labels, unroll=None, bn=bn, aux=problem.aux)
        outer = torch.is_grad_enabled() and images.requires_grad
        lean = LeanSecondOrder() if outer and double_backward == "lean" else None
        with torch.enable_grad(), lean or contextlib.nullcontext():
            batch = Batch(images[0], problem.labels)
            prior = None
            if bn is None:
                loss = problem.task.loss(leaves, problem.buffers, batch, problem.aux)
            else:
                with bn.recording() as stats:
                    loss = problem.task.loss(leaves, problem.buffers, batch, problem.aux)
                prior = bn_prior(stats, problem.buffers, bn.running).unsqueeze(0)
        with torch.enable_grad():
            grads = (lean.parameter_grads(loss, order, create_graph=True) if lean is not None
                     else torch.autograd.grad(loss, order, create_graph=outer))
        upd = {k: g.unsqueeze(0) for k, g in zip(names, grads, strict=True)}
        if not outer:
            upd = {k: g.detach() for k, g in upd.items()}
            prior = None if prior is None else prior.detach()
        return upd, prior
    return fn


def invert(problem: InversionProblem, *, max_iterations: int, restarts: int, lr: float,
           tv_weight: float, bn_prior_weight: float = 0.0, schedule: str = "step",
           distance: str = "cosine", restart_pruning: str = "halving", keep: int = 1,
           double_backward: str = "lean", generator: torch.Generator,
           callback: Callback | None = None) -> Inversion:
    """Optimise ``restarts`` candidate batches at once (Geiping et al. 2020, Alg. in sec. 4).

    All restarts start together as one ``[R, N, C, H, W]`` batch. With
    ``restart_pruning="halving"`` the batch is halved at the iterations of
    :func:`pruning_schedule` (keeping the restarts of lowest current objective, ties to the
    lower index; the image tensor and Adam's moments are sliced alike) until ``keep`` remain;
    ``"none"`` runs every restart for the whole budget (the paper's protocol). The callback
    sees the current survivors only. ``double_backward="lean"`` builds single-restart
    gradients inside :class:`~attacks.second_order.LeanSecondOrder` (``"autograd"``: stock
    formulas). Raises ``ValueError`` if the BN prior is asked for on a model without BatchNorm.
    """
    bn = BNStatistics(problem.task.model) if bn_prior_weight > 0 else None
    update_of = _update_fn(problem, bn, double_backward)
    dist = cosine_distance if distance == "cosine" else l2_distance
    # contiguous once: the distances flatten the target every iteration (a non-contiguous
    # gradient, e.g. a strided conv's from a module backward, would be copied each time)
    target = {k: v.contiguous() for k, v in problem.target.items()}
    target_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in target.values()))
    n = int(problem.labels.shape[0])
    device = next(iter(problem.params.values())).device
    cand = NormalisedImages((restarts, n, *problem.shape), problem.mean, problem.std,
                            generator=generator, device=device)

    def objective(z: Tensor) -> tuple[Tensor, Tensor]:
        images = z * cand.std + cand.mean
        upd, prior = update_of(images)
        d = dist(upd, target, target_norm=target_norm)
        total = d + tv_weight * total_variation(z) if tv_weight else d
        if prior is not None:
            total = total + bn_prior_weight * prior
        return total, d

    plan = dict(pruning_schedule(restarts, max_iterations, keep)
                if restart_pruning == "halving" else [])
    alive = list(range(restarts))
    pruning: list[dict[str, Any]] = []
    evaluations = 0
    opt = torch.optim.Adam([cand.z], lr=lr)
    for it in range(max_iterations):
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier(schedule, it, max_iterations)
        total, _ = objective(cand.z)
        (grad,) = torch.autograd.grad(total.sum(), cand.z)
        evaluations += len(alive)
        if it in plan:
            # total = objective of the current (clamped) images: the final choice's criterion
            scores = total.detach().tolist()
            order = sorted(range(len(alive)), key=lambda i: (scores[i], i))[:plan[it]]
            order.sort()
            pruning.append({"iteration": it, "candidates": list(alive),
                            "objectives": scores,
                            "kept": [alive[i] for i in order],
                            "dropped": [a for i, a in enumerate(alive) if i not in order]})
            idx = torch.tensor(order, device=device)
            alive = [alive[i] for i in order]
            cand.z, opt = sliced_adam(opt, cand.z, idx)
            grad = grad[idx]
        cand.z.grad = grad.sign_()
        opt.step()
        cand.clamp_()
        if callback is not None:
            callback(it, cand.images().detach())
    with torch.no_grad():
        total, d = objective(cand.z)
    evaluations += len(alive)
    return Inversion(cand.images().detach().clamp_(0, 1), total.detach(), d.detach(), alive,
                     pruning, evaluations)


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"inverting_gradients.{name}: got {value!r}; allowed: {allowed}")


@ATTACKS.register("inverting_gradients")
class InvertingGradients(Attack):
    """Inverting Gradients (Geiping et al. 2020): cosine gradient matching + TV, sign-Adam.

    Hyper-parameters: ``max_iterations`` per restart; ``restarts`` optimised as one batch, the
    lowest final objective wins; ``lr`` (Adam, on sign gradients, normalised-image units);
    ``tv_weight`` (TV of the normalised image, breaching's 0.2); ``labels``: ``"granted"``
    (needs knowledge ``labels``), ``"idlg"``, ``"batch"`` or ``"auto"`` (iDLG for one image,
    counts otherwise; :mod:`attacks.label_recovery`); ``bn_prior_weight`` (GradInversion's
    BN-statistics prior, models with BatchNorm only); ``multi_step`` for ``"delta"`` records:
    ``"unroll"`` simulates the local training, ``"single"`` matches ``-delta`` as one
    gradient, ``"auto"`` unrolls when ``local_steps > 1``; ``schedule`` of the learning rate
    (``"step"`` = the paper's); ``distance`` (``"cosine"``, or DLG's ``"l2"``);
    ``restart_pruning``: ``"halving"`` (default) drops the worse half of the restarts by the
    current matching objective (the same objective that picks the final winner) at 1/16,
    1/8 and 1/4 of the budget for eight restarts (:func:`pruning_schedule`) until
    ``restart_keep`` remain, which run the rest of the budget; ``"none"`` is the paper's
    protocol (every restart runs the full budget; R times the cost). ``extras`` records the
    survivors' final objectives (``restart_objectives``, aligned with ``survivors``), the
    ``pruning`` schedule and the number of image-gradient ``evaluations``.
    ``double_backward``: ``"lean"`` (default) differentiates single-restart FedSGD gradients
    without the weight-side work stock autograd does for convolutions
    (:mod:`attacks.second_order`; same values, 15–20 % faster on the ConvNet); ``"autograd"``
    uses the stock formulas.
    ``aux``: on a DIFFUSION update (task ``diffusion``), ``"granted"`` asks the threat model
    for the client's noise and timesteps (knowledge ``eps``, ``t``) and recomputes the
    diffusion loss with them, per local step when unrolling (:mod:`attacks.diffusion_matching`);
    ``"none"`` (default) on a diffusion record raises :class:`~fl_sim.errors.ThreatModelError`
    naming that knowledge. Labels do not exist there (unconditional UNet): none are recovered.

    Unrolling ASSUMES KNOWN: the client's ``lr``, ``local_steps`` and ``batch_size`` (from the
    record), that step ``k`` used images ``k*B .. k*B+B-1`` of its ``num_examples`` images in
    a fixed order (wrapping around), plain SGD without momentum or weight decay, and BatchNorm
    running statistics that do not change during local training (eval mode). Those
    ``num_examples`` images are reconstructed. Raises :class:`~fl_sim.errors.ConfigError` for
    a bad hyper-parameter, or a BN prior on a model without BatchNorm.
    """

    def __init__(self, *, max_iterations: int = 600, restarts: int = 1, lr: float = 0.1,
                 tv_weight: float = 0.2, labels: LabelSource = "auto",
                 bn_prior_weight: float = 0.0, multi_step: MultiStep = "auto",
                 schedule: Schedule = "step", distance: Distance = "cosine",
                 restart_pruning: RestartPruning = "halving", restart_keep: int = 1,
                 double_backward: DoubleBackward = "lean", aux: AuxSource = "none") -> None:
        _check("max_iterations", max_iterations >= 1, max_iterations, ">= 1")
        _check("restarts", restarts >= 1, restarts, ">= 1")
        _check("lr", lr > 0, lr, "> 0")
        _check("tv_weight", tv_weight >= 0, tv_weight, ">= 0")
        _check("bn_prior_weight", bn_prior_weight >= 0, bn_prior_weight, ">= 0")
        _check("labels", labels in ("granted", "idlg", "batch", "auto"), labels,
               "granted, idlg, batch, auto")
        _check("multi_step", multi_step in ("auto", "unroll", "single"), multi_step,
               "auto, unroll, single")
        _check("schedule", schedule in ("step", "cosine", "linear"), schedule,
               "step, cosine, linear")
        _check("distance", distance in ("cosine", "l2"), distance, "cosine, l2")
        _check("restart_pruning", restart_pruning in ("halving", "none"), restart_pruning,
               "halving, none")
        _check("restart_keep", restart_keep >= 1, restart_keep, ">= 1")
        _check("double_backward", double_backward in ("lean", "autograd"), double_backward,
               "lean, autograd")
        _check("aux", aux in ("none", "granted"), aux, "none, granted")
        self.double_backward, self.aux = double_backward, aux
        self.restart_pruning, self.restart_keep = restart_pruning, restart_keep
        self.max_iterations, self.restarts, self.lr = max_iterations, restarts, lr
        self.tv_weight, self.labels, self.bn_prior_weight = tv_weight, labels, bn_prior_weight
        self.multi_step, self.schedule, self.distance = multi_step, schedule, distance

    def required_knowledge(self) -> tuple[str, ...]:
        labels = ("labels",) if self.labels == "granted" else ()
        return labels + (("eps", "t") if self.aux == "granted" else ())

    # -- building the problem from a record (overridden by peer_inversion) -----------------
    def num_images(self, record: ObservationRecord) -> int:
        """Images behind the update: the batch (gradient) or all local examples (delta)."""
        return record.batch_size if record.update_kind == "gradient" else record.num_examples

    def unroll_plan(self, record: ObservationRecord) -> Unroll | None:
        """The local training to simulate, or None to match the update as one gradient."""
        if record.update_kind == "gradient":
            return None
        if self.multi_step == "single" or (self.multi_step == "auto"
                                           and record.local_steps <= 1):
            return None
        if record.lr <= 0 or record.local_steps < 1 or record.batch_size < 1:
            raise ConfigError(f"inverting_gradients.multi_step: unrolling needs lr > 0, "
                              f"local_steps >= 1, batch_size >= 1 in the record; got "
                              f"{record.lr}, {record.local_steps}, {record.batch_size}")
        return Unroll(float(record.lr), int(record.local_steps), int(record.batch_size))

    def problem(self, record: ObservationRecord, *,
                generator: torch.Generator) -> tuple[InversionProblem, str]:
        """The :class:`InversionProblem` of ``record`` and where its labels came from."""
        task = attack_task(record, device=self.device)
        params, buffers = split_state(task, record.global_params)
        unroll = self.unroll_plan(record)
        # an unrolled delta is matched as observed; otherwise as a mean gradient
        target = (target_from_record(record, task) if unroll is not None
                  else mean_gradient_target(record, task))
        n = self.num_images(record)
        aux = self._aux(record, task, n, unroll)
        if is_diffusion(task):  # an unconditional UNet's loss takes no labels
            labels, source = torch.zeros(n, dtype=torch.int64), "none (unconditional model)"
        else:
            labels, source = self._labels(record, task, n, generator)
        spec = record.spec
        dev = self.device
        return InversionProblem(task, params, buffers,
                                {k: v.to(dev) for k, v in target.items()}, labels.to(dev),
                                unroll, (spec.in_channels, spec.image_size, spec.image_size),
                                tuple(spec.mean), tuple(spec.std),
                                {k: v.to(dev) for k, v in aux.items()}), source

    def _aux(self, record: ObservationRecord, task: Any, n: int,
             unroll: Unroll | None) -> dict[str, Tensor]:
        """The granted diffusion eps/t (``{}`` for a classifier), rows checked against the
        images (FedSGD) or the unrolled steps x batch size (FedAvg)."""
        if not is_diffusion(task):
            return {}
        name = type(self).__name__
        if self.aux != "granted":
            raise ThreatModelError(f"{name} on a diffusion update needs the client's noise and "
                                   "timesteps: set aux = \"granted\" (knowledge ['eps', 't']), "
                                   "or use gidm_plus, which searches for them")
        aux = granted_aux(record, task, attack=name)
        rows = n if unroll is None else unroll.steps * unroll.batch_size * unroll.clients
        if unroll is None and record.update_kind == "delta":
            rows = int(aux["t"].shape[0])  # a delta matched as one gradient: all steps' rows
            if rows != n:
                raise ConfigError(f"{name}: a delta matched as one gradient needs one eps/t "
                                  f"row per image; got {rows} rows for {n} images (use "
                                  "multi_step = \"unroll\")")
        if int(aux["t"].shape[0]) != rows:
            raise ConfigError(f"{name}: granted eps/t hold {aux['t'].shape[0]} rows; the "
                              f"update needs {rows} (images x local steps)")
        return aux

    def _labels(self, record: ObservationRecord, task: Any, n: int,
                generator: torch.Generator) -> tuple[Tensor, str]:
        if self.labels == "granted":
            labels = torch.as_tensor(record.knowledge["labels"]).long().flatten()
            if labels.numel() != n:
                raise ConfigError(f"inverting_gradients.labels: {labels.numel()} granted "
                                  f"labels for {n} images")
            return labels, "granted"
        from attacks.label_recovery import recover_labels
        method = ("idlg" if n == 1 else "batch") if self.labels == "auto" else self.labels
        return recover_labels(record, method, n, task=task, generator=generator), method

    def reconstruct(self, record: ObservationRecord, *, generator: torch.Generator,
                    callback: Callback | None = None) -> Reconstruction:
        """Invert ``record``'s update: ``images [N, C, H, W]`` of the best restart + labels."""
        problem, label_source = self.problem(record, generator=generator)
        if self.bn_prior_weight > 0 and not _has_bn(problem.task.model):
            raise ConfigError("inverting_gradients.bn_prior_weight: got "
                              f"{self.bn_prior_weight}, but model {record.spec.model!r} has no "
                              "BatchNorm layer; allowed: 0")
        res = invert(
            problem, max_iterations=self.max_iterations, restarts=self.restarts, lr=self.lr,
            tv_weight=self.tv_weight, bn_prior_weight=self.bn_prior_weight,
            schedule=self.schedule, distance=self.distance,
            restart_pruning=self.restart_pruning, keep=self.restart_keep,
            double_backward=self.double_backward,
            generator=generator, callback=callback)
        total = res.objective
        pos = int(torch.argmin(total))  # first minimum: ties go to the lower restart index
        return Reconstruction(
            images=res.images[pos], labels=problem.labels.clone(),
            matching_loss=float(total[pos]), iterations=self.max_iterations,
            assumed=self._assumed(record, problem, label_source),
            extras={"restart_objectives": total.tolist(),
                    "restart_distances": res.distance.tolist(),
                    "survivors": res.survivors, "best_restart": res.survivors[pos],
                    "restart_pruning": self.restart_pruning, "pruning": res.pruning,
                    "evaluations": res.evaluations})

    def _assumed(self, record: ObservationRecord, problem: InversionProblem,
                 label_source: str) -> Mapping[str, Any]:
        out: dict[str, Any] = {"labels": label_source, "num_images": len(problem.labels),
                               "batchnorm": "eval"}
        if problem.unroll is not None:
            u = problem.unroll
            out["local_training"] = {"lr": u.lr, "local_steps": u.steps,
                                     "batch_size": u.batch_size, "clients": u.clients,
                                     "batch_order": "sequential", "optimizer": "sgd",
                                     # recovered labels are sorted: image slot k (and so its
                                     # local step) gets the k-th smallest label
                                     "label_order": ("as granted" if label_source == "granted"
                                                     else "sorted by class")}
        elif record.update_kind == "delta":
            out["local_training"] = "delta matched as one gradient"
        return out


def _has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
