"""VGG-11/13/16/19 (with or without batch norm) with torchvision's module layout and names.

``vgg("vgg16")`` builds exactly ``torchvision.models.vgg16``'s architecture (state_dicts load both
ways with ``strict=True``): 123.6 M of its 138.4 M parameters sit in the three FC layers (102.8 M
in the first), the case the trick is made for. ``width`` divides every conv width and ``hidden`` / ``pool_size`` shrink the
head for small inputs and CPU work, keeping every layer kind and index.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import VGG, cfgs

CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def vgg(
    name: str,
    num_classes: int = 1000,
    dropout: float = 0.5,
    *,
    batch_norm: bool = False,
    in_channels: int = 3,
    width: int = 1,
    hidden: int = 4096,
    pool_size: int = 7,
) -> VGG:
    if name not in CONFIGS:
        raise ValueError(f"VGG depth must be one of {', '.join(CONFIGS)}, got {name!r}")
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfgs[CONFIGS[name]]:  # torchvision's make_layers, with the input channels and widths free
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = int(v) // width
        layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
        layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
        c = out
    model = VGG(nn.Sequential(*layers), num_classes=num_classes, init_weights=True, dropout=dropout)
    if (c, hidden, pool_size) != (512, 4096, 7):
        model.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        model.classifier = nn.Sequential(
            nn.Linear(c * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in model.classifier:
            if isinstance(m, nn.Linear):  # VGG's own init for the Linear layers
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)
    return model
