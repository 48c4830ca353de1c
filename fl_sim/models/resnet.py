"""ResNet-18, CIFAR variant (He et al., "Deep Residual Learning", CVPR 2016).

torchvision's resnet18 with a 3×3 stride-1 first convolution without bias and no max-pool,
as used by breaching for CIFAR-10. 3 channels, 10 classes: 11,173,962 parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from fl_sim.registry import MODELS


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN with an identity (or 1×1 conv+BN projection) shortcut."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR ResNet. Input [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int, layers: tuple[int, ...] = (2, 2, 2, 2),
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, *,
             width: int = 64) -> nn.Module:
    """ResNet-18, CIFAR variant (3×3 stem, no max-pool, BasicBlocks [2,2,2,2]; He et al.)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return ResNet(in_channels, num_classes, (2, 2, 2, 2), width=width)
