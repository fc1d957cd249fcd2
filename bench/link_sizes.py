"""The link's rate by collective and message size: all-reduce, all-gather and all-to-all of 1, 4
and 17 MB per worker, each move whole and in the communicator's 1 MB pieces
(``parallel.move_piece_mb``), medians of 5 (gloo).

    bench/twohost.sh 100mbit bench/link_sizes.py

What the cost model assumes is one rate for every collective, calibrated with an all-reduce
(bench/schemes.py); this measures how far the head's moves fall from it, whole and in pieces.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from hybridpar.comm import DistCommunicator
from hybridpar.comm.torchdist import MOVE_PIECE_BYTES


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
    whole, pieces = DistCommunicator(piece_bytes=None), DistCommunicator(piece_bytes=MOVE_PIECE_BYTES)
    if dist.get_rank() == 0:
        print(
            "| MB per worker | all-reduce MB/s | all-gather MB/s, whole | in 1 MB pieces "
            "| all-to-all MB/s, whole | in 1 MB pieces |\n|---|---|---|---|---|---|"
        )
    for n in (1 << 18, 1 << 20, 1 << 22):
        x = torch.ones(n)
        parts, shapes = list(x.chunk(K)), [torch.Size([n // K])] * K
        # Bytes each worker sends: a ring all-reduce 2 (K-1)/K · n · 4, an all-gather n · 4 · (K-1),
        # an all-to-all n · 4 · (K-1)/K.
        ar = timed(lambda x=x: dist.all_reduce(x))
        ag = [timed(lambda c=c, x=x, n=n: c.all_gather(x, 0, [n] * K)) for c in (whole, pieces)]
        a2a = [timed(lambda c=c, p=parts, s=shapes: c.all_to_all(p, s)) for c in (whole, pieces)]
        if dist.get_rank() == 0:
            mb = n * 4 / 1e6
            rates = (
                2 * (K - 1) / K * mb / ar,
                *((K - 1) * mb / t for t in ag),
                *((K - 1) / K * mb / t for t in a2a),
            )
            print(f"| {mb:.1f} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
