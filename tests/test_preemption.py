"""Preemption: SIGTERM (to the process, or to torchrun) stops every worker after the step in which
they learn of it, with a checkpoint of that step, one line and exit code 75; a relaunch resumes
bit-identical to a run never interrupted."""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest
import torch

from hybridpar import checkpoint
from hybridpar.preemption import EXIT_PREEMPTED, StopRequest
from tests.test_checkpoint import EXACT, TORCH_EXACT_10, TORCHRUN, _final, _run, _train

LINE = re.compile(r"^hybridpar: preempted at step (\d+) \(SIGTERM\); checkpoint (\S+); relaunch the same command")


def _stopped_at(proc) -> tuple[int, str]:
    lines = [m for m in map(LINE.match, proc.stderr.splitlines()) if m]
    assert len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return int(lines[0].group(1)), lines[0].group(2)


def _identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n, t in a.items():
        assert torch.equal(t, b[n]), n


@pytest.mark.timeout(300)
def test_sigterm_stops_after_the_step_with_its_checkpoint_and_a_relaunch_resumes_exactly(tmp_path, emulated_reference):
    """Emulated K = 2, dropout and augmentation on: SIGTERM after step 4 (fault injection) ends
    the run after the next step's vote with its checkpoint; the relaunch ends bit-identical."""
    ref = emulated_reference.result()  # waited for first: nothing runs beside the signalled run
    stopped = _train(tmp_path / "run", *EXACT, fault="term@4")
    assert stopped.returncode == EXIT_PREEMPTED, (stopped.returncode, stopped.stderr[-3000:])
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    step, path = _stopped_at(stopped)
    assert step in (5, 6)  # the step running when the signal came (or, rarely, the next one)
    names = [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000003", f"step-{step:08d}"] and path.endswith(names[-1])
    assert not (tmp_path / "run" / "summary.json").exists()  # not a finished run
    resumed = _train(tmp_path / "run", *EXACT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["steps"] == 8
    _identical(_final(ref), _final(tmp_path / "run"))


@pytest.mark.timeout(600)
def test_sigterm_to_torchrun_checkpoints_every_worker_and_resumes_exactly(tmp_path, torchrun_reference):
    """What Slurm, Kubernetes and spot reclaim do: SIGTERM to torchrun, which passes it on. Every
    worker finishes its step, they agree, write the checkpoint of that step and leave inside
    torchrun's grace period; the relaunch ends bit-identical to an uninterrupted run."""
    ref = torchrun_reference.result()  # waited for first: nothing runs beside the signalled run
    cmd = [*TORCHRUN, "-m", "hybridpar.train", *TORCH_EXACT_10, f"hydra.run.dir={tmp_path / 'run'}"]
    stopped = _run(cmd, tmp_path, 280, HYBRIDPAR_FAULT="term@4")
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    step, _ = _stopped_at(stopped)
    assert 5 <= step < 10, step
    assert checkpoint.latest(tmp_path / "run" / "checkpoints")[0].name == f"step-{step:08d}"
    # The workers left on their own, inside torchrun's grace period: it never had to kill them.
    assert "SIGKILL" not in stopped.stderr, stopped.stderr[-3000:]
    resumed = _run(cmd, tmp_path, 280)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["steps"] == 10
    _identical(ref, _final(tmp_path / "run"))


def test_a_stop_request_notes_the_first_signal_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)
        assert stop.name == "SIGUSR1"  # the first one is the one reported
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # put back as it was


def test_a_stop_request_outside_the_main_thread_installs_nothing():
    seen = []
    t = threading.Thread(target=lambda: seen.append(StopRequest().__enter__()._previous))
    t.start()
    t.join()
    assert seen == [{}]
