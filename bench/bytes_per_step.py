"""Bytes per worker and step for AlexNet: the emulated ledger vs the closed form vs DDP.

    python bench/bytes_per_step.py --workers 2 4 8 --batch 128

Runs one real hybrid step of torchvision-layout AlexNet (1000 classes) on K emulated workers
and reads the byte ledger. The input is 64 px instead of 224: the adaptive pool still hands
the head 256·6·6 = 9216 features per image and the trunk has the same parameters, so every
byte count is that of 224 px, at a fraction of the CPU time.
"""

from __future__ import annotations

import argparse

import torch

from hybridpar.comm import run_emulated
from hybridpar.models import alexnet, build_seeded
from hybridpar.parallel import HybridModel, global_mean_loss
from hybridpar.parallel.cost import ddp_step_bytes, hybrid_step_bytes
from hybridpar.parallel.data_parallel import trunk_bucket_numels

WIDTHS = [(9216, 4096), (4096, 4096), (4096, 1000)]


def measure(K: int, b: int, plan: str, image_size: int) -> list[int]:
    model = build_seeded(lambda: alexnet(1000, dropout=0.0), 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K * b, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 1000, (K * b,), generator=g)

    def step(comm):
        m = HybridModel(model, comm, plan=plan)
        lo = comm.rank * b
        global_mean_loss(m(x[lo : lo + b]), y[lo : lo + b], comm).backward()
        m.sync_gradients()
        return comm.ledger.sent

    return run_emulated(K, step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = alexnet(1000)
    total = sum(p.numel() for p in model.parameters())
    trunk = trunk_bucket_numels([p.numel() for p in model.features.parameters()])
    print(f"AlexNet: {total:,} parameters, {sum(trunk):,} in the conv trunk (buckets {trunk}); b = {args.batch} per worker; fp32")
    print("| K | head layout | ledger MB/worker (max) | formula MB | DDP MB | hybrid / DDP |")
    print("|---|---|---|---|---|---|")
    for K in args.workers:
        for plan, styles in (("paper", ("col", "row", "row")), ("min_bytes", ("row", "row", "row"))):
            sent = measure(K, args.batch, plan, args.image_size)
            formula = [hybrid_step_bytes(WIDTHS, styles, trunk, args.batch, K, r) for r in range(K)]
            assert sent == formula, (K, plan, sent, formula)
            ddp = ddp_step_bytes(total, K)
            print(f"| {K} | {'/'.join(styles)} ({plan}) | {max(sent) / 1e6:.2f} | {max(formula) / 1e6:.2f} | {ddp / 1e6:.2f} | {max(sent) / ddp:.3f} |")


if __name__ == "__main__":
    main()
