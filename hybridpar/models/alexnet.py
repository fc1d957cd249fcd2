"""AlexNet, the "one weird trick" variant, with torchvision's module layout and parameter names.

``alexnet()`` builds exactly ``torchvision.models.alexnet``'s architecture (a state_dict loads
both ways with ``strict=True``); ``widths="paper"`` gives conv4 the 384 channels of the "one
weird trick" paper's footnote instead. ``alexnet_small()`` keeps every layer kind and index (five
convs with ReLU, three overlapping 3×3/2 max-pools, adaptive average pool, dropout before
FC6 and FC7, three Linear layers) but swaps the 11×11/4 stem for a 5×5/1 one so 28–64 px
images keep a spatial map, and lets channel and FC widths shrink for CPU work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

# Conv widths: torchvision's (its weights load) and the paper's footnote (conv4 as wide as conv3).
WIDTHS: Mapping[str, tuple[int, ...]] = {
    "torchvision": (64, 192, 384, 256, 256),
    "paper": (64, 192, 384, 384, 256),
}
INITS = ("torchvision", "paper", "kaiming")


class AlexNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.5,
        *,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 192, 384, 256, 256),
        hidden: int = 4096,
        pool_size: int = 6,
        stem: str = "imagenet",
    ):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if len(channels) != 5:
            raise ValueError(f"AlexNet has five conv layers; got channels={list(channels)}")
        c1, c2, c3, c4, c5 = channels
        stem_conv = (
            nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2)
            if stem == "imagenet"
            else nn.Conv2d(in_channels, c1, kernel_size=5, stride=1, padding=2)
        )
        # Indices match torchvision's: features.{0,3,6,8,10}, classifier.{1,4,6}.
        self.features = nn.Sequential(
            stem_conv,
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c5 * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(num_classes: int = 1000, dropout: float = 0.5, *, widths: str = "torchvision") -> AlexNet:
    """torchvision's AlexNet: 224 px input, 64-192-384-256-256 conv channels (``widths="paper"``:
    64-192-384-384-256), 4096-4096-N FC."""
    if widths not in WIDTHS:
        raise ValueError(f"AlexNet widths must be one of {', '.join(WIDTHS)}, got {widths!r}")
    return AlexNet(num_classes, dropout, channels=WIDTHS[widths])


def alexnet_small(
    num_classes: int = 10,
    dropout: float = 0.5,
    *,
    in_channels: int = 3,
    channels: Sequence[int] = (64, 192, 384, 256, 256),
    hidden: int = 4096,
    pool_size: int = 3,
) -> AlexNet:
    """AlexNet for 28–64 px images: a 5×5/1 stem instead of 11×11/4, a 3×3 pooled map
    (256·3·3 = 2304 features at the default widths); same layer kinds and names."""
    return AlexNet(
        num_classes,
        dropout,
        in_channels=in_channels,
        channels=channels,
        hidden=hidden,
        pool_size=pool_size,
        stem="small",
    )


def _weighted_layers(model: AlexNet) -> tuple[list[nn.Conv2d], list[nn.Linear]]:
    """The five convolutions and the three FC layers, in order."""
    return (
        [m for m in model.features if isinstance(m, nn.Conv2d)],
        [m for m in model.classifier if isinstance(m, nn.Linear)],
    )


def init_kaiming(model: AlexNet) -> AlexNet:
    """He et al.'s initialisation for ReLU networks, in place, from torch's generator: every weight from
    N(0, 2 / fan_in), biases 0, the last FC layer N(0, 1 / fan_in) (no ReLU after it).

    torchvision's default (uniform, a = √5) has each layer pass on about a third of its input's variance,
    so after AlexNet's eight layers the logits start near zero, the gradients are as small, and a short
    run spends its first epochs at chance; with variance kept layer to layer it learns from the first step."""
    convs, fcs = _weighted_layers(model)
    with torch.no_grad():
        for m in convs + fcs:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if m is not fcs[-1] else "linear")
            m.bias.zero_()
    return model


def init_paper(model: AlexNet) -> AlexNet:
    """The AlexNet paper's initialisation (Krizhevsky et al., 2012), in place, from torch's
    generator: every weight from N(0, 0.01²); biases 1 in conv2, conv4, conv5 and the two hidden FC
    layers, so their ReLUs start with positive inputs, and 0 in conv1, conv3 and the last FC."""
    convs, fcs = _weighted_layers(model)
    ones = {convs[1], convs[3], convs[4], fcs[0], fcs[1]}
    with torch.no_grad():
        for m in convs + fcs:
            m.weight.normal_(0.0, 0.01)
            m.bias.fill_(1.0 if m in ones else 0.0)
    return model
