"""Do spawned gloo workers exit cleanly? Run N two-process groups one after another (each: a
hybrid step of verify.hybrid_worker, a barrier, the groups ended, a normal interpreter exit) and
count the processes that die at exit.

    python bench/exit_check.py --runs 200            # hybridpar's end: runtime.end_process_groups
    python bench/exit_check.py --runs 200 --torch    # torch's destroy_process_group alone

With ``--torch`` about one process in 50 aborted at interpreter shutdown ("terminate called
without an active exception"): a reference cycle kept the groups alive past
destroy_process_group, and the garbage collector freed them while the interpreter finalized,
joining a gloo thread that still needed the GIL (tests/test_exit.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store: str, torch_only: bool) -> None:
    import torch.distributed as dist

    from hybridpar.comm import DistCommunicator
    from hybridpar.runtime import end_process_groups
    from hybridpar.verify import Case, hybrid_worker

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    hybrid_worker(DistCommunicator(), Case(world_size, local_batch=4))
    dist.barrier()
    if torch_only:
        dist.destroy_process_group()
    else:
        end_process_groups()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--torch", action="store_true", help="end with torch's destroy_process_group alone")
    args = p.parse_args()
    failed = 0
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = mp.start_processes(
                _worker, args=(2, os.path.join(tmp, "store"), args.torch), nprocs=2, join=False, start_method="spawn"
            )
            try:
                while not ctx.join(timeout=120):
                    pass
            except mp.ProcessRaisedException as exc:
                raise SystemExit(f"run {i}: a worker failed before exiting: {exc}") from exc
            except mp.ProcessExitedException as exc:
                failed += 1
                print(f"run {i}: {str(exc).splitlines()[0]}", flush=True)
    print(f"{failed} of {args.runs} runs had a process die at exit ({2 * args.runs} processes)", flush=True)


if __name__ == "__main__":
    main()
