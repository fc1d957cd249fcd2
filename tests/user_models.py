"""User-defined CNNs for the hybridize tests (importable as tests.user_models:...)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's CNN: conv blocks, pooling, flatten in forward, an FC head in a Sequential."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(
            nn.Linear(8 * width, 40), nn.Tanh(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.body(x))
        return self.head(x.view(x.size(0), -1))


class BareFc(nn.Module):
    """ResNet-style: one bare Linear ``fc`` as the head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 12, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(12 * 9, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


class SkipAcross(nn.Module):
    """A skip connection between top-level modules: the trunk is the traced graph, not a chain."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = x + self.b(x)
        return self.head(torch.flatten(self.pool(x), 1))


class FunctionalHead(nn.Module):
    """A head written with functions between its Linear layers: ``fc2(F.relu(fc1(x)))``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4, 20)
        self.fc2 = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_max_pool2d(self.conv(x).relu(), 2).flatten(1)
        return self.fc2(torch.nn.functional.relu(self.fc1(x)))


class BatchMixer(nn.Module):
    """Not per-example: the trunk subtracts the batch mean (the hybrid must refuse it)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x - x.mean(0, keepdim=True)
        return self.fc(torch.flatten(self.pool(x), 1))


class TiedHead(nn.Module):
    """The head's Linear also used in the trunk (the hybrid must refuse it: the head is sharded)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.fc = self.embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.embed(x.flatten(1)[:, :4])))
