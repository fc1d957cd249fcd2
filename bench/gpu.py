"""hybridpar (K = 1) against a plain torchvision-AlexNet training loop: step time and images/s.

    torchrun --standalone --nproc_per_node=1 bench/gpu.py [--batch 128] [--steps 50] [--precision fp32,bf16]

Both loops train the same torchvision AlexNet (same seed, dropout 0 so the losses can be compared),
with SGD (momentum 0.9, weight decay 5e-4), on the same batches: FakeData images made once,
before timing, and held in pinned host memory, so both loops copy each batch to the device
(non-blocking) and neither waits on image decoding. On a GPU hybridpar runs over NCCL (K = 1: its
overhead is the wrapper, the hooks and the bookkeeping); on a CPU over gloo. The two loops
alternate, twice each, and the figures are medians of the per-step times of both visits.
Prints a markdown table; ``--json PATH`` appends the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torchvision
from torch.nn import functional as F

from hybridpar.comm import DistCommunicator
from hybridpar.models import build_seeded
from hybridpar.parallel import HybridModel


def fake_batches(n: int, b: int, pin: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = torchvision.datasets.FakeData(n * b, (3, 224, 224), 1000, transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=b, num_workers=min(8, os.cpu_count() or 1), pin_memory=pin)
    return [(x, y) for x, y in loader]


def timed_steps(step, batches, device, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-step seconds (CUDA events on a GPU) and the losses, read after the timed window."""
    cuda = device.type == "cuda"
    times, losses = [], []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        if cuda:
            end.record()
        else:
            times.append(time.perf_counter() - t0)
        if i >= warmup:
            losses.append(loss.detach())
            if cuda:
                times.append((start, end))
        elif not cuda:
            times.pop()
    if cuda:
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in times]
    return times, [float(v) for v in losses]


def make_step(impl: str, comm, device, precision: str, channels_last: bool):
    model = build_seeded(lambda: torchvision.models.alexnet(num_classes=1000, dropout=0.0), 0).to(device)
    if channels_last:  # the fast path's memory format, for both loops alike
        model = model.to(memory_format=torch.channels_last)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    if impl == "hybridpar":
        model = HybridModel(model, comm)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def plain(x, y):
        opt.zero_grad(set_to_none=True)
        with amp():
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    def hybrid(x, y):
        opt.zero_grad(set_to_none=True)
        loss, _ = model.train_step(x, y, scheme="a", optimizer=opt, autocast=amp)
        opt.step()
        return loss

    step = hybrid if impl == "hybridpar" else plain
    if not channels_last:
        return step
    return lambda x, y: step(x.contiguous(memory_format=torch.channels_last), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--channels-last", action="store_true", help="also time both loops with channels_last")
    ap.add_argument("--json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    dist.init_process_group("nccl" if cuda else "gloo")
    comm = DistCommunicator()
    batches = fake_batches(args.batches, args.batch, pin=cuda)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    layouts = (False, True) if args.channels_last else (False,)
    for precision in args.precision.split(","):
        for cl in layouts:
            times: dict[str, list[float]] = {"plain": [], "hybridpar": []}
            losses: dict[str, list[float]] = {}
            for impl in ("plain", "hybridpar") * 2:
                step = make_step(impl, comm, device, precision, cl)
                t, loss = timed_steps(step, batches, device, args.steps, args.warmup)
                times[impl] += t
                losses.setdefault(impl, loss)  # the first visit of each: same start, same batches
            med = {k: statistics.median(v) for k, v in times.items()}
            diff = max(abs(a - b) for a, b in zip(losses["plain"], losses["hybridpar"]))
            for impl in ("plain", "hybridpar"):
                rows.append(
                    {
                        "device": name,
                        "precision": precision,
                        "layout": "channels_last" if cl else "NCHW",
                        "impl": impl,
                        "batch": args.batch,
                        "step_s": med[impl],
                        "images_per_s": args.batch / med[impl],
                        "overhead": med[impl] / med["plain"] - 1,
                        "max_loss_diff": diff,
                        "torch": torch.__version__,
                    }
                )
    print(f"{name}, torch {torch.__version__}, AlexNet 224 px, b = {args.batch}, medians of 2 × {args.steps} steps")
    print("| precision | layout | loop | step ms | images/s | overhead vs plain | max |Δloss| over the steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['layout']} | {r['impl']} | {r['step_s'] * 1e3:.2f} | {r['images_per_s']:.0f} | "
            f"{r['overhead']:+.1%} | {r['max_loss_diff']:.1e} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
