"""Label recovery from the last linear layer's gradient: iDLG and a bias-corrected count method.

For mean softmax cross-entropy over a batch of ``B`` examples, the last linear layer
``z = W h + b`` (``W`` ``[K, F]``, ``K`` classes) has gradients

    dL/db_c = (1/B) sum_i (p_ic - y_ic),      dL/dW_c = (1/B) sum_i (p_ic - y_ic) h_i,

with ``p_i`` the softmax output and ``y_i`` the one-hot label.

- :func:`idlg_label` -- iDLG (Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from
  Gradients", 2020): at ``B = 1`` only the true class has ``p_c - y_c < 0``, so with
  non-negative features ``h`` (after sigmoid / ReLU) its weight-gradient row is the only one
  with a negative sum.
- :func:`batch_labels` -- per-class counts, bias-corrected as in Yin et al. 2021
  ("See through Gradients", GradInversion) and Geng et al. 2021 ("Towards General Deep
  Leakage in Federated Learning"): ``count_c = B (mean_i p_ic - dL/db_c)``, where the mean
  softmax output ``mean_i p_ic`` is estimated by running the model on dummy inputs. Without a
  bias the weight-row sums are used with the mean feature sum estimated the same way:
  ``count_c = B (mean_i p_ic - sum_j dL/dW_cj / mean_i sum_j h_ij)``. Counts are turned into
  ``B`` labels greedily (largest remaining count first).
- :func:`recover_labels` -- either method on an :class:`~fl_sim.records.ObservationRecord`,
  usable by every attack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.components.gradients import (
    attack_task,
    mean_gradient_target,
    parameter_names,
    split_state,
    target_from_record,
)
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.tasks.base import Batch

__all__ = ["LastLayer", "find_last_layer", "idlg_label", "batch_labels", "labels_from_counts",
           "recover_labels"]

LabelMethod = Literal["auto", "idlg", "batch"]


@dataclass(frozen=True)
class LastLayer:
    """Names of the last linear layer's weight ``[K, F]`` and bias ``[K]`` (or None)."""

    weight: str
    bias: str | None

    @property
    def module(self) -> str:
        """Dotted module path owning the weight (``"fc"`` for ``"fc.weight"``)."""
        return self.weight.rpartition(".")[0]


def find_last_layer(names: list[str], shapes: Mapping[str, torch.Size],
                    num_classes: int) -> LastLayer:
    """The last 2-D parameter whose first dim is ``num_classes``, and its bias if it has one.

    ``names`` in model order. Raises ``ValueError`` if no such parameter exists.
    """
    for name in reversed(names):
        shape = shapes[name]
        if len(shape) == 2 and shape[0] == num_classes:
            prefix = name.rpartition(".")[0]
            bias = f"{prefix}.bias" if prefix else "bias"
            has_bias = bias in shapes and tuple(shapes[bias]) == (num_classes,)
            return LastLayer(name, bias if has_bias else None)
    raise ConfigError(f"no 2-D parameter with first dimension {num_classes} (the number of "
                     "classes): label recovery needs a final linear layer")


def idlg_label(grad_last_weight: Tensor) -> int:
    """iDLG label of a single example from the last layer's weight gradient ``[K, F]``.

    The true class is the row with the most negative sum (the only negative one when the
    features entering the layer are non-negative).

    >>> idlg_label(torch.tensor([[0.1, 0.2], [-0.5, -0.1], [0.3, 0.0]]))
    1
    """
    if grad_last_weight.dim() != 2:
        raise ValueError(f"expected a [K, F] weight gradient, got {tuple(grad_last_weight.shape)}")
    return int(grad_last_weight.double().sum(1).argmin())


def labels_from_counts(counts: Tensor, num_images: int) -> Tensor:
    """``num_images`` labels from real-valued per-class counts ``[K]``, sorted ascending.

    Greedy: repeatedly take the class with the largest remaining count and decrement it.

    >>> labels_from_counts(torch.tensor([0.1, 1.9, 1.2, -0.2]), 3).tolist()
    [1, 1, 2]
    """
    remaining = counts.detach().double().clone()
    out = []
    for _ in range(num_images):
        c = int(remaining.argmax())
        out.append(c)
        remaining[c] -= 1.0
    return torch.tensor(sorted(out), dtype=torch.int64)


def batch_labels(grad_last_weight: Tensor, grad_last_bias: Tensor | None, num_images: int, *,
                 mean_probs: Tensor, mean_feature_sum: float | None = None) -> Tensor:
    """Labels ``[num_images]`` (sorted) of a batch from the last layer's mean gradient.

    ``grad_last_weight`` ``[K, F]``, ``grad_last_bias`` ``[K]`` or None, ``mean_probs`` ``[K]``
    the estimated batch-mean softmax output, ``mean_feature_sum`` the estimated mean over
    examples of the summed features entering the layer (needed only without a bias).
    Raises ``ValueError`` when neither a bias nor ``mean_feature_sum`` is given.
    """
    if grad_last_bias is not None:
        signal = grad_last_bias.double()
    elif mean_feature_sum is not None and mean_feature_sum != 0.0:
        signal = grad_last_weight.double().sum(1) / float(mean_feature_sum)
    else:
        raise ValueError("batch label recovery without a last-layer bias needs "
                         "mean_feature_sum")
    counts = num_images * (mean_probs.double() - signal)
    return labels_from_counts(counts, num_images)


@torch.no_grad()
def estimate_output_statistics(task: Any, record: ObservationRecord, layer: LastLayer, *,
                               generator: torch.Generator, num_dummy: int = 16
                               ) -> tuple[Tensor, float]:
    """Mean softmax ``[K]`` and mean feature sum at the last layer on uniform dummy images.

    Runs ``task.loss`` at the record's parameters (``task.model`` in its current mode) with a
    forward hook on the last layer; the hook sees the features ``h`` and the logits.
    """
    spec = record.spec
    params, buffers = split_state(task, record.global_params)
    device = next(iter(params.values())).device
    dummy = torch.rand(num_dummy, spec.in_channels, spec.image_size, spec.image_size,
                       generator=generator).to(device)
    batch = Batch(dummy, torch.zeros(num_dummy, dtype=torch.int64, device=device))
    seen: dict[str, Tensor] = {}

    def hook(module: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen["h"], seen["z"] = inputs[0].detach(), output.detach()

    handle = task.model.get_submodule(layer.module).register_forward_hook(hook)
    try:
        task.loss(params, buffers, batch, task.sample_aux(batch, generator))
    finally:
        handle.remove()
    if "z" not in seen:
        raise RuntimeError(f"the last layer {layer.module!r} was not called by task.loss")
    probs = seen["z"].double().softmax(-1).reshape(-1, spec.num_classes).mean(0).cpu()
    feature_sum = float(seen["h"].double().flatten(1).sum(1).mean())
    return probs, feature_sum


def recover_labels(record: ObservationRecord, method: LabelMethod = "auto",
                   num_images: int | None = None, *, task: Any | None = None,
                   generator: torch.Generator | None = None, num_dummy: int = 16) -> Tensor:
    """Recover the labels of the batch behind ``record``: int64 ``[num_images]``, sorted.

    ``method``: ``"idlg"`` (one image only), ``"batch"`` (bias-corrected counts) or
    ``"auto"`` (iDLG for one image, else counts). ``num_images`` defaults to
    ``record.batch_size`` for a gradient and ``record.num_examples`` for a delta. ``task``
    (a task already built from ``record.spec``, in the mode the client used) is built in eval
    mode when omitted. Raises :class:`~fl_sim.errors.ConfigError` for a bad ``method`` or
    ``num_images`` (iDLG on several images), a diffusion record (an unconditional UNet has
    no labels) or batch counts on an Adam client's delta (iDLG's signs survive Adam), and
    ``ValueError`` for a model without a final ``num_classes``-wide linear layer.
    """
    if record.spec.task == "diffusion":
        raise ConfigError("label recovery does not apply to an unconditional diffusion model "
                          "(task 'diffusion'): its loss uses no labels")
    if num_images is None:
        num_images = record.batch_size if record.update_kind == "gradient" \
            else record.num_examples
    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {num_images}")
    if method == "auto":
        method = "idlg" if num_images == 1 else "batch"
    if method not in ("idlg", "batch"):
        raise ConfigError(f"unknown label method {method!r}; allowed: auto, idlg, batch")
    if task is None:
        task = attack_task(record)
    names = parameter_names(task)
    if record.update_kind == "delta" and record.optimizer.name == "adam":
        # Adam normalises every coordinate: the delta keeps the gradient's signs (all iDLG
        # reads) but not its magnitudes (what the counts need)
        if method != "idlg":
            raise ConfigError("batch label recovery reads gradient magnitudes, which an Adam "
                              "client's delta does not keep: grant the labels, or attack one "
                              "image (iDLG reads only signs)")
        grads = {k: -v.double() for k, v in target_from_record(record, task).items()}
    else:
        grads = {k: v.double() for k, v in mean_gradient_target(record, task).items()}
    layer = find_last_layer(names, {n: grads[n].shape for n in names if n in grads},
                            record.spec.num_classes)
    if method == "idlg":
        if num_images != 1:
            raise ConfigError(f"iDLG recovers the label of ONE image, got {num_images}; "
                             "use method='batch'")
        return torch.tensor([idlg_label(grads[layer.weight])], dtype=torch.int64)
    probs, feature_sum = estimate_output_statistics(
        task, record, layer, generator=generator or torch.Generator().manual_seed(0),
        num_dummy=num_dummy)
    bias = grads[layer.bias] if layer.bias is not None else None
    return batch_labels(grads[layer.weight], bias, num_images, mean_probs=probs,
                        mean_feature_sum=feature_sum)
