"""DLG: reconstruct a batch by matching its gradient in L2 with L-BFGS.

Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019. Dummy images (and, unless the
labels are recovered or granted, soft dummy labels) are optimised jointly so that the gradient
they induce on the shared model matches the observed one:

    min_{x', y'}  sum_l || dL(x', y')/dtheta_l - g_l ||^2.

As in the paper the pixels are optimised unconstrained (L-BFGS does not mix well with a
projection); the returned images are clamped to [0, 1] once, at the end. With
``labels="idlg"`` the labels come first from :mod:`attacks.components.label_recovery` (the iDLG
variant, Zhao et al. 2020), which makes the problem much better conditioned.
"""

from __future__ import annotations

import logging
import math
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
    parameter_gradients,
    split_state,
)
from attacks.components.label_recovery import recover_labels
from attacks.components.progress import report as report_progress
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.tasks.base import Batch

logger = logging.getLogger(__name__)

LabelSource = Literal["optimize", "idlg", "granted"]
Init = Literal["uniform", "normal", "gray"]


def l2_gradient_distance(grads: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """``sum_l ||grads_l - target_l||^2`` over the parameters of ``target`` (scalar)."""
    return sum(((grads[k] - t) ** 2).sum() for k, t in target.items())  # type: ignore[return-value]


def initial_images(shape: tuple[int, ...], init: Init, generator: torch.Generator) -> Tensor:
    """Starting pixels ``shape`` = ``[B, C, H, W]``: U[0,1], N(0.5, 0.25²) or gray + 1e-2 noise.

    The gray start keeps a little noise so that the images of a batch are not identical
    (identical candidates receive identical updates and never separate).
    """
    if init == "uniform":
        return torch.rand(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    if init == "normal":
        return 0.5 + 0.25 * noise
    if init == "gray":
        return 0.5 + 1e-2 * noise
    raise ConfigError(f"unknown init {init!r}; allowed: uniform, normal, gray")


@ATTACKS.register("dlg")
class DLG(Attack):
    """DLG (Zhu et al. 2019): L2 gradient matching with L-BFGS over images (and labels).

    ``labels``: ``"optimize"`` (soft dummy labels optimised jointly, as in the paper),
    ``"idlg"`` (recovered from the last layer first) or ``"granted"`` (the threat model grants
    them: ``record.knowledge["labels"]``). ``max_iterations`` L-BFGS steps per restart, each
    of up to ``inner_iterations`` iterations (strong-Wolfe line search, step ``lr``; the loop
    of the paper's code, ``optimizer.step(closure)`` with torch's default ``max_iter=20``);
    ``Reconstruction.iterations`` counts the inner iterations really made. The restart with
    the lowest matching loss wins.
    ``model_mode`` is the train/eval mode assumed for the client's forward pass (BatchNorm).
    ``aux = "granted"``: on a DIFFUSION update, ask for the client's noise and timesteps
    (knowledge ``eps``, ``t``) and match the gradient of the diffusion loss recomputed with
    them (no labels there: an unconditional UNet has none); without it a diffusion record
    raises :class:`~fl_sim.errors.ThreatModelError` naming that knowledge.
    ``adaptive``: model the public defenses of ``record.defenses`` in the matching
    (:mod:`attacks.adaptive`: a pruned update's surviving coordinates only, signSGD's scaled
    sign, local DP's clip bound); ``extras["adapted_to"]`` says what was modelled.
    Returns images ``[B, C, H, W]`` clamped to [0, 1] and labels ``[B]`` (None for diffusion).
    """

    view = "server"

    def __init__(self, *, max_iterations: int = 100, inner_iterations: int = 20,
                 lr: float = 1.0, labels: LabelSource = "idlg", init: Init = "uniform",
                 restarts: int = 1, history_size: int = 100,
                 model_mode: Literal["eval", "train"] = "eval",
                 aux: Literal["none", "granted"] = "none", adaptive: bool = False) -> None:
        if max_iterations < 1 or inner_iterations < 1:
            raise ConfigError("max_iterations and inner_iterations must be >= 1, got "
                             f"{max_iterations} and {inner_iterations}")
        if lr <= 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        if restarts < 1:
            raise ConfigError(f"restarts must be >= 1, got {restarts}")
        self.max_iterations = max_iterations
        self.inner_iterations = inner_iterations
        self.lr = lr
        self.labels = labels
        self.init = init
        self.restarts = restarts
        self.history_size = history_size
        self.model_mode = model_mode
        if aux not in ("none", "granted"):
            raise ConfigError(f"aux must be 'none' or 'granted', got {aux!r}")
        self.aux = aux
        if not isinstance(adaptive, bool):
            raise ConfigError(f"adaptive must be true or false, got {adaptive!r}")
        self.adaptive = adaptive

    def required_knowledge(self) -> tuple[str, ...]:
        labels = ("labels",) if self.labels == "granted" else ()
        return labels + (("eps", "t") if self.aux == "granted" else ())

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        """Run DLG on one FedSGD record (a delta is read as ``-lr`` x mean gradient)."""
        task = attack_task(record, self.model_mode, device=self.device)
        params, buffers = split_state(task, record.global_params)
        target = {k: v.to(self.device) for k, v in mean_gradient_target(record, task).items()}
        num_images = record.batch_size if record.update_kind == "gradient" \
            else record.num_examples
        spec = record.spec
        shape = (num_images, spec.in_channels, spec.image_size, spec.image_size)
        aux = self._aux(record, task, num_images)
        adapt = None
        if self.adaptive:
            scale = delta_scale(record)
            adapt = adaptation(record.defenses, target, scale=scale,
                               aggregate=record.tap != "server_in",
                               single_example=single_example(record))
        extra = {"adapted_to": list(adapt.adapted_to)} if adapt is not None else {}
        fixed_labels = (torch.zeros(num_images, dtype=torch.int64) if aux
                        else self._fixed_labels(record, task, num_images, generator))

        best: tuple[float, Tensor, Tensor, int, Tensor] | None = None
        for restart in range(self.restarts):
            phase = "iterations" if self.restarts == 1 else \
                f"restart {restart + 1}/{self.restarts}"
            loss, images, labels, n_iter, start = self._run(task, params, buffers, target, shape,
                                                     spec.num_classes, fixed_labels, generator,
                                                     aux, adapt, phase=phase)
            logger.debug("DLG restart %d: matching loss %.3e after %d iterations",
                         restart, loss, n_iter)
            if best is None or loss < best[0] or not math.isfinite(best[0]):
                best = (loss, images, labels, n_iter, start)
        assert best is not None
        loss, images, labels, n_iter, start = best
        # scored by the runner as start_psnr / start_ssim (the random-start floor)
        extra["start_images"] = start
        source = self.labels  # "idlg" falls back to the count method for a batch
        if source == "idlg" and num_images > 1:
            source = "batch"
        if aux:
            return Reconstruction(images=images, labels=None, matching_loss=loss,
                                  iterations=n_iter, knowledge={"eps": "granted", "t": "granted"},
                                  extras={"box": "unconstrained, clamped to [0, 1] at the end",
                                          **extra})
        return Reconstruction(
            images=images, labels=labels, matching_loss=loss, iterations=n_iter,
            knowledge={"labels": source} if source != "optimize" else {},
            extras={"box": "unconstrained, clamped to [0, 1] at the end",
                    "label_source": self.labels, **extra})

    def _aux(self, record: ObservationRecord, task: Any, num_images: int) -> dict[str, Tensor]:
        """Granted diffusion eps/t on the attack's device, one row per image ({} otherwise)."""
        if not is_diffusion(task):
            return {}
        if self.aux != "granted":
            raise ThreatModelError("DLG on a diffusion update needs the client's noise and "
                                   "timesteps: set aux = \"granted\" (knowledge ['eps', 't'])")
        aux = granted_aux(record, task, attack="dlg")
        if int(aux["t"].shape[0]) != num_images:
            raise ConfigError(f"dlg: granted eps/t hold {aux['t'].shape[0]} rows for "
                              f"{num_images} images (DLG matches one mean gradient)")
        return {k: v.to(self.device) for k, v in aux.items()}

    def _fixed_labels(self, record: ObservationRecord, task: Any, num_images: int,
                      generator: torch.Generator) -> Tensor | None:
        if self.labels == "granted":
            labels = torch.as_tensor(record.knowledge["labels"]).long().flatten()
            if labels.numel() != num_images:
                raise ConfigError(f"granted labels hold {labels.numel()} entries for a batch "
                                 f"of {num_images}")
            return labels
        if self.labels == "idlg":
            return recover_labels(record, "auto", num_images, task=task, generator=generator)
        return None

    def _run(self, task: Any, params: dict[str, Tensor], buffers: dict[str, Tensor],
             target: dict[str, Tensor], shape: tuple[int, ...], num_classes: int,
             fixed_labels: Tensor | None, generator: torch.Generator,
             aux: dict[str, Tensor] | None = None, adapt: Adaptation | None = None, *,
             phase: str = "iterations") -> tuple[float, Tensor, Tensor, int, Tensor]:
        """One restart -> (matching loss at the clamped images, images, labels, iterations,
        starting images clamped to [0, 1]). Progress (:mod:`attacks.components.progress`) is
        reported at every objective evaluation as ``phase``, L-BFGS iterations done of at most
        ``max_iterations x inner_iterations``: one outer step can take minutes."""
        dev = self.device
        x = initial_images(shape, self.init, generator).to(dev).requires_grad_(True)
        start = x.detach().clamp(0.0, 1.0)
        variables = [x]
        label_logits: Tensor | None = None
        if fixed_labels is None:
            label_logits = torch.randn(shape[0], num_classes, generator=generator).to(dev)
            label_logits.requires_grad_(True)
            variables.append(label_logits)
        else:
            fixed_labels = fixed_labels.to(dev)

        def labels_now() -> Tensor:
            return fixed_labels if label_logits is None else label_logits.softmax(-1)

        def objective(images: Tensor, create_graph: bool) -> Tensor:
            batch = Batch(images, labels_now())
            grads = parameter_gradients(task, params, buffers, batch, aux or {},
                                        create_graph=create_graph)
            if adapt is not None:  # the adaptation works on [R, ...] candidates: R = 1
                grads = {k: v[0] for k, v in adapt({k: g.unsqueeze(0)
                                                    for k, g in grads.items()}).items()}
            return l2_gradient_distance(grads, target)

        optimizer = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.inner_iterations,
                                      history_size=self.history_size,
                                      tolerance_grad=1e-12, tolerance_change=1e-15,
                                      line_search_fn="strong_wolfe")

        budget = self.max_iterations * self.inner_iterations

        def closure() -> Tensor:
            report_progress(phase, int(optimizer.state[x].get("n_iter", 0)), budget)
            optimizer.zero_grad()
            loss = objective(x, create_graph=True)
            loss.backward()
            return loss

        n_iter = 0
        for _ in range(self.max_iterations):
            optimizer.step(closure)
            done = int(optimizer.state[x].get("n_iter", 0))
            if done == n_iter:  # converged: L-BFGS made no further iteration
                break
            n_iter = done
        images = x.detach().clamp(0.0, 1.0)
        with torch.no_grad():
            final_labels = labels_now().detach()
        loss = float(objective(images, create_graph=False))
        hard = final_labels if final_labels.dim() == 1 else final_labels.argmax(-1)
        return (loss if math.isfinite(loss) else math.inf), images, hard.long(), n_iter, start

