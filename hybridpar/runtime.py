"""Where and how the workers run: torchrun processes or K emulated workers in one process.

Chooses the device and backend (CUDA + NCCL when GPUs are visible, else CPU + gloo), sets the
threads per worker, starts the process group with a timeout, and runs one per-worker function
the same way in both modes.
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybridpar.comm import Communicator, DistCommunicator, run_emulated
from hybridpar.comm.peerwatch import PeerWatch
from hybridpar.comm.torchdist import MOVE_PIECE_BYTES
from hybridpar.errors import HybridparError


class LaunchError(HybridparError):
    """The launch itself is inconsistent (e.g. emulation requested under torchrun)."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def adopt_scheduler_env() -> str | None:
    """Under a scheduler that starts one process per worker itself (Slurm's ``srun``, or submitit, which
    Hydra's submitit launcher uses), set the variables torch's ``env://`` reads — ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` — from the scheduler's, so the run
    starts as it does under torchrun. Returns which scheduler was adopted (None: torchrun or none)."""
    if under_torchrun():
        return None
    if os.environ.get("SUBMITIT_EXECUTOR"):  # submitit sets it in every task it starts, Slurm or local
        import submitit

        # CUDA_VISIBLE_DEVICES left as it is: run_workers picks cuda:LOCAL_RANK among all visible GPUs.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return "submitit"
    env = os.environ
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # a task of an srun job step
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        env.update(
            RANK=env["SLURM_PROCID"],
            WORLD_SIZE=env["SLURM_NTASKS"],
            LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
            LOCAL_WORLD_SIZE=per_node.split("(")[0].split(",")[0],
        )
        # A batch script may export its own; otherwise the job's first host, and one port per job, the same
        # in every task, so that two jobs sharing a node do not collide.
        env.setdefault("MASTER_ADDR", _first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    return None


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    prefix, first_index = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist).groups()
    return prefix + (first_index or "")


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_launch(emulate: int) -> None:
    if not isinstance(emulate, int) or emulate < 1:
        raise LaunchError(f"parallel.emulate must be a positive integer, got {emulate!r}")
    if under_torchrun() and emulate != 1:
        raise LaunchError(
            f"parallel.emulate={emulate} runs {emulate} workers inside one process; under torchrun "
            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')}) each process is already one worker: drop parallel.emulate"
        )


def _threads_per_worker(workers_on_this_host: int) -> int:
    explicit = os.environ.get("OMP_NUM_THREADS")
    # torchrun sets OMP_NUM_THREADS=1 when the user did not; with few workers on a CPU host,
    # give each its share of the cores instead.
    if explicit and explicit != "1":
        return int(explicit)
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_this_host))


ATTEMPT_STORE_KEY = "hybridpar/attempt_store"


def _attempt_store(timeout_s: float) -> tuple[dist.Store, dist.Store]:
    """A store only this attempt's workers use: worker 0 starts a fresh one and announces its
    address in torchrun's store, the others connect to what is announced.

    After a restart (``--max-restarts``) torchrun hands the workers the agents' store again, which
    still holds the dead attempt's process-group keys; a per-attempt prefix would need a name
    every worker of the attempt agrees on, and nothing torchrun gives them is one — each agent
    counts its own restarts (a node restarted because another failed keeps its count), so the
    nodes' prefixes differed and the new group never formed. A store started by this attempt's
    worker 0 holds nothing old; an announcement left by an earlier attempt names a store whose
    process is gone: connecting fails fast, and the worker reads the announcement again."""
    base, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    timeout = timedelta(seconds=timeout_s)
    addr = os.environ.get("MASTER_ADDR", "localhost")
    if int(os.environ["RANK"]) == 0:
        store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        base.set(ATTEMPT_STORE_KEY, f"{addr}:{store.port}")
        return store, base
    deadline = time.monotonic() + timeout_s
    while True:
        host, _, port = base.get(ATTEMPT_STORE_KEY).decode().rpartition(":")
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
        except (RuntimeError, ValueError):  # DistNetworkError / DistStoreError: an earlier attempt's
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        store.set_timeout(timeout)
        return store, base


def end_process_groups() -> None:
    """Destroy every process group and join gloo's threads now, while the interpreter is whole.

    ``destroy_process_group`` joins a group's threads only if nothing else still references it;
    a model's hooks hold its communicator, which holds its groups, in reference cycles that only
    the garbage collector frees — at random, or during interpreter shutdown. There the group's
    destructor joins a gloo thread that may still be dropping a finished collective's tensors,
    which needs the GIL the finalizing interpreter no longer gives: the thread is made to exit
    inside a destructor and the process aborts ("terminate called without an active
    exception", about 1 spawned process in 50). Collecting the cycles first lets the groups die
    here; the caller drops its own references to them before."""
    gc.collect()
    time.sleep(0.01)  # let gloo's threads finish dropping the last collectives (they need the GIL)
    dist.destroy_process_group()


def run_workers(
    fn: Callable[[Communicator, torch.device], Any],
    *,
    emulate: int,
    timeout_s: float,
    peer_timeout_s: float | None = None,
    move_piece_mb: float | None = MOVE_PIECE_BYTES / 2**20,
) -> Any:
    """Run ``fn(comm, device)`` on every worker; return this process's result (rank 0's when emulated).

    Under torchrun with ``peer_timeout_s``, a peer that goes silent (host frozen, link down) ends
    this process within that time (comm/peerwatch.py) instead of after ``timeout_s``."""
    check_launch(emulate)
    if under_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            # CUDA tensors over NCCL; the small control messages (non-finite vote, metrics), CPU
            # tensors, over gloo: NCCL alone cannot move a CPU tensor.
            backend = "cpu:gloo,cuda:nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
            torch.set_num_threads(_threads_per_worker(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        # Both stores live as long as the group: without torchrun's agent (plain env://) worker 0
        # serves the base store itself, and dropping it would leave a slower peer that has not
        # yet read the announcement waiting on a dead server.
        store, base_store = _attempt_store(timeout_s)
        dist.init_process_group(
            backend,
            store=store,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(seconds=timeout_s),
        )
        piece = int(move_piece_mb * 2**20) if move_piece_mb else None
        comm, watch = DistCommunicator(piece_bytes=piece), None
        if peer_timeout_s and comm.world_size > 1:
            watch = PeerWatch(
                store.host, store.port, comm.rank, comm.world_size, peer_timeout_s, lambda: comm.ledger.waiting
            ).start()
        try:
            result = fn(comm, device)
            dist.barrier()
        finally:
            if watch is not None:
                watch.stop()
            del comm, watch
            end_process_groups()
            del base_store
        return result
    # Emulated workers share this process's cores and its intra-op thread pool; one GPU would
    # serialise them anyway, so emulation runs on the CPU (K = 1 may use a GPU).
    device = torch.device("cuda", 0) if emulate == 1 and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(_threads_per_worker(1))
    return run_emulated(emulate, fn, device, timeout_s=timeout_s)[0]
