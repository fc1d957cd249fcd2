"""The data room: fixed embedded split, world-size-independent global batches, exact padded evaluation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from hybridpar.data import DataBundle, DataError, Lighting, build_datasets, eval_batches, eval_steps, train_loader
from hybridpar.data.embedded import MNIST_MEAN, MNIST_STD, _load_digits
from hybridpar.errors import HybridparError


class IndexData(Dataset):
    """Item i is (a 1×2×2 image filled with i, label i), so a batch says which examples it holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), float(i)), i


def epoch_steps(dataset: Dataset, world_size: int, local_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Global step j -> sorted example ids in the union of every rank's j-th batch."""
    per_rank = []
    for rank in range(world_size):
        loader = train_loader(dataset, local_batch=local_batch, rank=rank, world_size=world_size, seed=seed)
        loader.sampler.set_epoch(epoch)
        per_rank.append([y.tolist() for _, y in loader])
    lengths = {len(steps) for steps in per_rank}
    assert len(lengths) == 1, f"ranks disagree on the number of steps: {lengths}"
    return [sorted(itertools.chain.from_iterable(steps[j] for steps in per_rank)) for j in range(lengths.pop())]


# ---------------------------------------------------------------------------------------------- embedded


def shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` moved down by dy and right by dx, vacated pixels set to the normalised black background."""
    out = torch.full_like(img, -MNIST_MEAN / MNIST_STD)
    s = img.shape[-1]
    out[..., max(dy, 0) : s + min(dy, 0), max(dx, 0) : s + min(dx, 0)] = img[
        ..., max(-dy, 0) : s + min(-dy, 0), max(-dx, 0) : s + min(-dx, 0)
    ]
    return out


@pytest.fixture(scope="module")
def embedded() -> DataBundle:
    return build_datasets({"name": "embedded"})


def test_embedded_sizes_shapes_and_classes(embedded):
    assert (len(embedded.train), len(embedded.val)) == (4000, 1000)
    assert (embedded.num_classes, embedded.in_channels, embedded.image_size) == (10, 1, 32)
    x, y = embedded.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.bincount(embedded.val.labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(embedded.train.labels, minlength=10).tolist() == [400] * 10


def test_embedded_split_is_fixed_disjoint_and_seed_independent(embedded):
    torch.manual_seed(12345)
    np.random.seed(6789)
    again = build_datasets({"name": "embedded", "augment": True})
    assert torch.equal(again.val.rows, embedded.val.rows)
    assert torch.equal(again.val.images, embedded.val.images)
    assert torch.equal(again.train.rows, embedded.train.rows)
    assert set(embedded.train.rows.tolist()).isdisjoint(embedded.val.rows.tolist())
    assert len(set(embedded.train.rows.tolist()) | set(embedded.val.rows.tolist())) == 5000
    # Disjoint as pixels too, not just as row numbers: held-out rows are not duplicates of training rows.
    pixels = _load_digits()[:, :-1]
    train_px = {pixels[r].tobytes() for r in embedded.train.rows.tolist()}
    assert sum(pixels[r].tobytes() in train_px for r in embedded.val.rows.tolist()) == 0


def test_embedded_images_are_centred_padded_and_normalised(embedded):
    digits = _load_digits()
    row = int(embedded.val.rows[0])
    x, y = embedded.val[0]
    assert y == digits[row, -1]
    raw = torch.from_numpy(digits[row, :-1].astype(np.float32)).view(28, 28) / 255
    assert torch.allclose(x[0, 2:30, 2:30] * MNIST_STD + MNIST_MEAN, raw, atol=1e-5)
    background = -MNIST_MEAN / MNIST_STD
    assert torch.allclose(x[0, :2], torch.full((2, 32), background))
    assert torch.allclose(x[0, :, 30:], torch.full((32, 2), background))
    mean = embedded.train.images.mean().item()
    assert -0.25 < mean < 0.05, mean  # MNIST stats on 28×28; the 32×32 border shifts the mean to about -0.1
    assert 0.8 < embedded.train.images.std().item() < 1.2
    big = build_datasets({"name": "embedded", "image_size": 36})
    assert big.train[0][0].shape == (1, 36, 36) and big.image_size == 36


def test_embedded_bad_values():
    for cfg, key in [
        ({"image_size": 20}, "image_size"),
        ({"image_size": "32"}, "image_size"),
        ({"val_per_class": 0}, "val_per_class"),
        ({"val_per_class": 500}, "val_per_class"),
        ({"augment": "yes"}, "augment"),
    ]:
        with pytest.raises(DataError, match=key):
            build_datasets({"name": "embedded", **cfg})


def test_embedded_augment_translates_reproducibly_and_independent_of_world_size():
    data = build_datasets({"name": "embedded", "augment": True}).train
    plain = build_datasets({"name": "embedded"}).train

    def global_step0(world_size: int, seed: int, epoch: int) -> dict[int, torch.Tensor]:
        out = {}
        for rank in range(world_size):
            loader = train_loader(data, local_batch=8 // world_size, rank=rank, world_size=world_size, seed=seed)
            loader.sampler.set_epoch(epoch)
            x, _ = next(iter(loader))
            ids = list(loader.sampler)[: len(x)]
            out.update(dict(zip(ids, x)))
        return out

    one, two = global_step0(1, seed=3, epoch=0), global_step0(2, seed=3, epoch=0)
    assert one.keys() == two.keys() and all(torch.equal(one[i], two[i]) for i in one)
    shifted = sum(not torch.equal(img, plain.images[i]) for i, img in one.items())
    assert shifted >= 5, shifted  # 1/25 chance per image of a zero shift
    for i, img in one.items():  # each image is the plain one moved by at most 2 px, background filled in
        assert any(torch.equal(img, shift(plain.images[i], dy, dx)) for dy in range(-2, 3) for dx in range(-2, 3))
    again = global_step0(1, seed=3, epoch=0)
    assert all(torch.equal(one[i], again[i]) for i in one)
    next_epoch = global_step0(1, seed=3, epoch=1)
    common = one.keys() & next_epoch.keys()
    assert one.keys() != next_epoch.keys() or any(not torch.equal(one[i], next_epoch[i]) for i in common)


# ---------------------------------------------------------------------------------------------- train_loader


@pytest.mark.parametrize("n", [48, 53])
def test_global_step_holds_the_same_examples_for_every_world_size(n):
    data, global_batch = IndexData(n), 12
    reference = epoch_steps(data, 1, global_batch, seed=7, epoch=2)
    assert len(reference) == n // global_batch
    for world_size in (2, 3, 4):
        steps = epoch_steps(data, world_size, global_batch // world_size, seed=7, epoch=2)
        assert steps == reference, world_size
    seen = list(itertools.chain.from_iterable(reference))
    assert len(seen) == len(set(seen)) == (n // global_batch) * global_batch
    if n % global_batch == 0:
        assert sorted(seen) == list(range(n))


def test_epochs_reshuffle_and_seed_fixes_the_order():
    data = IndexData(40)
    e0 = epoch_steps(data, 2, 5, seed=1, epoch=0)
    assert e0 == epoch_steps(data, 2, 5, seed=1, epoch=0)
    assert e0 != epoch_steps(data, 2, 5, seed=1, epoch=1)
    assert e0 != epoch_steps(data, 2, 5, seed=2, epoch=0)
    flat = itertools.chain.from_iterable
    assert sorted(flat(e0)) == sorted(flat(epoch_steps(data, 2, 5, seed=1, epoch=1))) == list(range(40))


def test_train_loader_batch_shapes_and_bad_values():
    loader = train_loader(IndexData(30), local_batch=4, rank=1, world_size=3, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2 and all(x.shape == (4, 1, 2, 2) for x, _ in batches)
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_loader(IndexData(11), local_batch=4, rank=0, world_size=3, seed=0)
    with pytest.raises(DataError, match="rank"):
        train_loader(IndexData(30), local_batch=4, rank=3, world_size=3, seed=0)
    with pytest.raises(DataError, match="local_batch"):
        train_loader(IndexData(30), local_batch=0, rank=0, world_size=3, seed=0)
    with pytest.raises(DataError, match="world_size"):
        train_loader(IndexData(30), local_batch=2, rank=0, world_size=True, seed=0)


# ---------------------------------------------------------------------------------------------- eval_batches


@pytest.mark.parametrize(("n", "world_size", "local_batch"), [(10, 3, 2), (10, 4, 3), (7, 1, 3), (2, 4, 2), (12, 3, 4)])
def test_eval_batches_cover_every_example_once_with_uniform_shapes(n, world_size, local_batch):
    data = IndexData(n)
    steps = eval_steps(n, local_batch, world_size)
    seen = []
    for rank in range(world_size):
        batches = list(eval_batches(data, local_batch=local_batch, rank=rank, world_size=world_size))
        assert len(batches) == steps
        for x, y, valid in batches:
            assert x.shape == (local_batch, 1, 2, 2) and y.shape == valid.shape == (local_batch,)
            assert valid.dtype == torch.bool and y.dtype == torch.int64
            k = int(valid.sum())
            assert valid[:k].all() and not valid[k:].any(), "real rows must come first"
            assert (x[~valid] == 0).all() and (y[~valid] == 0).all()
            assert torch.equal(x[valid][:, 0, 0, 0].long(), y[valid])
            assert all(i % world_size == rank for i in y[valid].tolist())
            seen += y[valid].tolist()
    assert sorted(seen) == list(range(n))


def test_eval_steps_values_and_bad_values():
    assert eval_steps(10, 2, 3) == 2
    assert eval_steps(1000, 128, 3) == 3
    assert eval_steps(12, 4, 3) == 1
    assert eval_steps(13, 4, 3) == 2
    with pytest.raises(DataError):
        eval_steps(10, 0, 3)
    with pytest.raises(DataError, match="empty"):
        eval_batches(IndexData(0), local_batch=2, rank=0, world_size=1)


def test_eval_batches_on_embedded_val(embedded):
    total, correct_shape = 0, True
    for rank in range(3):
        for x, y, valid in eval_batches(embedded.val, local_batch=128, rank=rank, world_size=3):
            correct_shape &= x.shape == (128, 1, 32, 32)
            total += int(valid.sum())
    assert correct_shape and total == 1000


# ---------------------------------------------------------------------------------------------- imagenet


def make_folder(root, classes_by_split: dict[str, list[str]], per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, classes in classes_by_split.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, size=(280, 300, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k}.JPEG")


def test_imagenet_shapes_and_classes(tmp_path):
    make_folder(tmp_path, {"train": ["n01", "n02"], "val": ["n01", "n02"]})
    data = build_datasets({"name": "imagenet", "root": str(tmp_path), "resize": 256, "image_size": 224})
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 224)
    assert (len(data.train), len(data.val)) == (6, 6)
    x, y = data.train[4]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    v, w = data.val[0]
    assert v.shape == (3, 224, 224) and w == 0
    assert torch.equal(v, data.val[0][0]), "evaluation transform must be deterministic"
    assert -3 < v.mean().item() < 3 and v.std().item() > 0.5  # normalised, not raw [0, 1]
    small = build_datasets({"name": "imagenet", "root": tmp_path, "resize": 40, "image_size": 32, "lighting": 0.0})
    assert small.train[0][0].shape == (3, 32, 32)


def test_lighting_adds_pca_noise_only_when_alphastd_is_positive():
    img = torch.rand(3, 8, 8)
    assert torch.equal(Lighting(0.0)(img), img)
    noisy = Lighting(0.1, generator=torch.Generator().manual_seed(0))(img)
    shift = noisy - img
    assert not torch.allclose(noisy, img)
    # One RGB offset per image, the same at every pixel.
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)
    alpha = torch.normal(0.0, 0.1, (3,), generator=torch.Generator().manual_seed(0))
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    assert torch.allclose(shift[:, 0, 0], eigvec @ (alpha * eigval), atol=1e-6)
    with pytest.raises(DataError):
        Lighting(-0.1)


def test_imagenet_bad_layouts(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}.*does not exist.*train/<class>"):
        build_datasets({"name": "imagenet", "root": str(missing)})
    for root in (None, "???"):
        with pytest.raises(DataError, match="data.root is not set"):
            build_datasets({"name": "imagenet", "root": root})
    with pytest.raises(DataError, match="data.root is not set"):
        build_datasets({"name": "imagenet"})

    no_val = tmp_path / "no_val"
    make_folder(no_val, {"train": ["a", "b"]}, per_class=1)
    with pytest.raises(DataError, match=f"{no_val} has no val/"):
        build_datasets({"name": "imagenet", "root": str(no_val)})

    mismatch = tmp_path / "mismatch"
    make_folder(mismatch, {"train": ["a", "b"], "val": ["a", "c"]}, per_class=1)
    with pytest.raises(DataError, match=r"different class folders.*only in train: \['b'\], only in val: \['c'\]"):
        build_datasets({"name": "imagenet", "root": str(mismatch)})

    empty_val = tmp_path / "empty_val"
    make_folder(empty_val, {"train": ["a"]}, per_class=1)
    (empty_val / "val").mkdir()
    with pytest.raises(DataError, match=f"{empty_val}"):
        build_datasets({"name": "imagenet", "root": str(empty_val)})

    with pytest.raises(DataError, match="data.resize"):
        build_datasets({"name": "imagenet", "root": str(mismatch), "resize": 200, "image_size": 224})


# ---------------------------------------------------------------------------------------------- fake and dispatch


def test_fake_shapes_sizes_and_torchvision_values():
    from torchvision import datasets, transforms

    data = build_datasets({"name": "fake", "size": 20, "val_size": 6, "num_classes": 5, "image_size": 16})
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels, data.image_size) == (20, 6, 5, 3, 16)
    x, y = data.train[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 5
    assert not torch.equal(data.val[0][0], data.train[0][0])  # val continues the seeds after train
    ref = datasets.FakeData(size=26, image_size=(3, 16, 16), num_classes=5, transform=transforms.ToTensor())
    for i in (0, 3, 19):
        assert torch.equal(data.train[i][0], ref[i][0]) and data.train[i][1] == ref[i][1]
    assert torch.equal(data.val[2][0], ref[22][0])
    state = torch.get_rng_state()
    data.train[5]
    assert torch.equal(torch.get_rng_state(), state), "fake data must not touch torch's global generator"
    default = build_datasets({"name": "fake"})
    assert (len(default.train), len(default.val), default.num_classes, default.image_size) == (2048, 256, 1000, 224)
    assert default.val[0][0].shape == (3, 224, 224)
    with pytest.raises(DataError, match="data.size"):
        build_datasets({"name": "fake", "size": -1})


def test_unknown_name_lists_known_datasets():
    with pytest.raises(DataError, match=r"'cifar'.*embedded, fake, imagenet") as info:
        build_datasets({"name": "cifar"})
    assert isinstance(info.value, HybridparError)


def test_works_with_omegaconf():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"name": "fake", "size": 8, "val_size": 4, "image_size": 8, "root": "???"})
    data = build_datasets(cfg)
    assert (len(data.train), len(data.val)) == (8, 4)
    with pytest.raises(DataError, match="data.root is not set"):
        build_datasets(omegaconf.OmegaConf.merge(cfg, {"name": "imagenet"}))
