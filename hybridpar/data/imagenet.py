"""ImageNet from an ImageFolder tree, with the AlexNet paper's training augmentation.

Random crops, flips and PCA "lighting" noise (paper §4.1) draw from a generator keyed by (seed, epoch,
example index), never from torch's global one: an example gets the same crop whatever the world size, the
worker count, the DataLoader worker process that loads it or the step a resumed run restarts from, and
emulated workers (threads of one process) do not race on shared generator state.

A file that cannot be decoded (empty, garbage, cut short) must not stop a days-long run: the next readable
example stands in for it, so every worker still brings a full batch to the model-parallel head, and the
loaders count and log the file (``loaders.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import datasets
from torchvision.transforms import functional as TF

from hybridpar.data.bundle import DataBundle, DataError, cfg_get, check_float, check_int

log = logging.getLogger("hybridpar")

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

    def forward(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``generator``, when given, draws alpha instead of the one fixed at construction."""
        if self.alphastd == 0:
            return img
        g = generator if generator is not None else self.generator
        alpha = torch.normal(0.0, self.alphastd, (3,), generator=g)
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.to(img.dtype).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that draws example ``index``'s augmentation in ``epoch`` of a run seeded ``seed``."""
    key = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


class PaperTransform:
    """Resize the short side to ``resize``, then a random ``image_size`` crop, flip and lighting (training) or
    the centre crop (evaluation), to a normalised float tensor. Training draws come from the generator given
    with each image, so they are keyed, not global."""

    def __init__(self, resize: int, image_size: int, *, train: bool, alphastd: float = 0.0):
        self.resize = resize
        self.image_size = image_size
        self.train = train
        self.lighting = Lighting(alphastd)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> Tensor:
        s = self.image_size
        img = TF.resize(img, self.resize)
        if self.train:
            w, h = img.size
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
            img = TF.crop(img, top, left, s, s)
            if torch.rand(1, generator=generator).item() < 0.5:
                img = TF.hflip(img)
            x = self.lighting(TF.to_tensor(img), generator)
        else:
            x = TF.to_tensor(TF.center_crop(img, s))
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def __repr__(self) -> str:
        kind = f"train, lighting={self.lighting.alphastd}" if self.train else "eval"
        return f"{type(self).__name__}(resize={self.resize}, image_size={self.image_size}, {kind})"


class Loaded(NamedTuple):
    """One example as the loaders fetch it: what stands in for it, and what was wrong on the way."""

    image: Tensor
    label: int
    substituted: bool  # this example's own file was unreadable; ``image``/``label`` are the next readable one's
    unreadable: tuple[tuple[str, str], ...]  # (path, reason) of every file that failed to decode on the way


def decode(path: str) -> Image.Image:
    """The RGB image in ``path``, decoded in full, or an exception saying why not."""
    with Image.open(path) as img:
        # Image.open only reads the header; a JPEG cut short decodes "fine" until pixels are needed.
        # load() decodes every pixel now and, as long as ImageFile.LOAD_TRUNCATED_IMAGES stays False (its
        # default, which hybridpar never changes), raises on missing data instead of filling it with grey.
        img.load()
        return img.convert("RGB")


class ImageFiles(datasets.ImageFolder):
    """An ImageFolder whose unreadable files are skipped: the next readable example, wrapping round, stands
    in for one that cannot be decoded, so a batch always has its full shape.

    ``load(index, seed=, epoch=)`` is what the loaders call: it keys the augmentation and says what was
    substituted. ``dataset[i]`` is the plain ``(image, label)`` of seed 0, epoch 0, and logs bad files itself.
    """

    def __init__(self, root: str, preprocess: PaperTransform):
        super().__init__(root)
        self.preprocess = preprocess
        # Files already logged by this process, so a bad file is reported once, not every epoch.
        self.reported: set[str] = set()

    def load(self, index: int, *, seed: int = 0, epoch: int = 0) -> Loaded:
        n = len(self.samples)
        unreadable: list[tuple[str, str]] = []
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            # PIL's decoders raise OSError, SyntaxError, struct.error, IndexError, ... on malformed files; only
            # the file system, PIL and this one file are involved here, so any exception means the file is unusable.
            try:
                img = decode(path)
            except Exception as exc:  # noqa: BLE001 - see above: any exception means the file is unusable
                unreadable.append((path, f"{type(exc).__name__}: {exc}"))
                continue
            # Keyed by the requested index: a stand-in's augmentation is as fixed as the example's would be.
            image = self.preprocess(img, example_generator(seed, epoch, index))
            return Loaded(image, label, step > 0, tuple(unreadable))
        raise DataError(
            f"every one of the {n} images under {self.root} is unreadable (e.g. {unreadable[0][0]}: "
            f"{unreadable[0][1]}); nothing can stand in for them"
        )

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = self.load(index)
        report_unreadable(self, item.unreadable)
        return item.image, item.label


def report_unreadable(dataset: ImageFiles, unreadable: Iterable[tuple[str, str]]) -> None:
    """Log each (path, reason) once per dataset, in the process that calls this."""
    for path, reason in unreadable:
        if path not in dataset.reported:
            dataset.reported.add(path)
            log.warning("unreadable image %s (%s): skipped, the next readable image stands in", path, reason)


def _layout(root: object) -> str:
    return f"ImageNet needs an ImageFolder layout: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"


def _folder(path: Path, preprocess: PaperTransform, root: object) -> ImageFiles:
    try:
        return ImageFiles(str(path), preprocess)
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

    train = _folder(base / "train", PaperTransform(resize, image_size, train=True, alphastd=alphastd), root)
    val = _folder(base / "val", PaperTransform(resize, image_size, train=False), root)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(
            f"data.root={root}: train/ and val/ hold different class folders "
            f"({len(train.classes)} vs {len(val.classes)}; only in train: {only_train}, only in val: {only_val})"
        )
    return DataBundle(train=train, val=val, num_classes=len(train.classes), in_channels=3, image_size=image_size)
