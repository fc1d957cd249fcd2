"""The DALI loader is the torch loader's twin: the same examples at the same steps across workers and epochs,
a resumed epoch restarting at its batch, the same augmentation to within a grey level, exact padded evaluation,
and unreadable files counted and replaced, not fatal."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

from hybridpar.data import DataError, eval_batches, eval_steps, train_loader
from hybridpar.data import dali as dali_mod
from hybridpar.data.dali import DALI_MISSING, dali_available, dali_eval_batches, dali_train_loader
from hybridpar.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, PaperTransform

CPU = torch.device("cpu")
CLASSES = ("n01", "n02", "n03")
RESIZE, SIZE = 32, 28
# One grey level (the decoders and resize kernels differ by that much), in normalised units, plus rounding.
ONE_LEVEL = 1.05 / 255 / min(IMAGENET_STD)


def _write(split_dir, per_class: int, colour, textured: bool) -> None:
    """``per_class`` JPEGs per class, 60×45 (every third one 45×60); example k's base colour is ``colour(k)``."""
    rng = np.random.default_rng(0)
    k = 0
    for c in CLASSES:
        (split_dir / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.broadcast_to(np.asarray(colour(k), dtype=np.int64), (45, 60, 3)).copy()
            if textured:  # gradients and noise: a crop one pixel off, a flip or a wrong lighting draw shows
                yy, xx = np.mgrid[0:45, 0:60]
                pixels = pixels // 3 + np.stack([yy * 3, xx * 2, (yy + xx)], -1) + rng.integers(0, 30, (45, 60, 3))
            pixels = pixels.clip(0, 255).astype(np.uint8)
            if i % 3 == 0:
                pixels = pixels.transpose(1, 0, 2).copy()
            Image.fromarray(pixels).save(split_dir / c / f"img{i}.JPEG", quality=95)
            k += 1


def _colour(k: int) -> tuple[int, int, int]:
    return 20 + 9 * k, 230 - 7 * k, 60 + (37 * k) % 150  # red alone tells the examples apart


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """Flat-coloured images, so a row's colour says which example it is: train 3×8, val 3×3."""
    root = tmp_path_factory.mktemp("flat")
    _write(root / "train", 8, _colour, textured=False)
    _write(root / "val", 3, _colour, textured=False)
    train = ImageFiles(str(root / "train"), PaperTransform(RESIZE, SIZE, train=True))
    val = ImageFiles(str(root / "val"), PaperTransform(RESIZE, SIZE, train=False))
    return train, val


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    root = tmp_path_factory.mktemp("textured")
    _write(root, 8, _colour, textured=True)
    return ImageFiles(str(root), PaperTransform(RESIZE, SIZE, train=True, alphastd=0.1))


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised N×3×S×S back to 0..255 pixel values."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def _ids(x: torch.Tensor, n: int) -> list[int]:
    """Which flat-coloured example each row is, by its red level."""
    red = _pixels(x)[:, 0].mean(dim=(1, 2))
    table = torch.tensor([float(_colour(k)[0]) for k in range(n)])
    dist, ids = (red[:, None] - table[None]).abs().min(dim=1)
    assert (dist < 3).all(), f"rows match no example's colour: {red}"
    return ids.tolist()


def _epoch(loader, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.start_epoch(epoch, skip)
    return list(loader)


def _close(x: torch.Tensor, reference: torch.Tensor) -> None:
    diff = (x - reference).abs()
    assert diff.max() <= ONE_LEVEL, f"{diff.max():.4f} > one grey level ({ONE_LEVEL:.4f})"
    assert diff.mean() <= ONE_LEVEL / 2


@pytest.mark.timeout(120)
def test_epochs_hold_the_torch_loaders_examples_in_its_order(flat):
    train, _ = flat
    n, w, b, seed = len(train), 2, 5, 7
    loaders = [dali_train_loader(train, local_batch=b, rank=r, world_size=w, seed=seed, device=CPU) for r in range(w)]
    torch_loaders = [train_loader(train, local_batch=b, rank=r, world_size=w, seed=seed) for r in range(w)]
    orders = []
    for epoch in (0, 1):
        seen = []
        for dali_loader, reference in zip(loaders, torch_loaders):
            batches, expected = _epoch(dali_loader, epoch), _epoch(reference, epoch)
            assert len(batches) == len(expected) == len(dali_loader) == n // (w * b)
            for (x, y), (x_ref, y_ref) in zip(batches, expected):
                assert x.shape == (b, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.device == CPU
                assert y.dtype == torch.int64 and torch.equal(y, y_ref)
                ids = _ids(x, n)
                assert ids == _ids(x_ref, n)
                assert y.tolist() == [train.samples[i][1] for i in ids]
                seen += ids
        # Once per example; the n % (w*b) left over sit the epoch out.
        assert len(seen) == len(set(seen)) == n - n % (w * b)
        orders.append(seen)
    assert orders[0] != orders[1], "the epoch does not reshuffle"
    assert all(loader.skipped == 0 for loader in loaders)


@pytest.mark.timeout(120)
def test_a_resumed_epoch_is_the_tail_of_the_full_one(flat):
    train, _ = flat
    loader = dali_train_loader(train, local_batch=3, rank=1, world_size=2, seed=1, device=CPU)
    full = _epoch(loader, 2)
    assert len(full) == 4
    # Stopping part-way leaves a batch in flight; the next epoch must not see it.
    loader.start_epoch(0)
    next(iter(loader))
    for skip in (1, 3):
        loader.start_epoch(2, skip)
        assert len(loader) == len(full) - skip
        tail = list(loader)
        assert len(tail) == len(full) - skip
        for (x, y), (x_full, y_full) in zip(tail, full[skip:]):
            assert torch.equal(y, y_full) and torch.equal(x, x_full)


@pytest.mark.timeout(120)
def test_augmentation_is_the_papers_within_a_grey_level(textured):
    # The same crop window, flip and lighting draw as the torch loader; only the decoder and resize kernel differ.
    for rank in (0, 1):
        loader = dali_train_loader(textured, local_batch=4, rank=rank, world_size=2, seed=5, device=CPU)
        reference = train_loader(textured, local_batch=4, rank=rank, world_size=2, seed=5)
        for epoch in (0, 3):
            for (x, y), (x_ref, y_ref) in zip(_epoch(loader, epoch), _epoch(reference, epoch), strict=True):
                assert torch.equal(y, y_ref)
                _close(x, x_ref)


@pytest.mark.timeout(120)
def test_a_flat_image_comes_out_normalised(flat):
    train = flat[0]
    # No lighting: ((c / 255) - mean) / std in every pixel, whatever the crop or flip.
    (x, _), *_ = _epoch(dali_train_loader(train, local_batch=4, rank=0, world_size=1, seed=0, device=CPU), 0)
    ids = _ids(x, len(train))
    for row, k in zip(x, ids):
        expected = (torch.tensor(_colour(k)) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(row, expected.view(3, 1, 1).expand_as(row), atol=2.5 / 255 / 0.224, rtol=0)


@pytest.mark.timeout(120)
def test_eval_covers_every_held_out_example_once_with_padding_marked(flat):
    _, val = flat
    n, w, b = len(val), 2, 4
    steps = eval_steps(n, b, w)
    seen = []
    for rank in range(w):
        batches = dali_eval_batches(val, local_batch=b, rank=rank, world_size=w, device=CPU)
        expected = list(eval_batches(val, local_batch=b, rank=rank, world_size=w))
        got = list(batches)
        assert len(got) == len(expected) == steps
        for (x, y, valid), (x_ref, y_ref, valid_ref) in zip(got, expected):
            assert x.shape == (b, 3, SIZE, SIZE) and valid.dtype == torch.bool
            assert torch.equal(valid, valid_ref) and torch.equal(y, y_ref)
            _close(x, x_ref)  # the centre crop, and zeros in the padding
            assert (x[~valid] == 0).all() and (y[~valid] == 0).all()
            seen += _ids(x[valid], n)
        assert batches.skipped == 0
    assert sorted(seen) == list(range(n))


@pytest.fixture()
def broken(tmp_path):
    """3 classes × 6 textured images plus a garbage file (no header) and a JPEG cut short (header intact):
    20 files, so batches of 4 leave none out."""
    root = tmp_path / "broken"
    _write(root, 6, _colour, textured=True)
    garbage = root / "n01" / "img1a_garbage.JPEG"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    whole = (root / "n02" / "img2.JPEG").read_bytes()
    truncated = root / "n02" / "img2a_truncated.JPEG"
    truncated.write_bytes(whole[: len(whole) // 2])
    return root, {str(garbage), str(truncated)}


def _torch_and_dali_epochs(root, train: bool, **kw):
    dataset = ImageFiles(str(root), PaperTransform(RESIZE, SIZE, train=train, alphastd=0.1 if train else 0.0))
    if train:
        dali_loader = dali_train_loader(dataset, local_batch=4, rank=0, world_size=1, seed=2, device=CPU, **kw)
        reference = train_loader(dataset, local_batch=4, rank=0, world_size=1, seed=2)
        return dali_loader, reference, (_epoch(dali_loader, 0), _epoch(reference, 0))
    dali_batches = dali_eval_batches(dataset, local_batch=4, rank=0, world_size=1, device=CPU, **kw)
    reference = eval_batches(dataset, local_batch=4, rank=0, world_size=1)
    return dali_batches, reference, (list(dali_batches), list(reference))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_unreadable_files_are_replaced_counted_and_logged(broken, train, caplog):
    root, bad = broken
    caplog.set_level(logging.WARNING, logger="hybridpar")
    dali_side, torch_side, (got, expected) = _torch_and_dali_epochs(root, train)
    assert len(got) == len(expected)
    for batch, batch_ref in zip(got, expected):
        for t, t_ref in zip(batch[1:], batch_ref[1:]):  # labels (and valid): the same stand-ins
            assert torch.equal(t, t_ref)
        _close(batch[0], batch_ref[0])
    assert dali_side.skipped == torch_side.skipped == 2
    logged = {r.getMessage().split()[2] for r in caplog.records if "unreadable image" in r.getMessage()}
    assert logged == bad
    # Found once, remembered: the next epoch meets them again and counts them without failing a batch.
    if train:
        _epoch(dali_side, 1)
        assert dali_side.skipped == 4


@pytest.mark.timeout(120)
def test_a_file_only_dali_rejects_is_found_by_decoding_each_row_alone(broken, monkeypatch, caplog):
    root, _ = broken
    monkeypatch.setattr(dali_mod, "decode", lambda path: None)  # PIL "decodes" everything
    caplog.set_level(logging.WARNING, logger="hybridpar")
    dali_batches, _, _ = _torch_and_dali_epochs(root, train=False)
    assert dali_batches.skipped == 2
    reasons = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(reasons) == 1 and "DALI cannot decode it" in reasons[0]


@pytest.mark.timeout(60)
def test_every_file_unreadable_is_one_line_data_error(tmp_path):
    for c in CLASSES[:2]:
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.JPEG").write_bytes(b"not an image")
    dataset = ImageFiles(str(tmp_path), PaperTransform(RESIZE, SIZE, train=True))
    loader = dali_train_loader(dataset, local_batch=1, rank=0, world_size=1, seed=0, device=CPU)
    with pytest.raises(DataError, match="every one of the 2 images"):
        _epoch(loader, 0)


def test_missing_dali_is_a_one_line_error(flat, monkeypatch):
    assert dali_available()
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    assert not dali_available()
    with pytest.raises(DataError) as info:
        dali_train_loader(flat[0], local_batch=2, rank=0, world_size=1, seed=0, device=CPU)
    assert str(info.value) == DALI_MISSING == 'data.loader=dali needs NVIDIA DALI: pip install -e ".[dali]"'
    with pytest.raises(DataError, match="needs NVIDIA DALI"):
        dali_eval_batches(flat[1], local_batch=2, rank=0, world_size=1, device=CPU)


@pytest.mark.timeout(240)
def test_the_app_trains_the_same_run_with_either_loader(tmp_path):
    """``data.loader=dali`` end to end (two emulated workers, the paper's augmentation, dropout off): the same
    examples at the same steps as ``data.loader=torch``: every step's loss agrees to within 1% (the grey level
    that separates their pixels), while the losses of different batches differ by far more, so another
    order would not pass."""
    import json
    import os

    from tests.helpers import concurrently, run_cmd

    _write(tmp_path / "data" / "train", 8, _colour, textured=True)
    _write(tmp_path / "data" / "val", 3, _colour, textured=True)

    def train(loader: str):
        return run_cmd(
            [
                sys.executable,
                "-m",
                "hybridpar.train",
                "data=imagenet",
                f"data.root={tmp_path / 'data'}",
                f"data.loader={loader}",
                "data.num_workers=0",
                "data.resize=36",
                "data.image_size=32",
                "data.batch_size=4",
                "model=alexnet_small",
                "model.dropout=0.0",
                # A small rate: each step's loss is the (nearly untrained) model's on that step's batch, so the
                # comparison sees the order and the pixels, not two trajectories drifting apart.
                "optim.lr=0.0001",
                "parallel.emulate=2",
                "trainer.max_steps=6",
                "trainer.log_every_steps=1",
                "logger=none",
                "trainer.progress=false",
                f"hydra.run.dir={tmp_path / loader}",
            ],
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HYBRIDPAR_FAULT": ""},
        )

    loaders = ("torch", "dali")
    runs = concurrently(*(lambda loader=loader: train(loader) for loader in loaders))  # independent: launched together
    summaries, losses = {}, {}
    for loader, proc in zip(loaders, runs, strict=True):
        run_dir = tmp_path / loader
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[loader] = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[loader] = [r["train/loss"] for r in records if "train/loss" in r]
    a, b = summaries["torch"], summaries["dali"]
    assert a["steps"] == b["steps"] == 6 and len(losses["torch"]) == len(losses["dali"]) == 6
    for step, (x, y) in enumerate(zip(losses["torch"], losses["dali"], strict=True), 1):
        assert y == pytest.approx(x, rel=1e-2), (step, losses)
    spread = max(abs(x - y) / x for x in losses["torch"] for y in losses["torch"])
    assert spread > 0.05, losses  # one step's batch is not another's: order shows at this tolerance
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-2)
    assert b["unreadable_train_images"] == 0
