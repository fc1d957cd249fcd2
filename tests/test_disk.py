"""Disk trouble: a checkpoint directory that is read-only, full, or not the same directory on
every node. Each ends in one line naming the directory (and the bytes needed), exit 2, the
earlier checkpoints intact, no worker left waiting. Real file systems: tmpfs mounts (root only;
elsewhere these tests skip, saying why)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridpar import checkpoint
from tests.helpers import run_cmd
from tests.test_checkpoint import EXACT, QUIET, _error_line, _train

pytestmark = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None,
    reason="needs root to mount small tmpfs file systems (full, read-only, per-node)",
)


@contextlib.contextmanager
def _tmpfs(path: Path, size: int, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.timeout(200)
def test_a_read_only_checkpoint_dir_is_one_line_before_step_1(tmp_path):
    with _tmpfs(tmp_path / "ro", 1 << 20, read_only=True) as ro:
        run = _train(tmp_path / "run", *EXACT, f"checkpoint.dir={ro}")
    line = _error_line(run)
    assert f"cannot write to checkpoint.dir {ro}: Read-only file system" in line, line
    assert "step 1" not in (tmp_path / "run" / "train.log").read_text()  # before any step


@pytest.mark.timeout(300)
def test_a_full_checkpoint_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, emulated_reference):
    """Room for one checkpoint and a half: step 3's is written, step 6's is refused before a byte
    of it is written, naming what it needs and what is free; step 3's still loads."""
    size = _du(emulated_reference.result() / "checkpoints" / "step-00000003")
    with _tmpfs(tmp_path / "full", (size * 3 // 2 + 4095) // 4096 * 4096) as full:
        run = _train(tmp_path / "run", *EXACT, f"checkpoint.dir={full}")
        line = _error_line(run)
        assert line.startswith("hybridpar: error: checkpoint of step 6 not written: it needs "), line
        assert f"MB in {full}, which has " in line and "the last checkpoint, step-00000003, is intact" in line
        assert [p.name for p in full.iterdir()] == ["step-00000003"]  # no partial write left behind
        assert checkpoint.full_state_dict(full / "step-00000003")  # verifies (sizes, hashes) and loads


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a node with its own mounts")
def test_a_checkpoint_dir_not_shared_between_nodes_is_one_line_before_step_1(tmp_path):
    """Two torchrun nodes on this machine; node 1 runs in its own mount namespace with a tmpfs over
    the checkpoint directory — the same path, another directory, as a node's local disk is."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYBRIDPAR_FAULT", None)
    port = 29500 + os.getpid() % 1000

    def node(rank: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=disk{os.getpid()}",
            "-m",
            "hybridpar.train",
            *EXACT,
            *QUIET,
            f"checkpoint.dir={ckpt}",
            f"hydra.run.dir={tmp_path / f'run{rank}'}",
        ]

    local = f"mount -t tmpfs tmpfs {ckpt} && exec " + " ".join(node(1))
    other = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", local],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        first = run_cmd(node(0), env=env, timeout=200)
        _, other_err = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            os.killpg(other.pid, 9)
    # The rendezvous, not --node_rank, decides which node holds worker 0: its node prints the line.
    both = first.stderr + other_err
    lines = [x for x in both.splitlines() if x.startswith("hybridpar: error:")]
    assert len(lines) == 1, both[-4000:]
    assert f"checkpoint.dir {ckpt} is not the same directory on every worker (worker(s) 1 cannot see" in lines[0]
    assert "shared file system" in lines[0]
    assert "hybridpar/" not in both.replace(str(tmp_path), "")  # no worker traceback (torchrun adds its own report)
    assert first.returncode != 0 and other.returncode != 0
    assert not list(ckpt.iterdir())  # the check leaves nothing behind
