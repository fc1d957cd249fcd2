"""What a run writes while it trains: the metrics file, the W&B run, the progress bar.

Only worker 0 writes; the others hold an :class:`Outputs` that does nothing, so the loop calls
it the same way on every worker.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf


@dataclass
class Meter:
    """Per-step timings and bytes of this worker (medians go into the summary), and the training
    loss since the last log line (this worker's share of each step's global-batch mean).

    ``data_s`` is the time the loop waited for each batch, apart from the step: a loader that cannot keep
    up shows there, and in the end-to-end ``images_per_s``, instead of hiding behind the step's speed."""

    step_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    comm_s: list[float] = field(default_factory=list)
    comm_bytes: list[int] = field(default_factory=list)
    train_s: float = 0.0
    images: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    warned: bool = False

    def add(self, seconds: float, data_s: float, comm_s: float, comm_bytes: int, images: int, loss: float) -> None:
        self.step_s.append(seconds)
        self.data_s.append(data_s)
        self.comm_s.append(comm_s)
        self.comm_bytes.append(comm_bytes)
        self.train_s += seconds
        self.images += images
        if math.isfinite(loss):  # a skipped non-finite step adds no loss
            self.loss_sum += loss
            self.loss_n += 1

    def median(self, name: str) -> float:
        xs = getattr(self, name)
        return float(statistics.median(xs)) if xs else 0.0

    def last_step(self, images: int) -> dict[str, float]:
        dt, comm = self.step_s[-1], self.comm_s[-1]
        return {
            "perf/step_s": dt,
            "perf/data_s": self.data_s[-1],
            "perf/comm_s": comm,
            "perf/compute_s": max(0.0, dt - comm),
            "perf/images_per_s": images / (dt + self.data_s[-1]),
            "perf/step_images_per_s": images / dt,
            "perf/comm_bytes": self.comm_bytes[-1],
        }

    def data_bound(self, window: int) -> tuple[float, float] | None:
        """``(data wait, step)`` medians over the last ``window`` steps when the wait exceeds 10% of the
        step, the first time only (one warning per run); the first step, which starts the loader, is left out."""
        if self.warned:
            return None
        waits, steps = self.data_s[1:][-window:], self.step_s[1:][-window:]
        if not waits:
            return None
        wait, step = statistics.median(waits), statistics.median(steps)
        if wait <= 0.1 * step:
            return None
        self.warned = True
        return wait, step


class Outputs:
    """metrics.jsonl, the W&B run (offline unless WANDB_MODE says otherwise) and the progress bar,
    on worker 0; a context manager that closes them whatever happens."""

    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int, rank: int):
        self.active = rank == 0
        self.wandb = _wandb_run(cfg, run_dir) if self.active else None
        self.bar = _progress(cfg, total_steps) if self.active else None
        self.metrics = (run_dir / "metrics.jsonl").open("a") if self.active else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def emit(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def stepped(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
            self.wandb.finish()


def _wandb_run(cfg: DictConfig, run_dir: Path):
    if cfg.logger.name != "wandb":
        return None
    import wandb

    from hybridpar.rundir import sweep_group

    return wandb.init(
        project=cfg.logger.project,
        dir=str(run_dir),
        mode=cfg.logger.mode,
        name=run_dir.name,
        group=sweep_group(run_dir),
        job_type=f"scheme-{cfg.parallel.scheme}",
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _progress(cfg: DictConfig, total: int):
    if not cfg.trainer.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, leave=False)
