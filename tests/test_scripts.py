"""The installed commands (``[project.scripts]``): each is on the environment's bin and answers
``--help`` with its usage, run from outside the repository (no ``python -m``, no source path)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What each command's --help must say: Hydra's help lists the config groups (with the recipe's options).
USAGE = {
    "hybridpar-train": ("powered by Hydra", "optim: paper, sgd", "trainer: default, paper"),
    "hybridpar-plan": ("usage: hybridpar-plan [key=value ...]", "world_size=8"),
    "hybridpar-export": ("usage:", "checkpoint", "out"),
    "hybridpar-verify": ("usage: hybridpar-verify", "--workers"),
    "hybridpar-costmodel": ("usage:", "{profile,predict,project}"),
}


def test_every_declared_script_is_tested():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(declared) == set(USAGE)
    assert declared["hybridpar-train"] == "hybridpar.train:cli"


def test_each_script_is_installed_and_answers_help(tmp_path):
    missing = [name for name in USAGE if not (BIN / name).is_file()]
    assert not missing, f"not in {BIN}: {missing} (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {
        name: subprocess.Popen(
            [str(BIN / name), "--help"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in USAGE
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} --help exited {proc.returncode}:\n{out}"
        for fragment in USAGE[name]:
            assert fragment in out, f"{name} --help lacks {fragment!r}:\n{out}"
    assert not any(tmp_path.iterdir()), "--help wrote files"
