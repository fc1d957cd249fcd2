"""The GPU fast path, exercised on the CPU: channels_last and a compiled trunk train the same
weights as the plain path (to fp32 rounding); bf16 autocast runs with them."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from hybridpar import checkpoint
from tests.helpers import run_cmd


def _train(run_dir, *overrides, K=2):
    proc = run_cmd([sys.executable, "-m", "hybridpar.train", f"parallel.emulate={K}", "trainer.max_steps=3", "model.dropout=0.0",
                    "logger=none", "trainer.progress=false", f"hydra.run.dir={run_dir}", *overrides],
                   cwd=run_dir.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return checkpoint.full_state_dict(checkpoint.latest(run_dir / "checkpoints")[0])


@pytest.mark.timeout(300)
def test_channels_last_trains_the_same_weights(tmp_path):
    plain = _train(tmp_path / "plain")
    fast = _train(tmp_path / "cl", "trainer.channels_last=true")
    for n in plain:
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)
    assert _train(tmp_path / "bf16", "trainer.channels_last=true", "trainer.precision=bf16")  # runs, finite
    assert all(torch.isfinite(t).all() for t in checkpoint.full_state_dict(checkpoint.latest(tmp_path / "bf16" / "checkpoints")[0]).values())


@pytest.mark.timeout(400)
def test_compiled_trunk_trains_the_same_weights(tmp_path):
    plain = _train(tmp_path / "plain", K=1)
    compiled = _train(tmp_path / "compiled", "trainer.compile=true", K=1)
    assert compiled.keys() == plain.keys()  # compiled in place: the names are the model's
    for n in plain:
        torch.testing.assert_close(compiled[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)
