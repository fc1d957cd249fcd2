"""Fixtures shared by test files: runs that several tests compare against, made once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the uninterrupted two-worker torchrun run (``TORCH_EXACT_10``) that
    the restart and preemption tests must end bit-identical to: one launch for both."""
    from tests.test_checkpoint import TORCH_EXACT_10, TORCHRUN, _final, _run

    tmp = tmp_path_factory.mktemp("torchrun_reference")
    ref = _run([*TORCHRUN, "-m", "hybridpar.train", *TORCH_EXACT_10, f"hydra.run.dir={tmp / 'ref'}"], tmp, 280)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return _final(tmp / "ref")
