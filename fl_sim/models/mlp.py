"""Multi-layer perceptron: flatten, hidden ReLU layers, linear head."""

from __future__ import annotations

from torch import nn

from fl_sim.registry import MODELS


@MODELS.register("mlp")
def mlp(in_channels: int, num_classes: int, image_size: int, *,
        hidden: tuple[int, ...] = (256, 256)) -> nn.Module:
    """Flatten [B, C, H, W] -> hidden ReLU layers -> logits [B, num_classes].

    Raises ``ValueError`` on a non-positive hidden width.
    """
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be >= 1, got {tuple(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)
