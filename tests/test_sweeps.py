"""Sweeps Hydra's way: each point of a ``hydra/launcher=submitit_*`` sweep one job of K worker tasks (here
``submitit_local``, the Slurm launcher's local twin), a process started by ``srun`` taking its worker
rank from Slurm's variables, and an Optuna sweep maximising held-out top-1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridpar import runtime
from tests.helpers import concurrently, run_cmd

TRAIN = [sys.executable, "-m", "hybridpar.train"]
SHORT = ["trainer.max_steps=3", "trainer.progress=false", "checkpoint.every_steps=null"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "HYBRIDPAR_FAULT"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _sweep(tmp_path: Path, *overrides: str) -> list[Path]:
    """Run ``hybridpar.train -m`` with ``overrides`` (short runs); its job directories, in job order."""
    proc = run_cmd(
        [*TRAIN, "-m", *overrides, *SHORT, f"output_root={tmp_path}/runs"], cwd=tmp_path, env=_env(), timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sweeps = list((tmp_path / "runs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    return sorted((p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


SWEEPS = {
    # Each point one submitit job of two worker tasks.
    "submitit": (
        "hydra_plugins.hydra_submitit_launcher",
        [
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=4",
            "optim.lr=0.01,0.02",
        ],
    ),
    # Three trials maximising held-out top-1.
    "optuna": (
        "hydra_plugins.hydra_optuna_sweeper",
        [
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.sampler.seed=0",
            "optim.lr=tag(log, interval(0.001, 0.1))",
            "optim.weight_decay=interval(0, 0.001)",
            "parallel.emulate=2",
            "logger=none",
        ],
    ),
}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, list[Path]]:
    """Each installed sweep's job directories. The sweeps are independent and nothing in them is
    timed: launched together."""
    import importlib.util

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    names = [name for name, (plugin, _) in SWEEPS.items() if installed(plugin)]
    dirs = {name: tmp_path_factory.mktemp(name) for name in names}
    jobs = concurrently(*(lambda name=name: _sweep(dirs[name], *SWEEPS[name][1]) for name in names))
    return dict(zip(names, jobs, strict=True))


@pytest.mark.timeout(300)
def test_a_submitit_sweep_runs_each_point_as_one_job_of_two_worker_tasks(sweeps):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[sweeps]'")
    jobs = sweeps["submitit"]
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, (0.01, 0.02), strict=True):
        summary = json.loads((job / "summary.json").read_text())
        # Two processes, one worker each, over torch.distributed: not two workers emulated in one process.
        assert summary["world_size"] == 2 and not summary["emulated"] and summary["steps"] == 3
        assert yaml.safe_load((job / "config.yaml").read_text())["optim"]["lr"] == lr
        # Grouped in W&B by the sweep: the offline run of each point carries the sweep's name as its group.
        (offline,) = (job / "wandb").glob("offline-run-*")
        assert jobs[0].parent.name.encode() in next(offline.glob("run-*.wandb")).read_bytes()


def test_slurm_variables_become_torch_distributed_ones(monkeypatch):
    # A private copy of the environment: everything the call sets is gone after the test.
    torch_keys = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in torch_keys})
    slurm = {
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4321",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    os.environ.update(slurm)
    assert runtime.adopt_scheduler_env() == "slurm"
    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert got == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07"}
    assert os.environ["MASTER_PORT"] == str(20000 + 4321)
    assert runtime.adopt_scheduler_env() is None  # now torch's variables are set: nothing more to adopt


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("gpu[03-05,07],cpu1", "gpu03"), ("a1,b[2-3]", "a1"), ("rack2-n[011,013]", "rack2-n011")],
)
def test_the_first_host_of_a_slurm_node_list(nodelist, first):
    assert runtime._first_host(nodelist) == first


@pytest.mark.timeout(240)
def test_two_processes_started_as_srun_starts_them_train_as_two_workers(tmp_path):
    """What ``srun --ntasks=2 python -m hybridpar.train`` gives each process: Slurm's variables, no torchrun."""
    with socket.socket() as s:  # a free port for this job's store (a batch script may export one)
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    base = {
        **_env(),
        "MASTER_PORT": str(port),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "77",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "localhost",
    }
    cmd = [*TRAIN, *SHORT, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=200)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and not summary["emulated"] and summary["steps"] == 3


@pytest.mark.timeout(300)
def test_an_optuna_sweep_of_three_trials_maximises_held_out_top1(sweeps):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweeps]'")
    jobs = sweeps["optuna"]
    assert [p.name for p in jobs] == ["0", "1", "2"]
    trials = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        optim = yaml.safe_load((job / "config.yaml").read_text())["optim"]
        assert 0.001 <= optim["lr"] <= 0.1 and 0 <= optim["weight_decay"] <= 0.001
        trials.append((summary["val_top1"], optim["lr"], optim["weight_decay"]))
    assert len({t[1] for t in trials}) == 3  # three different points were tried
    result = yaml.safe_load((jobs[0].parent / "optimization_results.yaml").read_text())
    best = max(trials)
    assert result["best_value"] == pytest.approx(best[0])
    assert result["best_params"]["optim.lr"] == pytest.approx(best[1])
