"""Fixtures shared by test files: runs that several tests compare against, made once per session.

Each is launched in the background when a test first asks for it (``tests.helpers.in_background``):
its ``result()`` waits for it, so the first test can launch its own independent run meanwhile; a
test that times anything waits for the result first."""

from __future__ import annotations

import pytest

from tests.helpers import in_background


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory):
    """The final weights of the uninterrupted two-worker torchrun run (``TORCH_EXACT_10``) that
    the restart and preemption tests must end bit-identical to: one launch for both."""
    from tests.test_checkpoint import TORCH_EXACT_10, TORCHRUN, _final, _run

    tmp = tmp_path_factory.mktemp("torchrun_reference")

    def run():
        ref = _run([*TORCHRUN, "-m", "hybridpar.train", *TORCH_EXACT_10, f"hydra.run.dir={tmp / 'ref'}"], tmp, 280)
        assert ref.returncode == 0, ref.stderr[-3000:]
        return _final(tmp / "ref")

    return in_background(run)


@pytest.fixture(scope="session")
def emulated_reference(tmp_path_factory):
    """The run directory of the uninterrupted two-emulated-worker run (``EXACT``: 8 steps, a checkpoint
    every 3) that the kill, preemption and full-disk tests compare against: one launch for all three.
    Read only."""
    from tests.test_checkpoint import EXACT, _train

    ref = tmp_path_factory.mktemp("emulated_reference") / "ref"

    def run():
        proc = _train(ref, *EXACT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return ref

    return in_background(run)
