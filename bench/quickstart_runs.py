"""The README's main job three ways on the embedded data: torchrun scheme (a), torchrun DDP, and
two emulated workers in one process. Prints a markdown table of held-out accuracy and wall time.

    python bench/quickstart_runs.py [extra hydra overrides]

Runs one after another (never side by side: the machine's cores are shared), logger off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = [
    (
        "torchrun --nproc_per_node=2, scheme a",
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridpar.train"],
    ),
    (
        "torchrun --nproc_per_node=2, parallel.scheme=ddp",
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "hybridpar.train",
            "parallel.scheme=ddp",
        ],
    ),
    ("python, parallel.emulate=2 (scheme a)", [sys.executable, "-m", "hybridpar.train", "parallel.emulate=2"]),
]


def main() -> None:
    extra = sys.argv[1:]
    print("| run | held-out top-1 | top-5 | train loss | steps | images/s | MB sent/worker/step | wall s (command) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cmd in RUNS:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*cmd, "logger=none", "trainer.progress=false", *extra], check=False, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
        s = json.loads((run_dir / "summary.json").read_text())
        print(
            f"| {name} | {s['val_top1']:.4f} | {s['val_top5']:.4f} | {s['train_loss']:.4f} | {s['steps']} | "
            f"{s['images_per_s']:.0f} | {s['comm_bytes_per_step'] / 1e6:.3f} | {wall:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
