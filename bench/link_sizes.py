"""The link's rate by collective and message size: all-reduce, all-gather and all-to-all of 1, 4
and 17 MB per worker, medians of 5 (gloo).

    bench/twohost.sh 100mbit bench/link_sizes.py

What the cost model assumes is one rate for every collective, calibrated with an all-reduce
(bench/schemes.py); this measures how far the head's large single-message moves fall from it.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def timed(fn, reps: int = 5) -> float:
    ts = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    dist.init_process_group("gloo")
    K = dist.get_world_size()
    if dist.get_rank() == 0:
        print("| MB per worker | all-reduce MB/s | all-gather MB/s | all-to-all MB/s |\n|---|---|---|---|")
    for n in (1 << 18, 1 << 20, 1 << 22):
        x = torch.ones(n)
        gathered, swapped = torch.empty(n * K), torch.empty(n)
        # Bytes each worker sends: a ring all-reduce 2 (K-1)/K · n · 4, an all-gather n · 4 · (K-1),
        # an all-to-all n · 4 · (K-1)/K.
        ar = timed(lambda x=x: dist.all_reduce(x))
        ag = timed(lambda x=x, g=gathered: dist.all_gather_into_tensor(g, x))
        a2a = timed(lambda x=x, s=swapped: dist.all_to_all_single(s, x))
        if dist.get_rank() == 0:
            mb = n * 4 / 1e6
            rates = (2 * (K - 1) / K * mb / ar, (K - 1) * mb / ag, (K - 1) / K * mb / a2a)
            print(f"| {mb:.1f} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
