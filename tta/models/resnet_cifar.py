"""CIFAR-style ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

ResNet-(6n+2) for 32x32 inputs: a 3x3 stem, three stages of `n` basic blocks with `width`,
`2*width`, `4*width` channels (stride 1, 2, 2), global average pooling and a linear classifier.
Defaults give ResNet-20 (n=3, width=16, 0.27M parameters). Shortcuts that change shape use a
1x1 convolution + BatchNorm (the paper's option B), so every normalisation layer is a BatchNorm2d
that BN-based adapters can recalibrate.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6*depth_per_stage+2) for 32x32 images; `forward_features` gives pooled features."""

    def __init__(self, num_classes: int = 10, depth_per_stage: int = 3, width: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        if depth_per_stage < 1 or width < 1:
            raise ValueError(f"depth_per_stage and width must be >= 1, got {depth_per_stage}, {width}")
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(depth_per_stage):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: each block starts as identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features, shape (N, num_features)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet20(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    return CifarResNet(num_classes, 3, width, in_chans)
