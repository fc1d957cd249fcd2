"""The README's main job at an earlier revision and at this checkout, alternated, step time side by side.

    python bench/default_run_ab.py [--rev 39776f4] [--steps 400] [--rounds 3]

Three arms, each a ``torchrun --standalone --nproc_per_node=2 -m hybridpar.train logger=none`` run of
``--steps`` steps on the embedded data: the earlier revision with its defaults; this checkout with the
step the earlier defaults made (NCHW convolutions, dropout 0.5 — the recipe changed in between, the
step's arithmetic did not); this checkout with its own defaults. The default revision is the last one
before the pipelined trunk, the separate process groups and the deferred weight gradients landed, so
the second arm against the first is what they cost or save the default run. Each revision runs from a
``git archive`` of it (the conf/ folder linked where the package looks for it), arms alternate within
each round, and the medians of the rounds are printed and written to docs/benchmarks.md
(section ``default-run-ab``). The machine's cores are shared: nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from docs_section import write_section

REPO = Path(__file__).resolve().parent.parent
BASE = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridpar.train"]
OLD_STEP = ["trainer.channels_last=false", "model.dropout=0.5"]


def snapshot(rev: str, root: Path) -> Path:
    """The tree of ``rev`` under ``root/rev``, importable as ``hybridpar`` from there."""
    dest = root / rev.replace("/", "_")  # a branch such as origin/main
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # The configs ship as the package hybridpar.conf (pyproject's package-dir maps it to conf/);
    # from a plain tree on PYTHONPATH the package finds them only through this link.
    (dest / "hybridpar" / "conf").symlink_to(dest / "conf")
    return dest


def run(tree: Path, overrides: list[str], steps: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [*BASE, "logger=none", "trainer.progress=false", f"trainer.max_steps={steps}", f"output_root={out}"]
    proc = subprocess.run([*cmd, *overrides], cwd=tree, env=env, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="39776f4", help="the earlier revision (default: before the pipelined trunk)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True)
    head_rev = head.stdout.decode().strip()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        old, new = snapshot(args.rev, root), snapshot("HEAD", root)
        arms = [
            (f"{args.rev}, its defaults (NCHW, dropout 0.5)", old, []),
            (f"{head_rev}, the same step ({' '.join(OLD_STEP)})", new, OLD_STEP),
            (f"{head_rev}, its defaults", new, []),
        ]
        seen: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
        for r in range(args.rounds):
            for name, tree, overrides in arms:
                s = run(tree, overrides, args.steps, root / "runs")
                seen[name].append(s)
                print(
                    f"round {r + 1}: {name}: {s['step_s'] * 1e3:.1f} ms/step, {s['images_per_s']:.0f} images/s",
                    flush=True,
                )
    first = statistics.median(s["step_s"] for s in seen[arms[0][0]])
    lines = [
        f"{args.rounds} rounds of {args.steps} steps, arms alternating; medians (range).",
        "",
        "| run | step ms | images/s | step vs the earlier revision | MB sent/worker/step |",
        "|---|---|---|---|---|",
    ]
    for name, _, _ in arms:
        step = [s["step_s"] * 1e3 for s in seen[name]]
        ips = [s["images_per_s"] for s in seen[name]]
        mb = seen[name][0]["comm_bytes_per_step"] / 1e6
        lines.append(
            f"| {name} | {statistics.median(step):.1f} ({min(step):.1f}–{max(step):.1f}) | "
            f"{statistics.median(ips):.0f} ({min(ips):.0f}–{max(ips):.0f}) | "
            f"{statistics.median(step) / 1e3 / first:.2f}× | {mb:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_section("default-run-ab", text, "bench/default_run_ab.py")


if __name__ == "__main__":
    main()
