"""Image folders with broken files: training and evaluation never crash, count what they skipped, and say
which files; keyed augmentation that does not depend on the world size or the DataLoader worker count."""

from __future__ import annotations

import io
import logging
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image

from hybridpar.data import DataError, build_datasets, eval_batches, eval_steps, train_loader
from hybridpar.data.imagenet import ImageFiles

CLASSES = ("n01", "n02")
GOOD_PER_CLASS = 6
LOCAL_BATCH = 4


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    # Smooth gradients plus noise: crops at different offsets differ, and JPEG/PNG stay small.
    yy, xx = np.mgrid[0:40, 0:44]
    base = np.stack([yy * 6, xx * 5, (yy + xx) * 3], axis=-1)
    pixels = (base + rng.integers(0, 40, size=base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _write_split(split_dir, rng: np.random.Generator, *, corrupt: bool) -> set[str]:
    """Writes GOOD_PER_CLASS readable images per class; with ``corrupt``, four broken files. Returns their paths."""
    for c in CLASSES:
        (split_dir / c).mkdir(parents=True)
        for k in range(GOOD_PER_CLASS):
            fmt = "PNG" if k % 2 else "JPEG"
            (split_dir / c / f"img{k}.{fmt}").write_bytes(_image_bytes(rng, fmt))
    if not corrupt:
        return set()
    jpeg, png = _image_bytes(rng, "JPEG"), _image_bytes(rng, "PNG")
    bad = {
        # "bad0"/"bad1" sort next to each other in n01: the stand-in search walks over both.
        split_dir / "n01" / "bad0_empty.JPEG": b"",
        split_dir / "n01" / "bad1_garbage.JPEG": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        split_dir / "n02" / "bad_truncated.JPEG": jpeg[: len(jpeg) // 2],
        split_dir / "n02" / "zz_truncated.png": png[: len(png) // 2],  # last file of the folder: wraps round
    }
    for path, data in bad.items():
        path.write_bytes(data)
    return {str(p) for p in bad}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root with train/ and val/, each 2 classes x 6 good images + 4 broken files; returns (root, bad paths)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    bad_train = _write_split(root / "train", rng, corrupt=True)
    bad_val = _write_split(root / "val", rng, corrupt=True)
    return root, bad_train, bad_val


def _cfg(root, **extra):
    return {"name": "imagenet", "root": str(root), "image_size": 32, "resize": 36, **extra}


def _bad_indices(dataset: ImageFiles, bad: set[str]) -> set[int]:
    return {i for i, (path, _) in enumerate(dataset.samples) if path in bad}


def _walked(dataset: ImageFiles, index: int, bad: set[str]) -> list[str]:
    """The unreadable files met from ``index`` on until a readable one, wrapping round."""
    paths = []
    while dataset.samples[index][0] in bad:
        paths.append(dataset.samples[index][0])
        index = (index + 1) % len(dataset)
    return paths


def _train_epochs(
    data, *, world_size: int, num_workers: int, epochs: int = 2, seed: int = 5, local_batch=LOCAL_BATCH, context=None
):
    """Every rank's loader after ``epochs`` epochs, with its batches and sampled indices per epoch."""
    out = []
    for rank in range(world_size):
        loader = train_loader(
            data.train,
            local_batch=local_batch // world_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=num_workers,
        )
        if context is not None:
            loader.multiprocessing_context = context
        batches, sampled = [], []
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            got = list(loader)
            batches.append(got)
            used = len(got) * loader.batch_size
            sampled.append([i for i, e in list(loader.sampler)[:used]])
            assert all(e == epoch for _, e in loader.sampler)
        out.append((loader, batches, sampled))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_skips_counts_and_logs_unreadable_images(folder, num_workers, caplog):
    root, bad_train, _ = folder
    data = build_datasets(_cfg(root))
    assert len(data.train) == 2 * GOOD_PER_CLASS + 4
    bad_idx = _bad_indices(data.train, bad_train)
    assert len(bad_idx) == 4
    # Batches of 3 from 16 examples: each epoch one example sits out, so the count must follow the sampler.
    with caplog.at_level(logging.WARNING, logger="hybridpar"):
        ((loader, batches, sampled),) = _train_epochs(data, world_size=1, num_workers=num_workers, local_batch=3)
    hits, met = 0, set()
    for epoch_batches, epoch_sampled in zip(batches, sampled, strict=True):
        assert len(epoch_batches) == len(data.train) // 3 and len(epoch_sampled) == 15
        for x, y in epoch_batches:
            assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (3,)
            assert torch.isfinite(x).all()
        hits += sum(i in bad_idx for i in epoch_sampled)
        met.update(p for i in epoch_sampled for p in _walked(data.train, i, bad_train))
    assert hits >= len(bad_idx)  # each epoch misses at most one of the 4
    assert loader.skipped == hits
    # One line per unreadable file met, naming it, however often it was met; none for readable files.
    logged = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(logged) == len(met) >= 3
    for path in met:
        assert sum(path in line for line in logged) == 1, (path, logged)


@pytest.mark.timeout(60)
def test_stand_in_is_the_next_readable_example_wrapping_round(folder):
    root, bad_train, _ = folder
    train = build_datasets(_cfg(root)).train
    n = len(train)
    walks = []
    for i in sorted(_bad_indices(train, bad_train)):
        item = train.load(i, seed=1, epoch=0)
        walk = _walked(train, i, bad_train)
        j = (i + len(walk)) % n
        assert item.substituted and item.label == train.samples[j][1]
        assert [p for p, _ in item.unreadable] == walk
        walks.append(len(walk))
        # The stand-in is augmented with the requested example's key: the same draw, on the stand-in's image.
        assert torch.equal(item.image, train.preprocess(_decoded(train.samples[j][0]), _key(1, 0, i)))
    # n01/bad0 walks over bad1; n02/zz_truncated.png, the last file, wraps round over n01's bad0 and bad1.
    assert train.samples[-1][0].endswith("zz_truncated.png") and train.samples[0][0].endswith("bad0_empty.JPEG")
    assert walks == [2, 1, 1, 3]
    good = next(i for i in range(n) if train.samples[i][0] not in bad_train)
    item = train.load(good)
    assert not item.substituted and item.unreadable == ()
    x, y = train[good]
    assert torch.equal(x, item.image) and y == item.label


def _decoded(path):
    from hybridpar.data.imagenet import decode

    return decode(path)


def _key(seed, epoch, index):
    from hybridpar.data.imagenet import example_generator

    return example_generator(seed, epoch, index)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_batches_skip_exactly_the_bad_val_files(folder, num_workers, caplog):
    root, _, bad_val = folder
    data = build_datasets(_cfg(root))
    n = len(data.val)
    bad_idx = _bad_indices(data.val, bad_val)
    world_size, local_batch = 3, 2
    steps = eval_steps(n, local_batch, world_size)
    skipped, valid_ids = 0, []
    with caplog.at_level(logging.WARNING, logger="hybridpar"):
        for rank in range(world_size):
            batches = eval_batches(
                data.val, local_batch=local_batch, rank=rank, world_size=world_size, num_workers=num_workers
            )
            got = list(batches)
            assert len(got) == steps
            mine = list(range(rank, n, world_size))
            for j, (x, y, valid) in enumerate(got):
                assert x.shape == (local_batch, 3, 32, 32) and y.shape == valid.shape == (local_batch,)
                rows = mine[j * local_batch : (j + 1) * local_batch]
                # A stand-in row is not counted: the metric covers each readable example once.
                expected = [i not in bad_idx for i in rows] + [False] * (local_batch - len(rows))
                assert valid.tolist() == expected
                valid_ids += [i for i, v in zip(rows, valid.tolist()) if v]
                assert y[valid].tolist() == [data.val.samples[i][1] for i in rows if i not in bad_idx]
            assert batches.skipped == sum(i in bad_idx for i in mine)
            skipped += batches.skipped
    assert skipped == len(bad_val) == 4
    assert sorted(valid_ids) == sorted(set(range(n)) - bad_idx)
    logged = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(logged) == len(bad_val) and all(any(p in line for line in logged) for p in bad_val)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", [None, "spawn"])
def test_worker_processes_give_the_same_images_counts_and_log_lines(folder, context, caplog):
    """Spawned workers share nothing with the main process: counts and file names must come back with the data."""
    root, bad_train, _ = folder
    data = build_datasets(_cfg(root))
    ((l0, b0, _),) = _train_epochs(data, world_size=1, num_workers=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybridpar"):
        ((l2, b2, _),) = _train_epochs(build_datasets(_cfg(root)), world_size=1, num_workers=2, context=context)
    assert l0.skipped == l2.skipped == 2 * len(bad_train)
    for e0, e2 in zip(b0, b2, strict=True):
        for (x0, y0), (x2, y2) in zip(e0, e2, strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)
    logged = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert sorted(p for p in bad_train for line in logged if p in line) == sorted(bad_train)


@pytest.mark.timeout(60)
def test_keyed_augmentation_is_independent_of_world_size_and_workers(tmp_path):
    rng = np.random.default_rng(1)
    _write_split(tmp_path / "train", rng, corrupt=False)
    _write_split(tmp_path / "val", rng, corrupt=False)
    data = build_datasets(_cfg(tmp_path))

    def by_example(world_size: int, num_workers: int) -> list[dict[int, torch.Tensor]]:
        """epoch -> {example index: its augmented image} over every rank."""
        per_epoch = [{}, {}]
        for _, batches, sampled in _train_epochs(data, world_size=world_size, num_workers=num_workers):
            for epoch in range(2):
                images = torch.cat([x for x, _ in batches[epoch]])
                per_epoch[epoch].update(zip(sampled[epoch], images))
        return per_epoch

    reference = by_example(1, 0)
    assert all(len(e) == len(data.train) for e in reference)
    # A new epoch draws new crops/flips/lighting for the same examples.
    changed = sum(not torch.equal(reference[0][i], reference[1][i]) for i in reference[0])
    assert changed >= len(data.train) // 2, changed
    # Persistent worker processes see epoch 1 too (they started in epoch 0).
    for world_size, num_workers in [(2, 0), (1, 2), (2, 2)]:
        other = by_example(world_size, num_workers)
        for epoch in range(2):
            assert other[epoch].keys() == reference[epoch].keys()
            assert all(torch.equal(other[epoch][i], reference[epoch][i]) for i in reference[epoch]), (
                world_size,
                num_workers,
                epoch,
            )
    # The draw is keyed, not global: torch's generator neither feeds nor notices it.
    state = torch.get_rng_state()
    torch.manual_seed(123)
    x = data.train.load(3, seed=5, epoch=1).image
    torch.manual_seed(456)
    assert torch.equal(x, data.train.load(3, seed=5, epoch=1).image)
    torch.set_rng_state(state)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_image_unreadable_is_one_line_data_error(tmp_path, num_workers):
    for split in ("train", "val"):
        for c in CLASSES:
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(4):
                (tmp_path / split / c / f"{k}.JPEG").write_bytes(b"not a jpeg" * k)
    data = build_datasets(_cfg(tmp_path))
    loader = train_loader(data.train, local_batch=2, rank=0, world_size=1, seed=0, num_workers=num_workers)
    loader.sampler.set_epoch(0)
    with pytest.raises(DataError, match=r"every one of the 8 images under .*train is unreadable") as info:
        next(iter(loader))
    assert "\n" not in str(info.value)
    # The error's traceback is still held here, and the loader's worker processes are already gone: they are not
    # left to the garbage collector (which found them with their queues closed, and waited 5 s on each).
    assert multiprocessing.active_children() == []
    with pytest.raises(DataError, match=r"every one of the 8 images under .*val is unreadable") as info:
        list(eval_batches(data.val, local_batch=2, rank=0, world_size=1, num_workers=num_workers))
    assert "\n" not in str(info.value)
    assert multiprocessing.active_children() == []  # an evaluation's workers end with the error
    with pytest.raises(DataError, match="unreadable"):
        data.train[0]


@pytest.mark.timeout(300)
def test_training_on_a_folder_with_broken_images_finishes_and_reports_them(folder, tmp_path):
    """End to end: 2 emulated workers, one epoch (16 train files, 4 of them broken, all sampled)."""
    import json
    import subprocess
    import sys

    root, bad_train, bad_val = folder
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybridpar.train",
            "parallel.emulate=2",
            "data=imagenet",
            f"data.root={root}",
            "data.image_size=32",
            "data.resize=36",
            f"data.batch_size={LOCAL_BATCH}",
            "data.num_workers=0",
            "model=alexnet_small",
            "trainer.epochs=1",
            "logger=none",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unreadable_train_images"] == len(bad_train) == 4
    assert summary["unreadable_val_images"] == len(bad_val) == 4
    for path in bad_train | bad_val:
        assert path in proc.stdout, path  # each broken file is named in the log
