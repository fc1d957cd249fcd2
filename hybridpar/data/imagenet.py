"""ImageNet from an ImageFolder tree, with the AlexNet paper's training augmentation.

Random crops, flips and PCA "lighting" noise (paper §4.1) draw from torch's global generator, as
torchvision's transforms do; they are reproducible in DataLoader worker processes (``train_loader`` seeds
them) but not with ``num_workers=0`` under emulated, threaded workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import datasets, transforms

from hybridpar.data.bundle import DataBundle, DataError, cfg_get, check_float, check_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Principal components of ImageNet's RGB pixel covariance (values in [0, 1]), as used by fb.resnet.torch.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(nn.Module):
    """Adds ``eigvec @ (alpha * eigval)`` to every pixel of a 3×H×W tensor, alpha ~ N(0, alphastd) per image."""

    def __init__(self, alphastd: float = 0.1, *, generator: torch.Generator | None = None):
        super().__init__()
        self.alphastd = check_float(alphastd, "lighting alphastd")
        self.generator = generator
        self.register_buffer("eigval", torch.tensor(IMAGENET_EIGVAL), persistent=False)
        self.register_buffer("eigvec", torch.tensor(IMAGENET_EIGVEC), persistent=False)

    def forward(self, img: Tensor) -> Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.normal(0.0, self.alphastd, (3,), generator=self.generator)
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.to(img.dtype).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


def _layout(root: object) -> str:
    return f"ImageNet needs an ImageFolder layout: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"


def _folder(path: Path, transform: transforms.Compose, root: object) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"data.root={root}: cannot read {path}: {exc} ({_layout(root)})") from None


def build_imagenet(cfg: Mapping[str, Any]) -> DataBundle:
    root = cfg_get(cfg, "root", None)
    if root is None or not str(root).strip():
        raise DataError(f"data.root is not set ({_layout('<root>')})")
    base = Path(str(root)).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root={root} does not exist ({_layout(root)})")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DataError(f"data.root={root} has no {split}/ directory ({_layout(root)})")
    image_size = check_int(cfg_get(cfg, "image_size", 224), "data.image_size")
    resize = check_int(cfg_get(cfg, "resize", 256), "data.resize")
    if resize < image_size:
        raise DataError(f"data.resize={resize} is smaller than data.image_size={image_size}; the crop would not fit")
    alphastd = check_float(cfg_get(cfg, "lighting", 0.1), "data.lighting")

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.RandomCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            Lighting(alphastd),
            normalize,
        ]
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(), normalize]
    )
    train = _folder(base / "train", train_tf, root)
    val = _folder(base / "val", eval_tf, root)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(
            f"data.root={root}: train/ and val/ hold different class folders "
            f"({len(train.classes)} vs {len(val.classes)}; only in train: {only_train}, only in val: {only_val})"
        )
    return DataBundle(train=train, val=val, num_classes=len(train.classes), in_channels=3, image_size=image_size)
