"""Random images of any size, for timing runs at ImageNet shapes without ImageNet.

torchvision's ``FakeData`` seeds and restores torch's *global* generator around every item, which races with
emulated workers (threads of one process). ``_FakeData`` draws the very same pixels and labels from a
private generator instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision import datasets, transforms

from hybridpar.data.bundle import DataBundle, cfg_get, check_int


class _FakeData(datasets.FakeData):
    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index >= len(self):
            raise IndexError(f"{type(self).__name__} index out of range")
        g = torch.Generator().manual_seed(index + self.random_offset)
        img = transforms.ToPILImage()(torch.randn(*self.image_size, generator=g))
        target = int(torch.randint(0, self.num_classes, (1,), dtype=torch.long, generator=g)[0])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def build_fake(cfg: Mapping[str, Any]) -> DataBundle:
    size = check_int(cfg_get(cfg, "size", 2048), "data.size")
    val_size = check_int(cfg_get(cfg, "val_size", 256), "data.val_size")
    num_classes = check_int(cfg_get(cfg, "num_classes", 1000), "data.num_classes")
    s = check_int(cfg_get(cfg, "image_size", 224), "data.image_size")
    common = {"image_size": (3, s, s), "num_classes": num_classes, "transform": transforms.ToTensor()}
    train = _FakeData(size=size, random_offset=0, **common)
    val = _FakeData(size=val_size, random_offset=size, **common)  # seeds size.. continue where train's end
    return DataBundle(train=train, val=val, num_classes=num_classes, in_channels=3, image_size=s)
