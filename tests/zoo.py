"""Model-zoo shapes for the import tests and the import benchmark (torchvision is not a
dependency): torchvision's AlexNet and VGG-11 / VGG-11-BN structures with fewer channels (4 to 32
instead of 64 to 512, dense widths 64 instead of 4096) and PyTorch's MNIST example network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MnistExampleNet(nn.Module):
    """The network of PyTorch's examples/mnist/main.py."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class _TorchvisionShaped(nn.Module):
    """torchvision's forward: features, avgpool, torch.flatten, classifier."""

    features: nn.Sequential
    avgpool: nn.Module
    classifier: nn.Sequential

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNetShaped(_TorchvisionShaped):
    """torchvision.models.AlexNet's structure, channels 64/192/384/256/256 -> 8/16/24/16/16."""

    def __init__(self, num_classes: int = 10, pool: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(8, 16, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(16, 24, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(24, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Linear(16 * pool * pool, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(64, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )


VGG11 = [4, "M", 8, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"]  # torchvision's "A", / 16


class VGGShaped(_TorchvisionShaped):
    """torchvision.models.VGG's structure (make_layers of config "A"), 16x fewer channels."""

    def __init__(self, batch_norm: bool, pool: int = 7, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG11:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
                continue
            assert isinstance(v, int)
            conv = nn.Conv2d(channels, v, kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [
                conv, nn.ReLU(inplace=True)]  # fmt: skip
            channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(32 * pool * pool, 64),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(64, 64),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(64, num_classes),
        )
