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
state with BatchNorm in ``model_mode`` (default ``"eval"``: running statistics, as in the
reference cases and breaching; ``"train"``: batch statistics, as fl-sim's clients train).
All ``R`` restarts are optimised as one ``[R, N, C, H, W]`` tensor; the per-restart updates
come from one :func:`torch.func.vmap` call. By default the batch is pruned by successive
halving (:func:`pruning_schedule`): the worse half by the matching objective is dropped at
1/16, 1/8 and 1/4 of the budget (eight restarts), so eight restarts cost about two plain
runs instead of eight; ``restart_pruning="none"`` is the paper's protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.adaptive import Adaptation, adaptation, single_example
from attacks.base import Attack, Reconstruction
from attacks.components.diffusion_matching import granted_aux, is_diffusion
from attacks.components.gradients import (
    attack_task,
    delta_scale,
    mean_gradient_target,
    split_state,
    target_from_record,
)
from attacks.components.inversion import (  # noqa: F401  (re-exported: the engine's historical home)
    Callback,
    Inversion,
    InversionProblem,
    Unroll,
    _update_fn,
    invert,
)
from attacks.components.local_optimizers import describe as describe_optimizer
from attacks.components.restarts import pruning_schedule  # noqa: F401  (re-exported)
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import LocalOptimizer, ObservationRecord
from fl_sim.registry import ATTACKS

LabelSource = Literal["granted", "idlg", "batch", "auto"]
MultiStep = Literal["auto", "unroll", "single"]
Schedule = Literal["step", "cosine", "linear"]
Distance = Literal["cosine", "l2"]
RestartPruning = Literal["halving", "none"]
DoubleBackward = Literal["lean", "autograd"]
AuxSource = Literal["none", "granted"]
OptimizerModel = Literal["record", "sgd"]
ModelMode = Literal["eval", "train"]


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
    counts otherwise; :mod:`attacks.components.label_recovery`); ``bn_prior_weight``
    (GradInversion's
    BN-statistics prior, models with BatchNorm only); ``multi_step`` for ``"delta"`` records:
    ``"unroll"`` simulates the local training, ``"single"`` matches ``-delta`` as one
    gradient, ``"auto"`` unrolls when ``local_steps > 1`` or the client trained with Adam
    (whose delta is no scaled gradient); ``schedule`` of the learning rate
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
    (:mod:`attacks.components.second_order`; same values, 15–20 % faster on the ConvNet);
    ``"autograd"`` uses the stock formulas.
    ``aux``: on a DIFFUSION update (task ``diffusion``), ``"granted"`` asks the threat model
    for the client's noise and timesteps (knowledge ``eps``, ``t``) and recomputes the
    diffusion loss with them, per local step when unrolling
    (:mod:`attacks.components.diffusion_matching`);
    ``"none"`` (default) on a diffusion record raises :class:`~fl_sim.errors.ThreatModelError`
    naming that knowledge. Labels do not exist there (unconditional UNet): none are recovered.

    Unrolling ASSUMES KNOWN: the client's ``lr``, ``local_steps`` and ``batch_size`` (from the
    record), that step ``k`` used images ``k*B .. k*B+B-1`` of its ``num_examples`` images in
    a fixed order (wrapping around), the client's local optimiser as the record states it
    (``record.optimizer``: plain SGD, SGD with momentum / weight decay, or Adam, state fresh
    each round; :mod:`attacks.components.local_optimizers`), and BatchNorm
    running statistics that do not change during local training (eval mode). Those
    ``num_examples`` images are reconstructed.
    ``local_optimizer``: ``"record"`` (default) unrolls with the optimiser the record says the
    client used; ``"sgd"`` assumes plain SGD at the record's lr whatever the client used (the
    paper's assumption; an ablation, e.g. against a client that trained with Adam).
    ``model_mode``: the BatchNorm mode assumed for the client's forward pass, as DLG / iDLG
    have it. ``"eval"`` (default here: the reference cases of ``tests/`` and breaching take
    their gradients in eval mode, and every documented figure was measured so) or ``"train"``
    (batch statistics: what :mod:`fl_sim.federation.local` clients do in a federation; on a
    BatchNorm network the eval-mode gradient of a train-mode update points elsewhere, cosine
    0.10 on the ConvNet-64 peer case). In train mode the images of a FedSGD aggregate of
    several clients are forwarded client by client (each client's own batch statistics).
    ``adaptive``: model the public defenses named in ``record.defenses`` when matching
    (:mod:`attacks.adaptive`: only a pruned update's surviving coordinates, a smooth scaled
    sign for signSGD, the clip bound of local DP, ...); ``extras["adapted_to"]`` says what
    was modelled. Raises :class:`~fl_sim.errors.ConfigError` for
    a bad hyper-parameter, or a BN prior on a model without BatchNorm.
    """

    def __init__(self, *, max_iterations: int = 600, restarts: int = 1, lr: float = 0.1,
                 tv_weight: float = 0.2, labels: LabelSource = "auto",
                 bn_prior_weight: float = 0.0, multi_step: MultiStep = "auto",
                 schedule: Schedule = "step", distance: Distance = "cosine",
                 restart_pruning: RestartPruning = "halving", restart_keep: int = 1,
                 double_backward: DoubleBackward = "lean", aux: AuxSource = "none",
                 adaptive: bool = False, local_optimizer: OptimizerModel = "record",
                 model_mode: ModelMode = "eval") -> None:
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
        _check("adaptive", isinstance(adaptive, bool), adaptive, "true, false")
        _check("local_optimizer", local_optimizer in ("record", "sgd"), local_optimizer,
               "record, sgd")
        _check("model_mode", model_mode in ("eval", "train"), model_mode, "eval, train")
        self.local_optimizer, self.model_mode = local_optimizer, model_mode
        self.double_backward, self.aux, self.adaptive = double_backward, aux, adaptive
        self.restart_pruning, self.restart_keep = restart_pruning, restart_keep
        self.max_iterations, self.restarts, self.lr = max_iterations, restarts, lr
        self.tv_weight, self.labels, self.bn_prior_weight = tv_weight, labels, bn_prior_weight
        self.multi_step, self.schedule, self.distance = multi_step, schedule, distance

    @classmethod
    def max_images_per_update(cls, params: Mapping[str, Any]) -> tuple[int, str] | None:
        """``labels = "idlg"`` takes iDLG's label of ONE image (other sources: any batch)."""
        if params.get("labels") == "idlg":
            return 1, ("labels = 'idlg' (iDLG's label rule) recovers the label of ONE image "
                       "(use 'auto' or 'batch')")
        return None

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
        if self.multi_step == "single" or (self.multi_step == "auto" and record.local_steps <= 1
                                           and record.optimizer.name == "sgd"):
            return None
        if record.lr <= 0 or record.local_steps < 1 or record.batch_size < 1:
            raise ConfigError(f"inverting_gradients.multi_step: unrolling needs lr > 0, "
                              f"local_steps >= 1, batch_size >= 1 in the record; got "
                              f"{record.lr}, {record.local_steps}, {record.batch_size}")
        return Unroll(float(record.lr), int(record.local_steps), int(record.batch_size),
                      optimizer=record.optimizer)

    def problem(self, record: ObservationRecord, *,
                generator: torch.Generator) -> tuple[InversionProblem, str]:
        """The :class:`InversionProblem` of ``record`` and where its labels came from."""
        if self.local_optimizer == "sgd":  # the ablation: assume plain SGD whatever was used
            record = dataclasses.replace(record, optimizer=LocalOptimizer())
        task = attack_task(record, self.model_mode, device=self.device)
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
                                {k: v.to(dev) for k, v in aux.items()},
                                self.gradient_groups(record, unroll)), source

    def gradient_groups(self, record: ObservationRecord, unroll: Unroll | None) -> int:
        """Separate forward passes behind a matched gradient: 1 (overridden by the peer)."""
        return 1

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
        from attacks.components.label_recovery import recover_labels
        method = ("idlg" if n == 1 else "batch") if self.labels == "auto" else self.labels
        return recover_labels(record, method, n, task=task, generator=generator), method

    def reconstruct(self, record: ObservationRecord, *, generator: torch.Generator,
                    callback: Callback | None = None) -> Reconstruction:
        """Invert ``record``'s update: ``images [N, C, H, W]`` of the best restart + labels."""
        problem, label_source = self.problem(record, generator=generator)
        adapt = self._adaptation(record, problem)
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
            generator=generator, callback=callback, adapt=adapt)
        total = res.objective
        pos = int(torch.argmin(total))  # first minimum: ties go to the lower restart index
        return Reconstruction(
            images=res.images[pos], labels=problem.labels.clone(),
            matching_loss=float(total[pos]), iterations=self.max_iterations,
            knowledge=self._assumed(record, problem, label_source),
            extras={"restart_objectives": total.tolist(),
                    "restart_distances": res.distance.tolist(),
                    "survivors": res.survivors, "best_restart": res.survivors[pos],
                    "restart_pruning": self.restart_pruning, "pruning": res.pruning,
                    "evaluations": res.evaluations,
                    # scored by the runner as start_psnr / start_ssim (the random-start floor)
                    "start_images": res.start[res.survivors[pos]],
                    **({"adapted_to": list(adapt.adapted_to)} if adapt is not None else {})})

    def _adaptation(self, record: ObservationRecord, problem: InversionProblem
                    ) -> Adaptation | None:
        """The adaptation to ``record.defenses`` (None unless ``adaptive``)."""
        if not self.adaptive:
            return None
        scale = 1.0
        if problem.unroll is None and record.update_kind == "delta":  # matched as a gradient
            scale = delta_scale(record)
        aggregate = record.tap != "server_in" or (problem.unroll is not None
                                                  and problem.unroll.clients > 1)
        return adaptation(record.defenses, problem.target, scale=scale, aggregate=aggregate,
                          single_example=single_example(record))

    def _assumed(self, record: ObservationRecord, problem: InversionProblem,
                 label_source: str) -> Mapping[str, Any]:
        out: dict[str, Any] = {"labels": label_source, "num_images": len(problem.labels),
                               "batchnorm": self.model_mode}
        if problem.unroll is not None:
            u = problem.unroll
            out["local_training"] = {"lr": u.lr, "local_steps": u.steps,
                                     "batch_size": u.batch_size, "clients": u.clients,
                                     "batch_order": "sequential",
                                     "optimizer": describe_optimizer(u.optimizer, u.lr),
                                     # recovered labels are sorted: image slot k (and so its
                                     # local step) gets the k-th smallest label
                                     "label_order": ("as granted" if label_source == "granted"
                                                     else "sorted by class")}
        elif record.update_kind == "delta":
            out["local_training"] = "delta matched as one gradient"
        return out


def _has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
