"""Fault injection for the reliability tests, kept out of the training loop's reading path.

``HYBRIDPAR_FAULT="kill@7:1,nan@3"`` SIGKILLs worker 1's process after step 7, before step 8
starts (first attempt only, not after a torchrun restart), and feeds worker 0 NaN images at
step 3. ``term@4`` sends SIGTERM after step 4 (worker 0, first attempt only) as a scheduler
would: to torchrun, which passes it on to every worker, or, without torchrun, to this process.
``freeze@6`` freezes the host after step 6 (first attempt only): SIGSTOP to torchrun, this
worker's parent, and to this worker — processes that hold their connections open and say nothing,
as a hung or cut-off machine does; ``freeze@6:1`` only on worker 1. ``slow@300`` delays every batch
by 300 ms (every attempt), as a loader that cannot keep up would (it counts as waiting for data), so
that a test can act while a run is still training.
Unset in normal use: :func:`inject` then hands the batches through untouched.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import torch


def plan(rank: int) -> dict[str, int]:
    spec = os.environ.get("HYBRIDPAR_FAULT", "")
    out: dict[str, int] = {}
    for item in filter(None, spec.split(",")):
        what, _, rest = item.partition("@")
        at, _, on = rest.partition(":")
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if what in ("kill", "term", "freeze") and (restarted or (on and int(on) != rank)):
            continue
        if what == "term" and rank != 0:
            continue
        out[what] = int(at)
    return out


def inject(batches: Iterator[tuple[int, int, torch.Tensor, torch.Tensor]], rank: int):
    """The ``(step, epoch, x, y)`` batches, with the faults of ``HYBRIDPAR_FAULT`` applied."""
    faults = plan(rank)
    for step, epoch, x, y in batches:
        if faults.get("kill") == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.get("freeze") == step - 1:
            print(f"hybridpar: fault: this host freezes after step {step - 1}", file=sys.stderr, flush=True)
            if "TORCHELASTIC_RUN_ID" in os.environ:
                os.kill(os.getppid(), signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGSTOP)
        if "slow" in faults:
            time.sleep(faults["slow"] / 1e3)
        if faults.get("term") == step - 1:
            os.kill(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid(), signal.SIGTERM)
        if faults.get("nan") == step and rank == 0:
            x = x.clone().fill_(float("nan"))
        yield step, epoch, x, y
