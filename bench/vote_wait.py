"""The training app's wait for its per-step vote, on every worker.

The trainer reads the step's vote (every loss finite? a stop requested? the checkpoint written?) in
``_Run.update_allowed``; this script runs the training app with that call timed and prints, per
worker, the median and largest wait over the steps after the first four. Run under torchrun, e.g.
over a slow link (bench/twohost.sh) with the pipelined trunk, whose sums are still in flight when
the step ends:

    bench/twohost.sh 100mbit bench/vote_wait.py data=synthetic data.batch_size=16 data.size=512 \\
        data.val_size=32 parallel.trunk_sync=pipelined trainer.max_steps=16 trainer.progress=false \\
        logger=none checkpoint.every_steps=null

Every argument is the training app's (Hydra overrides).
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import time

from hybridpar import train, trainer

SKIP = 4  # the first steps set up the pipelined trunk's caps and warm the allocator


def main() -> None:
    waits: list[float] = []
    read = trainer._Run.update_allowed

    def timed(self, loss, step, epoch):
        t0 = time.perf_counter()
        try:
            return read(self, loss, step, epoch)
        finally:
            waits.append(time.perf_counter() - t0)

    def report() -> None:
        w = waits[SKIP:]
        if w:
            rank = os.environ.get("RANK", "0")
            print(
                f"worker {rank}: vote wait median {statistics.median(w) * 1e3:.1f} ms, "
                f"max {max(w) * 1e3:.1f} ms over {len(w)} steps",
                file=sys.stderr,
                flush=True,
            )

    trainer._Run.update_allowed = timed
    atexit.register(report)
    train.cli()


if __name__ == "__main__":
    main()
