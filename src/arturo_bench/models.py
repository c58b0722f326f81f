"""The paper's models, written here (no torchvision dependency).

- ``CNNF``: the Fashion-MNIST CNN (0.39M parameters).
- ``CNNC``: the CIFAR CNN, four conv blocks.
- ``resnet18`` / ``resnet34``: torchvision's BasicBlock layouts, with the stem's input channels
  configurable (Fashion-MNIST uses a 1-channel 7x7 stride-2 stem; CIFAR keeps the unchanged
  ImageNet-style stem, as published).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["CNNF", "CNNC", "ResNet", "resnet18", "resnet34", "build_model", "MODELS"]


class CNNF(nn.Module):
    """Fashion-MNIST CNN: three unpadded 3x3 convs, then a 1152-256-classes MLP."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),  # 28 -> 26
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 13
            nn.Dropout(0.2),
            nn.Conv2d(32, 64, 3),  # -> 11
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 5
            nn.Dropout(0.2),
            nn.Conv2d(64, 128, 3),  # -> 3
            nn.ReLU(),
            nn.Dropout(0.2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNNC(nn.Module):
    """CIFAR CNN: four padded conv-ReLU-maxpool-dropout blocks (3->32->64->128->256), MLP head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        widths = [in_channels, 32, 64, 128, 256]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            blocks.append(nn.Dropout(0.2))
        self.features = nn.Sequential(*blocks)  # 32 -> 16 -> 8 -> 4 -> 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 2 * 2, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with BN, 1x1 projection on shape change."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (BasicBlock only), ImageNet-style 7x7 stride-2 stem + maxpool."""

    def __init__(self, layers: list[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        in_planes = 64
        for i, (planes, blocks) in enumerate(zip([64, 128, 256, 512], layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        # torchvision's initialisation, so that runs start where the published ones did.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn_f": CNNF,
    "cnn_c": CNNC,
    "resnet18": resnet18,
    "resnet34": resnet34,
}


def build_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build a model by its config name (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
