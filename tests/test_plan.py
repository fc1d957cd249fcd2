"""The planner CLI: per-layer table, layouts, the chosen FC group size; bad arguments in one line."""

import subprocess
import sys

import pytest

from hybridpar import costmodel as cm
from hybridpar.parallel.cost import ddp_step_bytes, two_d_step_bytes
from hybridpar.parallel.data_parallel import trunk_bucket_numels
from hybridpar.parallel.head import choose_styles
from hybridpar.plan import best, build, head_widths, layouts
from tests.helpers import concurrently


def test_layouts_bytes_and_choice_for_vgg16():
    model = build("vgg16", 1000, 3)
    ls = {lay.name: lay for lay in layouts(model, 16, 128, cm.Link(1e-5, 12.5e9), None, "min_bytes")}
    n = sum(p.numel() for p in model.parameters())
    assert ls["DDP"].bytes == ddp_step_bytes(n, 16)
    widths = head_widths(model)
    trunk = trunk_bucket_numels([p.numel() for k, p in model.named_parameters() if not k.startswith("classifier")])
    assert ls["2-D hybrid, G = 8"].bytes == two_d_step_bytes(widths, choose_styles(widths, 8), trunk, 128, 16, 8)
    assert set(ls) == {"DDP", "2-D hybrid, G = 2", "2-D hybrid, G = 4", "2-D hybrid, G = 8", "1-D hybrid (G = K)"}
    chosen = best(list(ls.values()))
    assert chosen.link_s == min(lay.link_s for lay in ls.values())


@pytest.fixture(scope="module")
def cli() -> dict[str, subprocess.CompletedProcess]:
    """The planner's command lines below, launched together: independent, and nothing here is timed."""
    argv = {
        "alexnet": ["model=alexnet", "world_size=64", "batch=128", "bandwidth=10gbit"],
        "bad": ["workers=3"],
        # RegNet computes its widths with tensors, so it is built on the CPU instead of the meta device.
        "regnet": ["model=regnet_y_400mf", "world_size=8"],
    }
    runs = concurrently(
        *(
            lambda args=args: subprocess.run(
                [sys.executable, "-m", "hybridpar.plan", *args],
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            )
            for args in argv.values()
        )
    )
    return dict(zip(argv, runs, strict=True))


def test_cli_prints_layers_layouts_and_a_choice(cli):
    out = cli["alexnet"]
    assert out.returncode == 0, out.stderr
    assert "| classifier.1 | Linear | 37,752,832 | 4,096 | model parallel (" in out.stdout
    assert "| features.0 | Conv2d | 23,296 |" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("chosen: 2-D hybrid, G = 8")
    bad = cli["bad"]
    assert bad.returncode == 2 and bad.stderr.startswith("hybridpar.plan: error: 'workers=3': use key=value")


def test_cli_takes_any_torchvision_model_by_name(cli):
    out = cli["regnet"]
    assert out.returncode == 0, out.stderr
    assert "| fc | Linear | 441,000 | 1,000 | model parallel (" in out.stdout
    assert "| stem.0 | Conv2d | 864 |" in out.stdout and "chosen: " in out.stdout
