"""LeNet of the DLG paper (Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019).

Three 5×5 convolutions with 12 channels (strides 2, 2, 1, padding 2), each followed by a
sigmoid (twice differentiable, which gradient matching needs), then one linear layer.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from fl_sim.registry import MODELS


class LeNet(nn.Module):
    """DLG LeNet. Input [B, C, H, W] -> logits [B, num_classes].

    For 32×32 inputs the flattened feature size is 12·8·8 = 768.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 activation: Literal["sigmoid", "relu"] = "sigmoid") -> None:
        super().__init__()
        act: type[nn.Module] = nn.Sigmoid if activation == "sigmoid" else nn.ReLU
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), act(),
        )
        side = _conv_out(_conv_out(_conv_out(image_size, 5, 2, 2), 5, 2, 2), 5, 2, 1)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for LeNet")
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).flatten(1))


def _conv_out(size: int, kernel: int, padding: int, stride: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@MODELS.register("lenet")
def lenet(in_channels: int, num_classes: int, image_size: int, *,
          activation: Literal["sigmoid", "relu"] = "sigmoid") -> nn.Module:
    """DLG LeNet (3 conv 12ch k5, strides 2/2/1, sigmoid; Zhu et al. 2019)."""
    return LeNet(in_channels, num_classes, image_size, activation=activation)
