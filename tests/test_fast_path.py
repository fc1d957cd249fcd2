"""The GPU fast path, exercised on the CPU: channels_last and a compiled trunk train the same
weights as the plain path (to fp32 rounding); bf16 autocast runs with them."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from hybridpar import checkpoint
from tests.helpers import compose_train, concurrently, run_cmd, train_here


def _train(run_dir, *overrides, K=2):
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "hybridpar.train",
            f"parallel.emulate={K}",
            "trainer.max_steps=3",
            "model.dropout=0.0",
            "logger=none",
            "trainer.progress=false",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=run_dir.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return checkpoint.full_state_dict(checkpoint.latest(run_dir / "checkpoints")[0])


def _train_here(run_dir, *overrides) -> dict[str, torch.Tensor]:
    """``_train``'s run (two emulated workers, 3 steps) in this process: no interpreter to start."""
    train_here(run_dir, "trainer.max_steps=3", "model.dropout=0.0", *overrides)
    return checkpoint.full_state_dict(checkpoint.latest(run_dir / "checkpoints")[0])


@pytest.mark.timeout(300)
def test_channels_last_trains_the_same_weights(tmp_path):
    plain = _train_here(tmp_path / "plain", "trainer.channels_last=false")
    fast = _train_here(tmp_path / "cl", "trainer.channels_last=true")
    for n in plain:
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)
    bf16 = _train_here(tmp_path / "bf16", "trainer.channels_last=true", "trainer.precision=bf16")
    assert all(torch.isfinite(t).all() for t in bf16.values())  # runs, finite


@pytest.mark.timeout(400)
def test_compiled_trunk_trains_the_same_weights(tmp_path):
    # NCHW: the layout is the test above's business, and inductor compiles NCHW kernels faster here.
    # The plain side in this process (no interpreter to start); the compiled one in its own, as users run
    # it. They are independent: the plain one trains while the other starts and compiles.
    _, compiled = concurrently(
        lambda: train_here(
            tmp_path / "plain", "trainer.max_steps=3", "model.dropout=0.0", "trainer.channels_last=false", K=1
        ),
        lambda: _train(tmp_path / "compiled", "trainer.compile=true", "trainer.channels_last=false", K=1),
    )
    plain = checkpoint.full_state_dict(checkpoint.latest(tmp_path / "plain" / "checkpoints")[0])
    assert compiled.keys() == plain.keys()  # compiled in place: the names are the model's
    for n in plain:
        torch.testing.assert_close(compiled[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)


def test_the_fast_path_is_applied_to_the_trunk():
    """The equal-weights tests above would also pass if the switches did nothing: check the effect."""
    from omegaconf import OmegaConf

    from hybridpar.config import TrainerConfig
    from hybridpar.models import alexnet_small
    from hybridpar.trainer import _fast_path, _inputs

    cfg = OmegaConf.create({"trainer": TrainerConfig(channels_last=True, compile=True)})
    model = alexnet_small(10, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=32)
    _fast_path(cfg, model, ["features", "avgpool"], torch.device("cpu"))
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.features._compiled_call_impl is not None and model.classifier._compiled_call_impl is None
    assert _inputs(torch.randn(2, 3, 8, 8), torch.device("cpu"), cfg).is_contiguous(memory_format=torch.channels_last)
    plain = alexnet_small(10, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=32)
    _fast_path(
        OmegaConf.create({"trainer": TrainerConfig(channels_last=False)}),
        plain,
        ["features", "avgpool"],
        torch.device("cpu"),
    )
    assert not plain.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.features._compiled_call_impl is None


def test_channels_last_is_on_by_default_except_for_a_users_model():
    """``auto``: the built-in and torchvision models (they flatten with torch.flatten) train in
    channels_last; a user's model, whose forward may ``.view()`` a conv output, does not (that
    model trains from the command line in tests/test_hybridize.py); true/false force it."""
    from omegaconf import open_dict

    from hybridpar.errors import ConfigError
    from hybridpar.trainer import channels_last, validate

    cfgs = {
        o: compose_train(*o)
        for o in [
            (),
            ("model=vgg11",),
            ("model=torchvision",),
            ("model=custom", "model.target=tests.user_models:TinyNet"),
            ("model=custom", "model.target=tests.user_models:TinyNet", "trainer.channels_last=true"),
            ("trainer.channels_last=false",),
        ]
    }
    assert [channels_last(c) for c in cfgs.values()] == [True, True, True, False, True, False]
    bad = cfgs[()]
    with open_dict(bad):
        bad.trainer.channels_last = "maybe"
    with pytest.raises(ConfigError, match="trainer.channels_last must be true, false or auto, got 'maybe'"):
        validate(bad)
