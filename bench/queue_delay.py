"""A tiny blocking collective's latency on an idle link and behind bulk traffic on another group.

Why the step's small agreements are issued early and waited for late (docs/design.md): on a shared
wire a 1-int all-gather queues behind the packets of a large all-reduce running on another process
group. Run under bench/twohost.sh (two workers):

    bench/twohost.sh 100mbit bench/queue_delay.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def tiny() -> float:
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    t0 = time.perf_counter()
    dist.all_gather(out, torch.zeros(1, dtype=torch.int64))
    return time.perf_counter() - t0


def main() -> None:
    dist.init_process_group("gloo")
    bulk_group = dist.new_group(list(range(dist.get_world_size())))
    bulk = torch.randn(2_500_000)  # 10 MB: 0.8 s at 100 Mbit/s
    for _ in range(3):
        tiny()
    idle = [tiny() for _ in range(10)]
    busy = []
    for _ in range(4):
        work = dist.all_reduce(bulk, group=bulk_group, async_op=True)
        time.sleep(0.15)  # the bulk sum under way
        busy += [tiny() for _ in range(3)]
        work.wait()
        dist.barrier()
    if dist.get_rank() == 0:
        print(
            f"1-int all-gather: idle link median {1e3 * statistics.median(idle):.1f} ms; behind a 10 MB all-reduce "
            f"median {1e3 * statistics.median(busy):.1f} ms, max {1e3 * max(busy):.1f} ms"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
