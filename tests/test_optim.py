"""The schedules do what the config says: plateau drops ≤ 3 times, warm-up, step, cosine."""

import itertools

import pytest
import torch

from hybridpar.errors import ConfigError
from hybridpar.optim import Schedule, learning_rates, sgd

BASE = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "plateau",
    "warmup_steps": 0,
    "plateau": {"metric": "loss", "factor": 0.1, "patience": 0, "max_drops": 3},
    "step": {"every_epochs": 2, "gamma": 0.1},
}


def _opt(cfg):
    w, v = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return sgd([{"name": "conv", "params": [w]}, {"name": "fc", "params": [v]}], cfg)


def test_plateau_divides_by_ten_at_most_three_times():
    opt = _opt(BASE)
    sched = Schedule(opt, BASE, steps_per_epoch=10, total_steps=100)
    seen = []
    for loss in [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0]:
        sched.after_eval({"val_loss": loss, "val_top1": 0.5})
        seen.append(learning_rates(opt)["conv"])
    assert seen[:2] == [0.01, 0.01]
    assert seen[2:5] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert seen[5:] == pytest.approx([1e-5] * 3)  # no fourth drop
    assert learning_rates(opt)["fc"] == pytest.approx(1e-5)


def test_plateau_on_top1_error():
    cfg = {**BASE, "plateau": {**BASE["plateau"], "metric": "top1_error"}}
    opt = _opt(cfg)
    sched = Schedule(opt, cfg, 10, 100)
    sched.after_eval({"val_loss": 9.0, "val_top1": 0.5})
    sched.after_eval({"val_loss": 1.0, "val_top1": 0.4})  # loss better, accuracy worse: drop
    assert learning_rates(opt)["conv"] == pytest.approx(1e-3)


def test_warmup_then_cosine_and_step():
    cfg = {**BASE, "schedule": "cosine", "warmup_steps": 4}
    opt = _opt(cfg)
    sched = Schedule(opt, cfg, steps_per_epoch=10, total_steps=24)
    lrs = [learning_rates(opt)["conv"]]
    for _ in range(24):
        opt.step()
        sched.after_step()
        lrs.append(learning_rates(opt)["conv"])
    # torch LinearLR: lr/warmup at the start, then linearly up to lr after `warmup` steps.
    assert lrs[:5] == pytest.approx([0.0025, 0.004375, 0.00625, 0.008125, 0.01])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))

    cfg = {**BASE, "schedule": "step"}
    opt = _opt(cfg)
    sched = Schedule(opt, cfg, steps_per_epoch=5, total_steps=30)
    for _ in range(10):
        opt.step()
        sched.after_step()
    assert learning_rates(opt)["conv"] == pytest.approx(1e-3)  # after 2 epochs


def test_bad_schedule_values():
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        Schedule(_opt(BASE), {**BASE, "schedule": "linear"}, 10, 100)
    with pytest.raises(ConfigError, match="optim.lr must be positive"):
        _opt({**BASE, "lr": 0})
