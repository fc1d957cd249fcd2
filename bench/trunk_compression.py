"""The README's main job with the trunk's gradient sums exact and compressed, side by side:
held-out top-1 on the embedded data (issue: at the bound, item 4).

    python bench/trunk_compression.py [extra hydra overrides]

Two emulated workers (the same arithmetic as two torchrun processes, in one process), the
default recipe, one run after another; writes the ``trunkcomp`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from docs_section import write_section

RUNS = [
    ("fp32, bucketed (default)", []),
    ("fp32, pipelined", ["parallel.trunk_sync=pipelined"]),
    ("bf16 sums, bucketed", ["parallel.trunk_comm_dtype=bf16"]),
    ("bf16 sums, pipelined", ["parallel.trunk_sync=pipelined", "parallel.trunk_comm_dtype=bf16"]),
    (
        "bf16 sums and bf16 activations, pipelined",
        ["parallel.trunk_sync=pipelined", "parallel.trunk_comm_dtype=bf16", "parallel.comm_dtype=bf16"],
    ),
    ("PowerSGD rank 4, bucketed", ["parallel.trunk_powersgd_rank=4"]),
    ("PowerSGD rank 1, bucketed", ["parallel.trunk_powersgd_rank=1"]),
]


def main() -> None:
    extra = sys.argv[1:]
    rows = [
        "| trunk sums | held-out top-1 | vs fp32 (points) | top-5 | train loss | MB sent/worker/step | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    base = None
    for name, overrides in RUNS:
        cmd = [sys.executable, "-m", "hybridpar.train", "parallel.emulate=2", "logger=none", "trainer.progress=false"]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, *overrides, *extra], check=False, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
        s = json.loads((run_dir / "summary.json").read_text())
        base = s["val_top1"] if base is None else base
        rows.append(
            f"| {name} | {s['val_top1']:.4f} | {100 * (s['val_top1'] - base):+.2f} | {s['val_top5']:.4f} | "
            f"{s['train_loss']:.4f} | {s['comm_bytes_per_step'] / 1e6:.3f} | {wall:.0f} |"
        )
        print(rows[-1], flush=True)
    write_section("trunkcomp", "\n".join(rows), "bench/trunk_compression.py")


if __name__ == "__main__":
    main()
