"""Image classification with mean cross-entropy, as in DLG / Inverting Gradients.

Images enter in [0, 1]; the task normalises per channel with the dataset mean/std inside
:meth:`ClassifierTask.loss`, so attacks optimise pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fl_sim.data.transforms import Normalization
from fl_sim.registry import TASKS
from fl_sim.tasks.base import (
    Batch,
    NormalizationLike,
    Params,
    StepResult,
    mean_std,
    module_tensors,
    sgd_train_step,
)


@TASKS.register("classifier")
class ClassifierTask:
    """Mean cross-entropy of ``model(normalize(images))`` against ``labels``.

    ``model`` maps [B, C, H, W] -> logits [B, num_classes]. BatchNorm layers follow the module's
    train/eval mode (in train mode a functional call updates the running stats of the
    ``buffers`` passed in, as PyTorch does). Raises ``ValueError`` for a bad normalisation or
    ``label_smoothing`` outside [0, 1).
    """

    name = "classifier"

    def __init__(self, model: nn.Module,
                 normalization: NormalizationLike | tuple[tuple[float, ...], tuple[float, ...]],
                 *, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = model
        self.normalization = Normalization(*mean_std(normalization))
        self.mean, self.std = self.normalization.mean, self.normalization.std
        self.label_smoothing = float(label_smoothing)

    def normalize(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> per-channel standardised; differentiable.

        Raises ``ValueError`` if the channel count differs from the normalisation's.
        """
        return self.normalization.normalize(images)

    def logits(self, params: Params, buffers: Params, images: Tensor) -> Tensor:
        """Logits [B, num_classes] of the model at ``(params, buffers)``."""
        return functional_call(self.model, (dict(params), dict(buffers)),
                               (self.normalize(images),))

    def sample_aux(self, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        """A classifier step uses no private randomness: ``{}``."""
        return {}

    def loss(self, params: Params, buffers: Params, batch: Batch,
             aux: Mapping[str, Tensor] | None = None) -> Tensor:
        """Scalar mean cross-entropy. ``batch.labels`` may also be soft labels [B, K]."""
        logits = self.logits(params, buffers, batch.images)
        return F.cross_entropy(logits, batch.labels, label_smoothing=self.label_smoothing)

    def train_step(self, optimizer: torch.optim.Optimizer, batch: Batch,
                   generator: torch.Generator) -> StepResult:
        """One optimiser step on ``self.model`` (train mode)."""
        return sgd_train_step(self, optimizer, batch, generator)

    @torch.no_grad()
    def evaluate(self, images: Tensor, labels: Tensor, *, batch_size: int = 256,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        """``{"accuracy", "loss"}`` over ``images`` [N, C, H, W] in [0, 1], ``labels`` [N].

        Runs in eval mode and restores the previous mode. Raises ``ValueError`` if empty.
        """
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("evaluate() needs at least one example")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        params, buffers = module_tensors(self.model)
        correct, total_loss = 0, 0.0
        try:
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size].to(device)
                y = labels[start:start + batch_size].to(device)
                logits = self.logits(params, buffers, x)
                total_loss += float(F.cross_entropy(logits, y, reduction="sum",
                                                    label_smoothing=self.label_smoothing))
                correct += int((logits.argmax(1) == y).sum())
        finally:
            self.model.train(was_training)
        return {"accuracy": correct / n, "loss": total_loss / n}
