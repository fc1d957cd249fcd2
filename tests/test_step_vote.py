"""The training app's per-step vote (every worker's loss finite? a stop requested? the checkpoint in
flight written?) leaves as soon as the step's loss exists — before the step's gradient sums, behind
which a tiny collective waits for tens of milliseconds on a slow link (bench/queue_delay.py) — and
is waited for only after the step. What it decides is covered where it acts: tests/test_checkpoint.py
(a non-finite loss stops or skips), tests/test_preemption.py (a signal stops every worker after the
same step), tests/test_checkpoint_async.py (a write finished on every worker is committed).
"""

from __future__ import annotations

import pytest

from hybridpar import trainer
from tests.helpers import train_here

SUMS = ("trunk_grads", "ddp_grads")  # the tags of the hybrid trunk's and of (emulated) DDP's gradient sums


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "overrides",
    [
        ("parallel.scheme=a",),
        ("parallel.scheme=a", "parallel.trunk_sync=pipelined"),
        ("parallel.scheme=a", "parallel.micro_batches=2", "parallel.trunk_sync=pipelined"),
        ("parallel.scheme=b",),
        ("parallel.scheme=c", "parallel.chunk_trunk=true"),
        ("parallel.scheme=ddp",),
    ],
    ids=["a", "a-pipelined", "a-micro-batches", "b", "c-chunked", "ddp"],
)
def test_the_vote_leaves_before_the_steps_gradient_sums(tmp_path, monkeypatch, overrides):
    """Each step's collectives in issue order (the ledger's entries, which the trainer resets at
    every step), read when the trainer waits for the vote: exactly one vote, issued before the
    first gradient sum."""
    seen: list[list[str]] = []
    original = trainer._Run.update_allowed

    def record(self, loss, step, epoch):
        if self.comm.rank == 0:
            seen.append([e.tag for e in self.comm.ledger.entries])
        return original(self, loss, step, epoch)

    monkeypatch.setattr(trainer._Run, "update_allowed", record)
    train_here(tmp_path / "run", "trainer.max_steps=3", *overrides, timeout_s=120)
    assert len(seen) == 3
    for step, tags in enumerate(seen, 1):
        sums = [i for i, t in enumerate(tags) if t in SUMS]
        assert sums, f"step {step}: no gradient sum in {tags}"
        assert tags.count("step_votes") == 1, f"step {step}: {tags}"
        assert tags.index("step_votes") < sums[0], f"step {step}: the vote left after a sum: {tags}"


@pytest.mark.timeout(60)
def test_votes_count_tensor_and_host_flags_alike_on_every_worker():
    """A flag may be a 0-d tensor (a loss's isfinite, read where it was computed) or a host bool;
    every worker gets the same counts, in the flags' order."""
    import torch

    from hybridpar.comm import run_emulated

    def vote(comm):
        loss = torch.tensor(float("nan") if comm.rank == 1 else 2.0)
        return comm.votes_async([torch.isfinite(loss), comm.rank != 2, True], "step_votes").wait()

    assert run_emulated(3, vote) == [[2, 2, 3]] * 3
    assert run_emulated(1, vote) == [[1, 1, 1]]
