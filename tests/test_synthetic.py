"""``data=synthetic`` (a pool drawn once on the device, batched without a loader) and the data-wait metric
(``perf/data_s``, ``data_s_per_step``, the end-to-end ``images_per_s`` and its one warning line)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hybridpar.data import build_datasets, eval_batches, train_loader
from hybridpar.data.synthetic import SyntheticImages
from hybridpar.errors import ConfigError
from hybridpar.outputs import Meter
from hybridpar.trainer import validate
from tests.helpers import compose_train, run_cmd

SMALL = {"name": "synthetic", "size": 70, "val_size": 23, "image_size": 12, "num_classes": 5, "seed": 3}


def test_synthetic_batches_are_torchs_distributed_sampler_over_the_pool_every_epoch_and_on_resume():
    """The reference is torch alone: a DataLoader with torch's DistributedSampler (shuffle, drop_last) over
    the same examples; the synthetic loader must hand every worker the very same batches, epoch after epoch,
    and a resumed epoch its tail."""
    data = build_datasets(SMALL)
    images, labels = data.train.pool(torch.device("cpu"))
    W, b, seed = 3, 4, 11
    reference = TensorDataset(images, labels)
    for rank in range(W):
        loader = train_loader(data.train, local_batch=b, rank=rank, world_size=W, seed=seed)
        sampler = DistributedSampler(reference, num_replicas=W, rank=rank, shuffle=True, seed=seed, drop_last=True)
        torch_loader = DataLoader(reference, batch_size=b, sampler=sampler, drop_last=True)
        seen = []
        for epoch in range(3):
            loader.start_epoch(epoch)
            sampler.set_epoch(epoch)
            ours, theirs = list(loader), list(torch_loader)
            assert len(ours) == len(theirs) == len(reference) // (W * b) == 5
            for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
                assert torch.equal(x, tx) and torch.equal(y, ty)
            seen.append(torch.cat([y for _, y in ours]))
            loader.start_epoch(epoch, skip_batches=2)  # resumed after two batches of this epoch
            tail = list(loader)
            assert len(tail) == 3 and all(torch.equal(x, t[0]) for (x, _), t in zip(tail, ours[2:], strict=True))
        assert not torch.equal(seen[0], seen[1])  # reshuffled by the epoch


def test_the_pool_is_drawn_once_per_device_and_shared_by_emulated_workers():
    data = build_datasets(SMALL)
    first = train_loader(data.train, local_batch=4, rank=0, world_size=2, seed=0)
    second = train_loader(data.train, local_batch=4, rank=1, world_size=2, seed=0)
    assert first.images.data_ptr() == second.images.data_ptr()  # one pool, not a copy per worker
    x, y = next(iter(first))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The same seed draws the same set; another seed another one.
    again = SyntheticImages(70, 12, 5, seed=3)
    assert torch.equal(again.pool(torch.device("cpu"))[0], data.train.pool(torch.device("cpu"))[0])
    assert not torch.equal(SyntheticImages(70, 12, 5, seed=4).pool(torch.device("cpu"))[0], again.pool("cpu")[0])


def test_held_out_batches_cover_every_example_once_with_padding_marked():
    data = build_datasets(SMALL)
    images, labels = data.val.pool(torch.device("cpu"))
    W, b = 4, 4
    rows = []
    steps = set()
    for rank in range(W):
        batches = list(eval_batches(data.val, local_batch=b, rank=rank, world_size=W))
        steps.add(len(batches))
        for x, y, valid in batches:
            assert x.shape[0] == b
            rows += [(x[i], y[i]) for i in range(b) if valid[i]]
            assert not x[~valid].any()
    assert steps == {2}  # ceil(ceil(23 / 4) / 4): every worker the same count
    assert len(rows) == 23
    matched = [int(torch.nonzero((images == x).flatten(1).all(1))[0]) for x, _ in rows]
    assert sorted(matched) == list(range(23))
    assert all(int(y) == int(labels[i]) for (_, y), i in zip(rows, matched, strict=True))


def test_synthetic_labels_can_be_learned():
    """A linear classifier fit on the training pool beats chance on the held-out pool by far: the classes
    share their patterns across the two sets (else the data would train nothing)."""
    data = build_datasets({**SMALL, "size": 400, "val_size": 200})
    x, y = data.train.pool(torch.device("cpu"))
    vx, vy = data.val.pool(torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Linear(x[0].numel(), 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        opt.step()
    accuracy = (model(vx.flatten(1)).argmax(1) == vy).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 0.2


def test_the_data_wait_warning_comes_once_and_only_above_a_tenth_of_the_step():
    meter = Meter()
    for _ in range(8):
        meter.add(0.100, 0.005, 0.0, 0, 4, 1.0)
    assert meter.data_bound(window=5) is None
    for _ in range(8):
        meter.add(0.100, 0.030, 0.0, 0, 4, 1.0)
    wait, step = meter.data_bound(window=5)
    assert wait == pytest.approx(0.030) and step == pytest.approx(0.100)
    assert meter.data_bound(window=5) is None  # once per run


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.loader=ffcv"], "data.loader='ffcv' is not one of torch, dali"),
        (["data.loader=dali"], "data.loader=dali reads image folders: it needs data=imagenet, not data=embedded"),
        (["data=synthetic", "data.loader=dali"], "needs data=imagenet, not data=synthetic"),
    ],
)
def test_a_loader_that_cannot_serve_the_data_is_refused_before_any_worker_starts(overrides, fragment):
    cfg = compose_train(*overrides)
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


@pytest.mark.timeout(240)
def test_a_slow_loader_shows_as_data_wait_in_metrics_summary_and_one_warning(tmp_path):
    """``slow@60`` holds every batch back 60 ms, as a loader that cannot keep up would: the wait is in
    ``perf/data_s`` and ``data_s_per_step``, the end-to-end ``images_per_s`` falls below the step's own rate
    by exactly that, and one warning names the bottleneck."""
    env = {**os.environ, "HYBRIDPAR_FAULT": "slow@60", "OMP_NUM_THREADS": "1"}
    steps = 10
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "hybridpar.train",
            "data=synthetic",
            *[f"data.{k}={v}" for k, v in SMALL.items() if k not in ("name", "image_size")],
            "data.image_size=32",  # the smallest the small AlexNet's pooling takes
            "data.batch_size=4",
            "model=alexnet_small",
            "parallel.emulate=2",
            f"trainer.max_steps={steps}",
            "trainer.log_every_steps=5",
            "logger=none",
            "trainer.progress=false",
            "checkpoint.every_steps=null",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "the data loader is the bottleneck" in line]
    assert len(warnings) == 1, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data_s_per_step"] >= 0.06
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "perf/data_s" in r]
    assert [r["step"] for r in logged] == [5, 10] and all(r["perf/data_s"] >= 0.06 for r in logged)
    images = steps * 8
    step_rate, rate = summary["step_images_per_s"], summary["images_per_s"]
    assert rate < step_rate
    # The end-to-end rate spends each step's wait on top of the step: at least 60 ms more per step.
    assert images / rate - images / step_rate >= steps * 0.06
