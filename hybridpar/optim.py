"""The paper's optimiser and learning-rate schedules.

SGD with momentum 0.9 and weight decay 5e-4; the AlexNet recipe divides the rate by 10 when the
held-out error stops improving, at most three times. ``step`` and ``cosine`` are the other
common schedules; any of them may start with a linear warm-up. All are torch's own schedulers;
:class:`Schedule` only decides when each one is stepped (per step, or per evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler

from hybridpar.errors import ConfigError

SCHEDULES = ("plateau", "step", "cosine", "constant")


def sgd(groups: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]) -> torch.optim.SGD:
    """``groups``: ``[{"name": ..., "params": [...], "lr": optional}, ...]``; default rate ``cfg.lr``."""
    if not cfg["lr"] > 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg['lr']}")
    return torch.optim.SGD(
        [dict(g) for g in groups], lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )


class Schedule:
    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], steps_per_epoch: int, total_steps: int
    ):
        kind = cfg["schedule"]
        if kind not in SCHEDULES:
            raise ConfigError(f"optim.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
        self.kind = kind
        warmup = int(cfg.get("warmup_steps") or 0)
        if warmup < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {warmup}")
        per_step: list[lr_scheduler.LRScheduler] = []
        if warmup:
            per_step.append(lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup))
        main: lr_scheduler.LRScheduler | None = None
        if kind == "cosine":
            main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
        elif kind == "step":
            every = int(cfg["step"]["every_epochs"]) * steps_per_epoch
            main = lr_scheduler.StepLR(optimizer, step_size=max(1, every), gamma=cfg["step"]["gamma"])
        if main is not None:
            per_step.append(main)
        if len(per_step) == 2:
            self.per_step: lr_scheduler.LRScheduler | None = lr_scheduler.SequentialLR(
                optimizer, per_step, milestones=[warmup]
            )
        else:
            self.per_step = per_step[0] if per_step else None
        self.warmup = warmup
        self.plateau = None
        self.metric = cfg["plateau"].get("metric", "loss")
        if self.metric not in ("loss", "top1_error"):
            raise ConfigError(f"optim.plateau.metric={self.metric!r} is not one of loss, top1_error")
        if kind == "plateau":
            p = cfg["plateau"]
            # Capping the rate at base·factor^max_drops stops it after max_drops divisions.
            floor = [g["lr"] * p["factor"] ** p["max_drops"] for g in optimizer.param_groups]
            self.plateau = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=p["factor"], patience=p["patience"], min_lr=floor
            )
        self._steps = 0

    def after_step(self) -> None:
        self._steps += 1
        if self.per_step is not None and (self.kind != "plateau" or self._steps <= self.warmup):
            self.per_step.step()

    def state_dict(self) -> dict[str, Any]:
        """Everything the schedule needs to continue where it stood (for checkpoints)."""
        return {
            "steps": self._steps,
            "per_step": self.per_step.state_dict() if self.per_step is not None else None,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
        if self.per_step is not None and state.get("per_step") is not None:
            self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])

    def after_eval(self, val: Mapping[str, float]) -> None:
        """Called after each held-out evaluation (``val_loss``, ``val_top1``); plateau schedule only."""
        if self.plateau is not None and self._steps >= self.warmup:
            self.plateau.step(val["val_loss"] if self.metric == "loss" else 1.0 - val["val_top1"])


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
