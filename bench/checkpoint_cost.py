"""What one checkpoint costs the training loop: blocking vs ``checkpoint.async=true``.

    torchrun --standalone --nproc_per_node=2 bench/checkpoint_cost.py [--batch 8] [--every 6] [--checkpoints 3] [--rounds 2]

The training app itself (``trainer.train``, the same code as ``python -m hybridpar.train``) on two
gloo workers: full AlexNet (``model=alexnet``: 224 px, 1000 classes; 61.1 M parameters, so with
momentum a checkpoint is ~0.5 GB, each worker writing its half), FakeData, ``--batch`` images per
worker, a checkpoint every ``--every`` steps (``--checkpoints`` of them, each followed by
``--every − 1`` steps without one; then the run's last step, checkpointed blocking in both modes
and not counted). Runs alternate blocking, async, blocking, async ... (``--rounds`` each), one
after another in the same two processes, each into a fresh checkpoint directory under ``--dir``
(``checkpoint.keep_last=1``; removed after the run).

The time of an iteration is measured on worker 0 from the end of one iteration's ``after_step``
(logging, evaluation, checkpoint) to the end of the next: the batch, the step, the vote, and any
checkpoint work (a blocking write, an async snapshot, a commit). Figures:

* **a step without checkpoint work** — the median over the iterations of both modes that are not
  a checkpoint step and (async) during which no write ran (step 1 left out): the baseline;
* **checkpoint step** — per mode, the median over the checkpoint steps;
* **cost at the step** — checkpoint step − baseline: what the issue asks, the step-time cost of
  one checkpoint;
* **cost over the interval** — per checkpoint, the sum over its step and the ``--every − 1`` steps
  after it of (iteration − baseline), median over the checkpoints: everything the checkpoint cost
  the run, the background writer's use of the cores and the commit included (an async write still
  running at the next checkpoint is waited for there, so its wait counts at that step);
* **steps while the write runs** — async: the median iteration between the checkpoint step and
  the commit (the writer thread shares the cores with training);
* **committed after** — how many steps after its own step the checkpoint was committed.

Rank 0 prints a markdown table and writes it into docs/benchmarks.md (``checkpoint_cost``
section; ``--no-docs`` prints only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import time
from importlib.resources import files
from pathlib import Path

import torch
from docs_section import write_section
from hydra import compose, initialize_config_dir

from hybridpar import checkpoint, config, runtime, trainer


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per worker")
    p.add_argument("--every", type=int, default=6, help="checkpoint.every_steps")
    p.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per mode (alternating)")
    p.add_argument("--dir", default="runs/checkpoint-cost", help="checkpoints and run directories (removed)")
    p.add_argument("--no-docs", action="store_true", help="print the table only")
    return p.parse_args()


class Clock:
    """Worker 0's iteration times and commit steps, from wrappers around the trainer's
    ``_Run.after_step`` and ``_Run.finish_checkpoint`` (nothing else of the loop is touched)."""

    def __init__(self):
        self.ends: list[tuple[int, float]] = []  # (step, end of its after_step)
        self.committed: dict[int, int] = {}  # checkpoint step -> the step during which it was committed
        self.current = 0
        after_step, finish = trainer._Run.after_step, trainer._Run.finish_checkpoint
        clock = self

        def timed_after_step(run, step, *args):
            clock.current = step
            after_step(run, step, *args)
            clock.ends.append((step, time.perf_counter()))

        def timed_finish(run):
            if run.writing is not None:
                clock.committed[run.writing.step] = clock.current
            finish(run)

        trainer._Run.after_step, trainer._Run.finish_checkpoint = timed_after_step, timed_finish

    def reset(self) -> None:
        self.ends, self.committed, self.current = [], {}, 0

    def iterations(self) -> dict[int, float]:
        return {s: t - self.ends[i - 1][1] for i, (s, t) in enumerate(self.ends) if i > 0}


def _total(args) -> int:
    return args.every * (args.checkpoints + 1)


def _config(args, mode: str, out: Path):
    total, K = _total(args), int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [
        "data=fake",  # model=alexnet, 224 px, 1000 classes
        f"data.batch_size={args.batch}",
        f"data.size={K * args.batch * (total + 1)}",  # one epoch: no end-of-epoch evaluation in the middle
        "data.val_size=16",
        "data.num_workers=0",
        "logger=none",
        "trainer.progress=false",
        f"trainer.max_steps={total}",
        f"trainer.log_every_steps={total}",
        f"checkpoint.every_steps={args.every}",
        "checkpoint.keep_last=1",
        "checkpoint.resume=none",
        f"checkpoint.dir={out / 'checkpoints'}",
        f"checkpoint.async={str(mode == 'async').lower()}",
    ]
    with initialize_config_dir(config_dir=str(files("hybridpar.conf")), version_base=None):
        return compose("train", overrides=overrides)


def _one_run(comm, device, args, mode: str, out: Path, clock: Clock) -> dict:
    clock.reset()
    out.mkdir(parents=True, exist_ok=True)
    trainer.train(comm, device, _config(args, mode, out), out)
    comm.gather_objects(None)  # every worker is done with the directory before worker 0 removes it
    size = 0
    if comm.rank == 0:
        meta = checkpoint.verify(checkpoint.checkpoints(out / "checkpoints")[-1], hashes=False)
        size = sum(f["bytes"] for f in meta["files"].values())
        shutil.rmtree(out, ignore_errors=True)
    return {"iterations": clock.iterations(), "committed": dict(clock.committed), "bytes": size}


def _busy(args, run: dict) -> set[int]:
    """Steps with checkpoint work: the checkpoint steps and, async, the steps up to and including
    the one whose after_step committed it (the writer thread was running during them)."""
    marks = _marks(args)
    return set(marks) | {s for c in marks for s in range(c + 1, run["committed"].get(c, c) + 1)}


def _marks(args) -> list[int]:
    return [args.every * (i + 1) for i in range(args.checkpoints)]


def _summary(args, runs: dict[str, list[dict]]) -> tuple[float, dict[str, dict]]:
    """The step without checkpoint work (median over both modes), and per mode the figures of the
    module's docstring."""
    marks, total = _marks(args), _total(args)
    step = statistics.median(
        t
        for rs in runs.values()
        for r in rs
        for s, t in r["iterations"].items()
        if s < total and s not in _busy(args, r)
    )
    out = {}
    for mode, rs in runs.items():
        at = [r["iterations"][c] for r in rs for c in marks]
        window = [sum(r["iterations"][s] - step for s in range(c, c + args.every)) for r in rs for c in marks]
        busy = [t for r in rs for s, t in r["iterations"].items() if s in _busy(args, r) and s not in marks]
        after = [r["committed"].get(c, c) - c for r in rs for c in marks]
        out[mode] = {
            "at": statistics.median(at),
            "window": statistics.median(window),
            "busy": statistics.median(busy) if busy else None,
            "after": (min(after), max(after)),
            "n": len(at),
            "mb": rs[0]["bytes"] / 1e6,
        }
    return step, out


def _table(args, step: float, results: dict[str, dict]) -> str:
    K = int(os.environ.get("WORLD_SIZE", "1"))
    b = results["blocking"]
    head = (
        f"{time.strftime('%Y-%m-%d')}: K = {K} gloo workers on {os.cpu_count()} cores ({platform.machine()}), "
        f"torch {torch.__version__}; full "
        f"AlexNet, FakeData 224 px, b = {args.batch} per worker; a checkpoint ({b['mb']:.0f} MB, local disk) every "
        f"{args.every} steps, {b['n']} per mode over {args.rounds} alternating run(s) each; worker 0's iterations. "
        f"A step without checkpoint work: **{step:.3f} s** (median, both modes).\n\n"
        "| checkpoint | checkpoint step (median) | cost at the step | cost over the interval "
        f"({args.every} steps) | steps while the write runs (median) | committed after |\n"
        "|---|---|---|---|---|---|\n"
    )
    rows = []
    for mode, r in results.items():
        lo, hi = r["after"]
        after = "at the step" if hi == 0 else f"{lo if lo == hi else f'{lo}–{hi}'} step{'s' if hi > 1 else ''}"
        busy = f"{r['busy']:.3f} s" if r["busy"] is not None else "–"
        rows.append(f"| {mode} | {r['at']:.3f} s | {r['at'] - step:+.3f} s | {r['window']:+.3f} s | {busy} | {after} |")
    return head + "\n".join(rows)


def main() -> None:
    args = _args()
    config.register()
    root = Path(args.dir).resolve()
    clock = Clock()

    def work(comm, device):
        runs: dict[str, list[dict]] = {"blocking": [], "async": []}
        for i in range(args.rounds):
            for mode, done in runs.items():
                done.append(_one_run(comm, device, args, mode, root / f"{mode}-{i}", clock))
                if comm.rank == 0:
                    it = done[-1]["iterations"]
                    print(
                        f"{mode} round {i + 1}: " + " ".join(f"{s}:{t:.2f}" for s, t in sorted(it.items())), flush=True
                    )
        return _summary(args, runs) if comm.rank == 0 else None

    results = runtime.run_workers(work, emulate=1, timeout_s=600)
    if results is not None:
        with contextlib.suppress(OSError):
            root.rmdir()  # empty by now (each run's directory is removed after it)
        text = _table(args, *results)
        print(text)
        if not args.no_docs:
            write_section("checkpoint_cost", text, "bench/checkpoint_cost.py")


if __name__ == "__main__":
    main()
