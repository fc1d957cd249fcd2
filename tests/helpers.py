"""Shared test helpers: run a function on K real gloo processes, with a hard timeout."""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60  # a collective that waits longer fails instead of hanging
JOIN_TIMEOUT_S = 180  # the whole group is killed after this

# Workers are forked from a server process that imported torch and hybridpar once (multiprocessing's
# forkserver, started by the first call and kept for the session): each is a fresh process, as a
# spawned one is, without importing torch again (2-3 s a process on two cores, dozens of launches).
START_METHOD = "forkserver"
multiprocessing.set_forkserver_preload(
    ["torch", "torchvision", "hybridpar.comm", "hybridpar.parallel", "hybridpar.verify"]
)


def start_workers(fn, args, nprocs: int, directory: str):
    """``torch.multiprocessing.start_processes(fn, args, nprocs)`` from the fork server, not joined.
    ``fn(rank, *args)`` runs with the caller's environment as it is now (the server's is that of the
    first call). The arguments travel pickled by value, in a file in ``directory`` that every worker
    reads: a fork server passes a shared tensor as a file descriptor, and a model has more tensors
    than one message carries (256)."""
    payload = os.path.join(directory, "arguments.pkl")
    with open(payload, "wb") as f:
        pickle.dump((dict(os.environ), fn, args), f, protocol=pickle.HIGHEST_PROTOCOL)
    return mp.start_processes(_unpacked, args=(payload,), nprocs=nprocs, join=False, start_method=START_METHOD)


def _unpacked(rank: int, payload: str) -> None:
    with open(payload, "rb") as f:
        environ, fn, args = pickle.load(f)
    os.environ.clear()
    os.environ.update(environ)
    fn(rank, *args)


def _entry(rank: int, world_size: int, store: str, out_dir: str, fn, args) -> None:
    import torch.distributed as dist

    from hybridpar.comm import DistCommunicator
    from hybridpar.runtime import end_process_groups

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        result = ("ok", fn(DistCommunicator(), *args))
    except BaseException as exc:  # noqa: BLE001 - shipped to the parent
        result = ("error", (type(exc).__name__, str(exc), traceback.format_exc()))
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)  # 4x faster than the default for tensors
    dist.barrier()  # no rank tears its connections down while a peer still uses them
    end_process_groups()  # gloo's threads joined now, not during interpreter shutdown


def run_gloo(world_size: int, fn, *args, timeout_s: float = JOIN_TIMEOUT_S) -> list[tuple[str, object]]:
    """Run ``fn(DistCommunicator(), *args)`` on ``world_size`` fresh gloo processes.

    Returns ``[("ok", result) | ("error", (type name, message, traceback))]`` in rank order.
    Processes still alive after ``timeout_s`` are killed and the call fails: no hang.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = start_workers(_entry, (world_size, store, tmp, fn, args), world_size, tmp)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"gloo workers did not finish within {timeout_s:.0f} s")
        out = []
        for r in range(world_size):
            with open(os.path.join(tmp, f"{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out


def results(outcomes: list[tuple[str, object]]) -> list:
    """The results of a run in which every worker must have succeeded."""
    for r, (status, value) in enumerate(outcomes):
        if status != "ok":
            raise AssertionError(f"worker {r} failed: {value[2]}")
    return [v for _, v in outcomes]


def run_cmd(cmd, *, cwd=None, env=None, timeout: float = 240):
    """``subprocess.run`` for commands that start their own workers (torchrun, emulated training):
    on a timeout the whole process group is killed, so no worker outlives the test."""
    import signal
    import subprocess

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def in_background(call):
    """``call()`` started in a thread of its own, for an independent command (``run_cmd``) that can
    run while the caller starts another; its future's ``result()`` waits for it and returns (or
    raises) what it did. Nothing run this way may be timed."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def concurrently(*calls):
    """``[call() for call in calls]``, each call in a thread of its own (``in_background``): the
    interpreters of independent commands start on both cores at once instead of one after the
    other. Every call is waited for; then the first error is raised."""
    from concurrent.futures import wait

    futures = [in_background(call) for call in calls]
    wait(futures)
    return [f.result() for f in futures]


def cli_in_process(tmp_path, argv: list[str], monkeypatch) -> int | str | None:
    """Run ``hybridpar.train.cli`` with ``argv`` here; its exit code. Hydra's global state and the
    root and 'hybridpar' loggers the run configures are put back afterwards."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from hybridpar import train

    # Hydra's job logging configures the root logger (a console handler on this test's captured
    # stdout, closed with the test), the run the 'hybridpar' one: both are put back.
    loggers = [logging.getLogger("hybridpar"), logging.getLogger()]
    saved = [(list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hybridpar.train", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        with pytest.raises(SystemExit) as info:
            train.cli()
    finally:
        GlobalHydra.instance().clear()
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
    return info.value.code


def compose_train(*overrides: str):
    """``conf/train.yaml`` composed with ``overrides``, as the command line composes it (the typed
    schema registered)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from hybridpar import config

    config.register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        return compose("train", overrides=list(overrides))


def train_here(run_dir, *overrides: str, K: int = 2, timeout_s: float = 120) -> dict:
    """The training app's run (logger off, no progress bar) on K emulated workers in this process,
    without an interpreter to start or the command line around it; rank 0's summary."""
    from pathlib import Path

    from hybridpar import trainer
    from hybridpar.comm import run_emulated

    cfg = compose_train("logger=none", "trainer.progress=false", *overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # emulated workers save the process's global stream: the same one for every run
    return run_emulated(
        K, lambda comm: trainer.train(comm, torch.device("cpu"), cfg, Path(run_dir)), timeout_s=timeout_s
    )[0]


@functools.cache
def _built(factory, seed: int):
    from hybridpar.models import build_seeded

    return build_seeded(factory, seed)


def seeded_model(factory, seed: int = 0):
    """``build_seeded(factory, seed)``: built once per factory and seed, then copied (the same bits).
    A small VGG's construction initialises torchvision's full-size head (~120M weights) before the
    small one replaces it, ~1 s a build, and the tests build the same one dozens of times. The copy
    is made under the lock of model construction: emulated workers call this from their threads."""
    import copy

    from hybridpar.models.seeded import MODEL_LOCK

    with MODEL_LOCK:
        return copy.deepcopy(_built(factory, seed))
