"""Where users run it: the Dockerfile (hadolint), the launchers (shellcheck, YAML), and a real
two-node run in network namespaces that must equal the single-node run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hybridpar import checkpoint
from tests.helpers import run_cmd

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    [*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/*.sbatch"), *ROOT.glob("bench/*.sh"), ROOT / ".ci" / "run"]
)


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is a test dependency (pip install -e '.[test]')"
    return path


def test_dockerfile_passes_hadolint_and_runs_the_trainer_as_a_numeric_user():
    out = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["torchrun", "--standalone", "--nproc_per_node=gpu", "-m", "hybridpar.train"]' in text
    assert "USER 10001:10001" in text and "pip install --no-cache-dir ." in text and "-e ." not in text
    assert "NCCL_DEBUG=" not in text.replace("NCCL_DEBUG=INFO only when debugging", "")
    assert "!hybridpar/" in (ROOT / ".dockerignore").read_text()


def test_shell_scripts_pass_shellcheck():
    assert len(SCRIPTS) >= 6
    out = subprocess.run(
        [_tool("shellcheck"), *map(str, SCRIPTS)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for path in SCRIPTS:
        head = path.read_text().splitlines()[:6]
        assert any(line.startswith("#") and len(line) > 20 for line in head[1:]), f"{path.name}: say how to use it"


def test_pytorchjob_manifest():
    job = yaml.safe_load((ROOT / "launch" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    args = " ".join(specs["Worker"]["template"]["spec"]["containers"][0]["args"])
    assert "--rdzv-backend=c10d" in args and "-m hybridpar.train" in args and "--rdzv-id=" in args
    # SIGTERM must reach torchrun (not a shell that drops it), with time for its 30 s shutdown.
    assert args.startswith("exec torchrun ")
    assert specs["Worker"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_slurm_script_passes_a_signal_on_and_requeues_the_job(tmp_path, sig):
    """With stand-ins for srun and scontrol: the time-limit warning (USR1) or preemption (TERM) to
    the batch script reaches the running step as SIGTERM, and the job requeues itself."""
    import signal
    import time

    log, bin_dir = tmp_path / "log", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!/usr/bin/env bash\ntrap 'echo got-term >> {log}; exit 75' TERM\necho \"srun $*\" >> {log}\n"
        "while true; do sleep 0.05; done\n"
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> {log}; fi\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    env |= {"SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "data=imagenet"], env=env, text=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and "srun" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    assert proc.wait(timeout=30) == 0
    lines = log.read_text().splitlines()
    assert lines[0].startswith("srun --kill-on-bad-exit=1 torchrun") and lines[0].endswith("data=imagenet")
    assert lines[1:] == ["got-term", "scontrol requeue 42"]


def test_multi_node_launcher_refuses_missing_arguments():
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "multi_node.sh"), "2"], check=False, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and out.stderr.startswith("usage:")


COMMON = [
    "trainer.max_steps=4",
    "checkpoint.every_steps=null",
    "trainer.deterministic=true",
    "logger=none",
    "trainer.progress=false",
]


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (ip netns) to make two network namespaces",
)
def test_two_nodes_in_network_namespaces_equal_one_node(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    one = run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "hybridpar.train",
            *COMMON,
            f"hydra.run.dir={tmp_path / 'one'}",
        ],
        cwd=tmp_path,
        env=env,
        timeout=200,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    before = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    two = run_cmd(
        [
            "bash",
            str(ROOT / "bench" / "twohost.sh"),
            "1gbit",
            "-m",
            "hybridpar.train",
            *COMMON,
            f"hydra.run.dir={tmp_path / 'two'}",
        ],
        cwd=tmp_path,
        env=env,
        timeout=200,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert (
        subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout == before
    )  # cleaned up
    a = checkpoint.full_state_dict(checkpoint.latest(tmp_path / "one" / "checkpoints")[0])
    b = checkpoint.full_state_dict(checkpoint.latest(tmp_path / "two" / "checkpoints")[0])
    # Same algorithm over veth as over loopback; each node here has one worker and so two intra-op
    # threads where the single node gives each of its two workers one: fp32 rounding, not bits.
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


@pytest.mark.timeout(400)
@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (ip netns) to make two network namespaces",
)
def test_two_nodes_restart_after_a_lost_worker_and_end_as_one_node(tmp_path):
    """Node 1's worker is SIGKILLed after step 5 under --max-restarts: both agents restart their
    workers (each with its own restart count), the new group forms, resumes from step 3's
    checkpoint and ends with the weights of an uninterrupted run."""
    exact = [x for x in COMMON if x.split("=")[0] not in ("trainer.max_steps", "checkpoint.every_steps")]
    exact += ["trainer.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep_last=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("HYBRIDPAR_FAULT", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    one = run_cmd(
        [*torchrun, "-m", "hybridpar.train", *exact, f"hydra.run.dir={tmp_path / 'one'}"],
        cwd=tmp_path,
        env=env,
        timeout=200,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cmd(
        ["bash", str(ROOT / "bench" / "twohost.sh"), "1gbit", "-m", "hybridpar.train", *exact]
        + [f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=tmp_path,
        env={**env, "TORCHRUN_ARGS": "--max-restarts=2", "HYBRIDPAR_FAULT": "kill@5:1"},
        timeout=300,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 8, summary
    a = checkpoint.full_state_dict(checkpoint.latest(tmp_path / "one" / "checkpoints")[0])
    b = checkpoint.full_state_dict(checkpoint.latest(tmp_path / "two" / "checkpoints")[0])
    for n in a:  # fp32 rounding between the topologies, as in the test above
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6)
