"""Preemption: a signal asks the run to stop after its current step, with a checkpoint of it.

Clusters reclaim machines all the time: Slurm sends SIGTERM (or, with ``--signal``, SIGUSR1)
before it kills a job, Kubernetes SIGTERM before its grace period ends, a user presses Ctrl-C
(SIGINT). Whichever worker (or torchrun, which passes SIGTERM on to its workers) gets one, the
handler only notes it; at the end of the step every worker learns of it in the step's vote (the
same tiny collective as the non-finite check, ``Communicator.votes``), so all of them write the
checkpoint of that same step and leave together with :data:`EXIT_PREEMPTED` — well inside
torchrun's 30 s grace period for a step of seconds. A relaunch of the same command resumes from
it, bit-identical to a run never interrupted. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Self

# EX_TEMPFAIL (sysexits.h): a temporary failure, the caller is invited to retry — relaunching the
# same command resumes the run. launch/slurm.sbatch requeues the job on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Notes the first of :data:`SIGNALS` this process receives; the training loop reads it once
    per step. Installed by the main thread (Python runs signal handlers there) for the run's
    duration; the emulated workers, threads of this process, share it."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C again: the user does not want to wait for the step
        if self.signum is None:
            self.signum = signum


class Preempted(Exception):
    """Every worker stopped after ``step`` on a signal, with a checkpoint of that step."""

    def __init__(self, step: int, signame: str, path: str):
        super().__init__(
            f"preempted at step {step} ({signame}); checkpoint {path}; relaunch the same command to resume"
        )
        self.step, self.signame, self.path = step, signame, path
