"""ConvNet of breaching (Geiping et al., "Inverting Gradients", NeurIPS 2020).

Eight 3×3 convolutions (stride 1, padding 1, bias), each followed by BatchNorm2d and ReLU, with
channels in→w, w→2w, 2w→2w, 2w→4w, 4w→4w, 4w→4w, MaxPool(3), 4w→4w, 4w→4w, MaxPool(3), then
flatten and one linear layer. Width 64 at 32×32×3 with 10 classes: 2,904,970 parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fl_sim.registry import MODELS


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(cout), nn.ReLU()]


class ConvNet(nn.Module):
    """breaching ConvNet. Input [B, C, H, W] -> logits [B, num_classes].

    Raises ``ValueError`` if ``image_size`` is too small for the two 3×3 max-pools (< 9).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 width: int = 64) -> None:
        super().__init__()
        w = width
        chans = [(in_channels, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w),
                 (4 * w, 4 * w), "pool", (4 * w, 4 * w), (4 * w, 4 * w), "pool"]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        i = 0
        for c in chans:
            if c == "pool":
                layers[f"pool{i}"] = nn.MaxPool2d(3)
                continue
            conv, bn, relu = _block(*c)
            layers[f"conv{i}"], layers[f"bn{i}"], layers[f"relu{i}"] = conv, bn, relu
            i += 1
        self.features = nn.Sequential(layers)
        if image_size < 9:
            raise ValueError(f"image_size {image_size} is too small for ConvNet (needs >= 9)")
        with torch.no_grad():
            # Flatten size from a dummy forward (BN in eval so no running stats are touched).
            self.features.eval()
            n = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
            self.features.train()
        self.fc = nn.Linear(n, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


@MODELS.register("convnet")
def convnet(in_channels: int, num_classes: int, image_size: int, *,
            width: int = 64) -> nn.Module:
    """breaching's ConvNet (8 conv+BN+ReLU, 2 max-pools, linear; Geiping et al. 2020)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return ConvNet(in_channels, num_classes, image_size, width=width)
