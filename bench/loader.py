"""Images/s of each loader on real JPEGs at ImageNet-like sizes, next to the step they have to feed.

    python bench/loader.py [--images 2000] [--batch 128] [--root DIR] [--gpu-app]

Makes (once, in ``--root``) an ImageFolder of ``--images`` JPEGs of about 500×375 (ImageNet's typical
size; smooth colour fields with grain, quality 90, so each file is as large and as costly to decode as a
photograph's), then times a training epoch's batches of the paper's augmentation through:

- the torch loader (``data.loader=torch``: PIL decode + ``PaperTransform`` in DataLoader worker processes)
  with 0 and with 2 worker processes,
- DALI on the CPU (``data.loader=dali`` on a CPU device; skipped with the reason if DALI is not installed),
- on a GPU: DALI "mixed" (JPEG decode on the GPU), and ``--gpu-app`` runs the training app end to end
  with ``data=synthetic`` and with DALI on these JPEGs next to the bare step's images/s (a torchvision
  AlexNet step in bf16, channels_last, on one batch held on the device).

Each row is the median over ``--repeats`` passes of ``--batches`` batches after one warm-up batch; rows
are measured one after the other in one run. Writes the table to docs/benchmarks.md (``loader`` section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.docs_section import write_section
from hybridpar.data import build_datasets, train_loader


def make_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` training and ``n // 10`` held-out JPEGs under ``root/{train,val}/<class>/``, unless there."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        done = root / split / ".complete"
        if done.exists():
            continue
        for i in range(count):
            c = i % classes
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (500, 375) if rng.random() < 0.75 else (375, 500)  # landscape mostly, as photographs
            coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
            field = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            grain = rng.normal(0, 12, (h, w, 3))
            pixels = np.clip(np.asarray(field, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:05d}.JPEG", quality=90)
        done.touch()


def time_loader(loader, batches: int, repeats: int, batch: int, sync) -> tuple[float, float]:
    """Median and spread (min..max) of images/s over ``repeats`` passes of ``batches`` batches."""
    rates = []
    for r in range(repeats):
        loader.start_epoch(r)
        it = iter(loader)
        next(it)  # warm-up: worker start, first decode
        t0 = time.perf_counter()
        for _ in range(batches):
            x, _ = next(it)
        sync(x)
        rates.append(batches * batch / (time.perf_counter() - t0))
    return statistics.median(rates), max(rates) - min(rates)


def bare_step_rate(batch: int, device: torch.device, steps: int = 30) -> float:
    """Images/s of a torchvision AlexNet training step alone (bf16 autocast, channels_last, SGD) on a batch
    already on the device: the rate any loader has to keep up with."""
    import torchvision

    model = torchvision.models.alexnet(num_classes=1000).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - t0)


def app_rate(overrides: list[str], run_dir: Path) -> dict:
    """The training app on one GPU: its summary (end-to-end and step-only images/s, data wait)."""
    cmd = [sys.executable, "-m", "hybridpar.train", *overrides, "logger=none", "trainer.progress=false"]
    cmd += ["checkpoint.every_steps=null", "trainer.eval_every_steps=null", f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True, env={**os.environ, "HYBRIDPAR_FAULT": ""})
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "hybridpar-jpegs")
    parser.add_argument("--gpu-app", action="store_true", help="also time the app end to end (GPU only)")
    parser.add_argument("--json", type=Path, help="append the rows here")
    args = parser.parse_args()
    make_jpegs(args.root, args.images)
    files = sorted((args.root / "train").rglob("*.JPEG"))
    mean_kb = statistics.mean(f.stat().st_size for f in files) / 1e3
    cfg = {"name": "imagenet", "root": str(args.root), "resize": 256, "image_size": 224, "lighting": 0.1}
    data = build_datasets(cfg)
    cuda = torch.cuda.is_available()
    gpu = torch.device("cuda") if cuda else None

    def sync(x):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    rows: list[tuple[str, str, float | None, float | None, str]] = []

    def run(name: str, where: str, make, note: str = "") -> None:
        try:
            loader = make()
        except Exception as exc:  # noqa: BLE001 - a loader that cannot run here is a row saying why
            rows.append((name, where, None, None, f"not run: {exc}"))
            print(rows[-1])
            return
        rate, spread = time_loader(loader, args.batches, args.repeats, args.batch, sync)
        rows.append((name, where, rate, spread, note))
        print(f"{name:28s} {where:10s} {rate:9.1f} images/s (spread {spread:.1f}) {note}", flush=True)

    common = {"local_batch": args.batch, "rank": 0, "world_size": 1, "seed": 0}
    for workers in (0, 2):
        run(
            f"torch, {workers} worker processes",
            "CPU",
            lambda w=workers: train_loader(data.train, num_workers=w, **common),
        )
    run("DALI", "CPU", lambda: train_loader(data.train, loader="dali", device="cpu", **common), "2 threads")
    if cuda:
        run("DALI mixed", "GPU", lambda: train_loader(data.train, loader="dali", device=gpu, **common))
        rows.append(("bare AlexNet step (bf16)", "GPU", bare_step_rate(args.batch, gpu), 0.0, "no loader"))
        if args.gpu_app:
            base = ["trainer.precision=bf16", "trainer.channels_last=true", f"data.batch_size={args.batch}"]
            with tempfile.TemporaryDirectory() as tmp:
                for name, extra in (
                    ("app, data=synthetic", ["data=synthetic"]),
                    ("app, DALI on the JPEGs", ["data=imagenet", f"data.root={args.root}", "data.loader=dali"]),
                ):
                    s = app_rate([*extra, *base, "trainer.max_steps=60"], Path(tmp) / name.replace(" ", "_"))
                    note = f"step alone {s['step_images_per_s']:.0f}/s, data wait {s['data_s_per_step'] * 1e3:.1f} ms"
                    rows.append((name, "GPU", s["images_per_s"], None, note))
    else:
        for name in ("DALI mixed", "bare AlexNet step (bf16)", "app, data=synthetic", "app, DALI on the JPEGs"):
            rows.append((name, "GPU", None, None, "unmeasured: no GPU in this run"))

    header = (
        f"{len(files)} JPEGs, mean {mean_kb:.0f} kB, ~500×375; batch {args.batch}, the paper's training "
        f"augmentation; median of {args.repeats} passes × {args.batches} batches; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if cuda else "")
    )
    lines = [header, "", "| loader | where | images/s | spread | note |", "|---|---|---|---|---|"]
    for name, where, rate, spread, note in rows:
        r = f"{rate:.1f}" if rate is not None else "–"
        sp = f"{spread:.1f}" if spread is not None else "–"
        lines.append(f"| {name} | {where} | {r} | {sp} | {note} |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        with args.json.open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(("loader", "where", "images_per_s", "spread", "note"), row))) + "\n")
    write_section("loader", text, "bench/loader.py")


if __name__ == "__main__":
    main()
