"""checkpoint.async: the state copied to host memory at the step and written by a background
thread while training goes on. Its checkpoints are the blocking path's, byte for byte, and a run
resumed from one is bit-identical; steps go on while a (slow) write runs, at most one write is in
flight and nothing is committed before every worker's file is done; a worker killed mid-write
leaves the previous checkpoint valid and the run resumes; a failed background write is one line,
exit 2, the previous checkpoint intact; and the same on two gloo processes under torchrun.

Most runs are in-process (two emulated workers, ``trainer.train``), so a test can slow or break
the writer by monkeypatching it; the kill and the one-line error need a process of their own: this
module run as ``python -m tests.test_checkpoint_async MODE ...`` (:func:`_child`) is the training
app with one such fault.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hybridpar import checkpoint, trainer
from hybridpar.comm import run_emulated
from hybridpar.preemption import Preempted, StopRequest
from tests.helpers import compose_train, run_cmd, train_here

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
QUIET = ["logger=none", "trainer.progress=false"]
RUN = ["trainer.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=null"]
ASYNC = [*RUN, "checkpoint.async=true"]


def _cfg(*overrides: str):
    return compose_train(*QUIET, *overrides)


def _train_here(run_dir: Path, *overrides: str) -> dict:
    """Two emulated workers in this process (so a test can monkeypatch the writer); rank 0's summary."""
    return train_here(run_dir, *overrides, timeout_s=60)


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name[5:]) for p in checkpoint.checkpoints(run_dir / "checkpoints")]


def _same_checkpoints(a: Path, b: Path) -> None:
    """Every checkpoint under ``a`` and ``b``: the same steps and, file by file, the same bytes
    (sizes and SHA-256 in meta.json, every file verified against them)."""
    ca, cb = checkpoint.checkpoints(a / "checkpoints"), checkpoint.checkpoints(b / "checkpoints")
    assert [p.name for p in ca] == [p.name for p in cb]
    for pa, pb in zip(ca, cb):
        ma, mb = checkpoint.verify(pa), checkpoint.verify(pb)
        for key in ma.keys() - {"written", "config"}:  # the config differs in checkpoint.async only
            assert ma[key] == mb[key], (pa.name, key)


@pytest.mark.timeout(120)
def test_async_checkpoints_are_the_blocking_ones_and_resume_bit_identical(tmp_path, monkeypatch):
    """The same files, byte for byte, although each background write only runs once the next step
    has updated the weights in place (the snapshot, not the live tensors, is written); a run resumed
    from an async checkpoint ends with the uninterrupted run's bytes."""
    _train_here(tmp_path / "blocking", *RUN)
    stepped = {0: 0, 1: 0}  # each worker's last step whose update is done
    original_write, original_after = checkpoint._write_worker_file, trainer._Run.after_step

    def late_write(payload, tmp, rank):
        step, deadline = int(tmp.name[6:14]), time.monotonic() + 10
        while step < 8 and stepped[rank] <= step:  # the last one is written at once: nothing comes after it
            assert time.monotonic() < deadline, f"worker {rank}: no step after {step}"
            time.sleep(0.005)
        return original_write(payload, tmp, rank)

    def after_step(self, step, *args):  # the optimizer has updated the weights in place
        stepped[self.comm.rank] = step
        return original_after(self, step, *args)

    monkeypatch.setattr(checkpoint, "_write_worker_file", late_write)
    monkeypatch.setattr(trainer._Run, "after_step", after_step)
    _train_here(tmp_path / "async", *ASYNC)
    monkeypatch.undo()
    assert _steps(tmp_path / "async") == [2, 4, 6, 8]
    _same_checkpoints(tmp_path / "blocking", tmp_path / "async")

    # Resume from the async step-4 checkpoint, writing asynchronously: the same steps 6 and 8.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "async" / "checkpoints" / "step-00000004", tmp_path / "resumed" / "checkpoints" / "step-00000004"
    )
    summary = _train_here(tmp_path / "resumed", *ASYNC)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    shutil.rmtree(tmp_path / "blocking" / "checkpoints" / "step-00000002")
    _same_checkpoints(tmp_path / "blocking", tmp_path / "resumed")
    # The comparison can fail: a step apart, the bytes differ.
    six, eight = (checkpoint.verify(tmp_path / "resumed" / "checkpoints" / f"step-0000000{s}") for s in (6, 8))
    assert six["files"] != eight["files"]


@pytest.mark.timeout(120)
def test_steps_go_on_during_a_write_and_at_most_one_is_in_flight(tmp_path, monkeypatch):
    """Worker 1's write of step 2 cannot finish before worker 1 has voted at step 4: the loop must
    not wait for it (nor commit it while it runs). The checkpoint of step 4, due while it still
    runs, waits for it and for its commit; no worker ever has two writes in flight."""
    voted4 = threading.Event()
    lock, in_flight, seen = threading.Lock(), {0: 0, 1: 0}, []
    original_write, original_vote = checkpoint._write_worker_file, trainer._Run.update_allowed
    root = tmp_path / "run" / "checkpoints"

    def slow_write(payload, tmp, rank):
        step = int(tmp.name[6:14])
        with lock:
            in_flight[rank] += 1
            seen.append(("start", rank, step, in_flight[rank], _steps(tmp_path / "run")))
        if rank == 1 and step == 2:
            seen.append(("steps went on", voted4.wait(10)))
            time.sleep(0.3)  # still writing when the checkpoint of step 4 comes due
        try:
            return original_write(payload, tmp, rank)
        finally:
            with lock:
                in_flight[rank] -= 1
                seen.append(("end", rank, step, _steps(tmp_path / "run")))

    def vote(self, loss, step, epoch):
        allowed = original_vote(self, loss, step, epoch)
        if step == 4 and self.comm.rank == 1:
            voted4.set()
        return allowed

    monkeypatch.setattr(checkpoint, "_write_worker_file", slow_write)
    monkeypatch.setattr(trainer._Run, "update_allowed", vote)
    _train_here(tmp_path / "run", *ASYNC)
    assert ("steps went on", True) in seen, seen
    starts = [e for e in seen if e[0] == "start"]
    assert sorted((r, s) for _, r, s, *_ in starts) == [(r, s) for r in (0, 1) for s in (2, 4, 6, 8)]
    for _, rank, step, count, committed in starts:
        assert count == 1, f"worker {rank}: two writes in flight at step {step}"
        assert committed == list(range(2, step, 2)), f"worker {rank} began step {step} with {committed} committed"
    for _, rank, step, committed in (e for e in seen if e[0] == "end"):
        assert step not in committed, f"step {step} committed before worker {rank} had written its file"
    assert _steps(tmp_path / "run") == [2, 4, 6, 8]
    for p in checkpoint.checkpoints(root):
        checkpoint.verify(p)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", ["preempted", "nan"])
def test_a_stop_while_a_write_runs_commits_it_first(tmp_path, monkeypatch, stop):
    """A signal (preemption) or a NaN loss at step 3, while worker 1 still writes step 2: the run
    waits for that write and commits it before it leaves — with the checkpoint of step 3 as well
    when preempted; for a NaN, one line naming step 2 as the intact checkpoint."""
    request, voting, votes = StopRequest(), threading.Event(), {0: 0, 1: 0}
    original_write, original_vote = checkpoint._write_worker_file, trainer._Run.vote

    def slow_write(payload, tmp, rank):
        if rank == 1 and tmp.name == ".step-00000002.tmp":
            assert voting.wait(10)
            time.sleep(0.2)  # still writing during the vote of step 3
        return original_write(payload, tmp, rank)

    def vote(self, loss):  # issued inside the step, as soon as its loss exists
        votes[self.comm.rank] += 1
        if votes[self.comm.rank] == 3 and self.comm.rank == 1:  # step 3's
            request.signum = signal.SIGTERM if stop == "preempted" else None
            voting.set()
        return original_vote(self, loss)

    monkeypatch.setattr(checkpoint, "_write_worker_file", slow_write)
    monkeypatch.setattr(trainer._Run, "vote", vote)
    if stop == "nan":
        monkeypatch.setenv("HYBRIDPAR_FAULT", "nan@3")
    cfg, run = _cfg(*ASYNC), tmp_path / "run"
    run.mkdir()
    with pytest.raises(Preempted if stop == "preempted" else trainer.NonFiniteLoss) as raised:
        run_emulated(2, lambda comm: trainer.train(comm, torch.device("cpu"), cfg, run, request), timeout_s=60)
    if stop == "preempted":
        assert raised.value.step == 3 and _steps(run) == [2, 3]
    else:
        assert "non-finite loss at step 3" in str(raised.value) and "last checkpoint: step 2, intact" in str(
            raised.value
        )
        assert _steps(run) == [2]
    for p in checkpoint.checkpoints(run / "checkpoints"):
        checkpoint.verify(p)


def _child() -> None:
    """``python -m tests.test_checkpoint_async MODE MARKER [overrides]``: the training app with
    ``hang`` (worker 1's write of step 4 puts half its file on disk, touches MARKER, never returns)
    or ``enospc`` (that write's fsync fails: no space left); ``torchrun MARKER`` (under torchrun) trains
    twice in one process group, blocking into MARKER/blocking, then async into MARKER/async with
    worker 1's write of step 2 slowed, and lists the steps voted while that write ran."""
    mode, marker = sys.argv[1], Path(sys.argv[2])
    original = checkpoint._write_worker_file
    if mode == "torchrun":
        return _torchrun_child(marker)

    original_fsync = checkpoint._fsync_file

    def hang(payload, tmp, rank):
        if rank != 1 or tmp.name != ".step-00000004.tmp":
            return original(payload, tmp, rank)
        buf = io.BytesIO()
        torch.save(payload, buf)
        with open(tmp / "worker-001.pt", "wb") as f:
            f.write(buf.getvalue()[: buf.tell() // 2])
        marker.touch()
        threading.Event().wait()  # SIGKILLed here

    def no_space(path: Path) -> None:  # fsync reports a full disk (delayed allocation, NFS)
        if path.name == "worker-001.pt" and path.parent.name == ".step-00000004.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original_fsync(path)

    if mode == "hang":
        checkpoint._write_worker_file = hang
    else:
        checkpoint._fsync_file = no_space
    sys.argv = ["hybridpar.train", *sys.argv[3:]]
    from hybridpar.train import cli

    cli()


def _child_cmd(mode: str, marker: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        PY,
        "-m",
        "tests.test_checkpoint_async",
        mode,
        str(marker),
        "parallel.emulate=2",
        *QUIET,
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYBRIDPAR_FAULT", None)
    return env


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_write_leaves_the_previous_checkpoint_and_the_run_resumes(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen(
        _child_cmd("hang", marker, run, *ASYNC),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # worker 1 is half-way through its file of step 4
    out = proc.communicate()[0].decode()
    assert marker.exists() and proc.returncode == -signal.SIGKILL, (proc.returncode, out[-3000:])
    root = run / "checkpoints"
    assert _steps(run) == [2], out[-3000:]
    partial = root / ".step-00000004.tmp"
    assert (partial / "worker-001.pt").is_file() and not (partial / "meta.json").exists()
    assert checkpoint.latest(root)[0].name == "step-00000002"  # verifies: sizes and hashes
    summary = _train_here(run, *ASYNC)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 8
    assert _steps(run) == [2, 4, 6, 8] and not list(root.glob(".step-*.tmp"))
    for p in checkpoint.checkpoints(root):
        checkpoint.verify(p)


@pytest.mark.timeout(120)
def test_a_failed_background_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = run_cmd(_child_cmd("enospc", tmp_path / "unused", run, *ASYNC), cwd=tmp_path, env=_env(), timeout=90)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hybridpar: error:")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("hybridpar: error: checkpoint of step 4 not written: worker 1 cannot write "), lines
    assert "No space left on device" in lines[0] and "the last checkpoint, step-00000002, is intact" in lines[0]
    assert _steps(run) == [2] and not list((run / "checkpoints").glob(".step-*.tmp"))
    checkpoint.verify(run / "checkpoints" / "step-00000002")


def _torchrun_child(out: Path) -> None:
    import torch.distributed as dist

    from hybridpar.comm import DistCommunicator
    from hybridpar.runtime import end_process_groups

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    comm, cpu = DistCommunicator(), torch.device("cpu")
    for name in ("blocking", "async"):
        (out / name).mkdir(exist_ok=True)
    trainer.train(comm, cpu, _cfg(*RUN), out / "blocking")
    original_write, original_vote = checkpoint._write_worker_file, trainer._Run.update_allowed
    voted_while_writing = []

    def slow_write(payload, tmp, rank):
        if rank == 1 and tmp.name == ".step-00000002.tmp":
            time.sleep(1.0)
        return original_write(payload, tmp, rank)

    def vote(self, loss, step, epoch):
        if self.writing is not None and not self.writing.written():
            voted_while_writing.append(step)
        return original_vote(self, loss, step, epoch)

    checkpoint._write_worker_file, trainer._Run.update_allowed = slow_write, vote
    trainer.train(comm, cpu, _cfg(*ASYNC), out / "async")
    (out / f"voted-{comm.rank}.json").write_text(json.dumps(voted_while_writing))
    dist.barrier()
    del comm
    end_process_groups()


@pytest.mark.timeout(180)
def test_async_on_two_gloo_processes_writes_the_blocking_checkpoints(tmp_path):
    """Under torchrun: the write flag travels in the step's vote between processes (worker 1's
    first write takes a second, so steps are voted while it runs), and the checkpoints are the
    blocking run's, byte for byte."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tests.test_checkpoint_async", "torchrun", str(tmp_path)]
    proc = run_cmd(cmd, cwd=tmp_path, env=_env(), timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "voted-1.json").read_text())[:1] == [3], proc.stdout[-2000:]
    _same_checkpoints(tmp_path / "blocking", tmp_path / "async")
    assert _steps(tmp_path / "async") == [2, 4, 6, 8]


if __name__ == "__main__":
    _child()
