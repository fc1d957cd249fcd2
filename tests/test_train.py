"""The training application end to end: torchrun and emulated runs, the run directory, W&B
offline files, Hydra multirun, and bad input (one error line, non-zero exit, no hang)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridpar.models import alexnet_small
from hybridpar.parallel.cost import hybrid_step_bytes
from hybridpar.parallel.head import choose_styles
from tests.helpers import cli_in_process, concurrently, run_cmd

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN = ["-m", "hybridpar.train"]


def _run(cmd, tmp_path, timeout=240, **env):
    environ = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **env}
    return run_cmd(cmd, cwd=tmp_path, env=environ, timeout=timeout)


def _run_dir(proc) -> Path:
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run directory: "), proc.stdout[-2000:] + proc.stderr[-2000:]
    return Path(last.removeprefix("run directory: "))


def _small_model_bytes(b: int, K: int) -> int:
    m = alexnet_small(10, in_channels=1, channels=(32, 64, 96, 64, 64), hidden=512)
    widths = [(x.in_features, x.out_features) for x in m.classifier if isinstance(x, torch.nn.Linear)]
    trunk = sum(p.numel() for p in m.features.parameters())
    return hybrid_step_bytes(widths, choose_styles(widths, K), trunk, b, K, rank=0)


@pytest.mark.timeout(300)
def test_torchrun_two_gloo_ranks_end_to_end(tmp_path):
    proc = _run(
        [*TORCHRUN, *TRAIN, "trainer.max_steps=6", "trainer.log_every_steps=3", f"output_root={tmp_path}/runs"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = _run_dir(proc)
    # One directory for the launch, shared by both ranks; only rank 0 wrote into it.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "val_top1",
        "val_top5",
        "train_loss",
        "steps",
        "epochs",
        "world_size",
        "scheme",
        "images_per_s",
        "comm_bytes_per_step",
        "wall_s",
    ):
        assert key in summary, key
    assert summary["world_size"] == 2 and summary["scheme"] == "a" and summary["steps"] == 6
    assert not summary["emulated"]
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["comm_bytes_per_step"] == _small_model_bytes(32, 2)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [3, 6]
    assert {"lr/conv", "lr/fc", "perf/comm_s", "perf/compute_s", "perf/comm_bytes"} <= set(records[0])
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "one W&B run per launch, from rank 0 only"
    assert list(offline[0].glob("run-*.wandb"))


@pytest.mark.timeout(300)
def test_emulated_hybrid_and_ddp_follow_the_same_trajectory(tmp_path):
    # Dropout off: scheme a and DDP do the same arithmetic on the same global batches. The two runs
    # are independent: launched together.
    schemes = ("a", "ddp")
    runs = concurrently(
        *(
            lambda scheme=scheme: _run(
                [
                    sys.executable,
                    *TRAIN,
                    "parallel.emulate=2",
                    f"parallel.scheme={scheme}",
                    "model.dropout=0",
                    "trainer.max_steps=8",
                    "trainer.log_every_steps=1",
                    "logger=none",
                    f"output_root={tmp_path}/{scheme}",
                ],
                tmp_path,
            )
            for scheme in schemes
        )
    )
    losses = {}
    for scheme, proc in zip(schemes, runs, strict=True):
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = _run_dir(proc)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[scheme] = [r["train/loss"] for r in records if "train/loss" in r]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["emulated"] and summary["world_size"] == 2
    assert len(losses["a"]) == 8
    torch.testing.assert_close(torch.tensor(losses["a"]), torch.tensor(losses["ddp"]), rtol=1e-4, atol=1e-5)
    assert losses["a"][-1] < losses["a"][0]


@pytest.mark.timeout(300)
def test_hydra_multirun_two_points(tmp_path):
    proc = _run(
        [
            sys.executable,
            *TRAIN,
            "-m",
            "optim.lr=0.01,0.02",
            "optim.schedule=constant",  # the configured rate itself, no warm-up, in the summary
            "optim.warmup_steps=0",
            "trainer.max_steps=3",
            "logger=none",
            f"output_root={tmp_path}/runs",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "runs" / "multirun").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 3
        lrs.append(json.loads((job / "summary.json").read_text())["lr"]["conv"])
    assert lrs == [0.01, 0.02]


BAD = [
    (["parallel.scheme=zzz"], r"parallel.scheme='zzz' is not one of"),
    (["data=imagenet", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["parallel.emulate=2", "data.global_batch=33"], "data.global_batch=33 cannot be split evenly over 2 workers"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not one of fp32, bf16"),
    (["parallel.fc_batch=chunk"], "it needs parallel.scheme=b or c, not 'a'"),
    (["parallel.comm_dtype=fp16"], "parallel.comm_dtype='fp16' is not one of fp32, bf16"),
    (["optim.conv_lr_scale=cubic"], "optim.conv_lr_scale='cubic' is not one of none, sqrt, linear"),
    (["parallel.trunk_comm_dtype=fp16"], "parallel.trunk_comm_dtype='fp16' is not one of fp32, bf16"),
    (
        ["parallel.scheme=ddp", "parallel.emulate=2", "parallel.trunk_powersgd_rank=2"],
        "the DDP baseline compresses with torch's DDP hooks, which need torchrun",
    ),
    (["parallel.trunk_sync=eventually"], "parallel.trunk_sync='eventually' is not one of bucketed, pipelined"),
    (["parallel.chunk_trunk=true"], "parallel.chunk_trunk runs the trunk round by round"),
    (["parallel.micro_batches=2", "parallel.scheme=c"], "parallel.micro_batches=2 must be a positive integer"),
    (
        ["parallel.trunk_powersgd_rank=2", "parallel.trunk_sync=pipelined"],
        "parallel.trunk_powersgd_rank runs with parallel.trunk_sync=bucketed",
    ),
    # Caught by Hydra against the typed schema (hybridpar/config.py) while composing:
    (["trainer.epoch=3"], "Key 'epoch' not in 'TrainerConfig'"),
    (["parallel.bucket_mb=big"], "parallel.bucket_mb=big: Value 'big' of type 'str' could not be converted to Float"),
    (["model=alexnet", "model.channels=[8,8,8,8,8]"], "Key 'channels' not in 'AlexNetConfig'"),
    (["trainer.epochs=[1"], "cannot parse the override 'trainer.epochs=[1'"),
    (["+trainer.epoch=3"], "unknown config key(s) trainer.epoch"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides, message", BAD)
# torch's @record tries faulthandler on stderr, which pytest's capture has no file descriptor for.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_bad_input_gives_one_error_line(tmp_path, overrides, message, capsys, monkeypatch):
    """The command line's own entry point (``cli``), called in this process: exit 2, one line on stderr."""
    code = cli_in_process(tmp_path, [*overrides, "logger=none", f"output_root={tmp_path}/runs"], monkeypatch)
    out = capsys.readouterr()
    assert code == 2, (code, out.out[-2000:], out.err[-2000:])
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hybridpar: error: "), out.err
    assert message in lines[0]


# Ours before any worker, the data room's in the workers' setup, Hydra's.
FRESH = [b for b in BAD if b[0] in (["parallel.scheme=zzz"], BAD[1][0], ["trainer.epoch=3"])]
UNKNOWN_GROUP = ("model=resnet9000",)


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """The fresh-process runs of the two tests below, by their arguments: each ends in an error;
    independent, launched together."""
    tmp = tmp_path_factory.mktemp("fresh")
    argv = [(*overrides, "logger=none") for overrides, _ in FRESH] + [UNKNOWN_GROUP]
    runs = concurrently(
        *(
            lambda i=i, args=args: _run([sys.executable, *TRAIN, *args, f"output_root={tmp}/{i}"], tmp, timeout=90)
            for i, args in enumerate(argv)
        )
    )
    return dict(zip(argv, runs, strict=True))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides, message", FRESH)
def test_bad_input_from_a_fresh_process_is_one_stderr_line(fresh_runs, overrides, message):
    """The same, as a user sees it: a new process, nothing else on stderr (no warning from any import)."""
    proc = fresh_runs[(*overrides, "logger=none")]
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hybridpar: error: "), proc.stderr
    assert message in lines[0]


@pytest.mark.timeout(120)
def test_unknown_config_group_option(fresh_runs):
    proc = fresh_runs[UNKNOWN_GROUP]
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith("hybridpar: error: ") and "Could not find 'model/resnet9000'" in line, proc.stderr
    assert "alexnet_small, custom, torchvision, vgg11" in line  # the options a user can pick, no schema


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.emulate=2"], "each process is already one worker: drop parallel.emulate"),
        (["data=imagenet", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),  # raised in setup
    ],
)
def test_bad_input_under_torchrun_one_line_from_rank0(tmp_path, overrides, message):
    proc = _run([*TORCHRUN, *TRAIN, *overrides, "logger=none", f"output_root={tmp_path}/runs"], tmp_path, timeout=150)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "hybridpar: error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr  # no worker tracebacks


@pytest.mark.timeout(180)
def test_bad_input_met_first_by_another_worker_is_still_one_line_from_rank0(tmp_path):
    """Worker 1 meets the bad input seconds before worker 0 (a slower start, a busier host): torchrun
    must not stop worker 0 before it has printed the line."""
    shim = tmp_path / "shim"
    shim.mkdir()
    # Imported by every Python process at start-up: worker 0, and only it, starts 4 s late.
    (shim / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '0' and 'LOCAL_RANK' in os.environ:\n    time.sleep(4)\n"
    )
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    proc = _run(
        [*TORCHRUN, *TRAIN, "parallel.emulate=2", "logger=none", f"output_root={tmp_path}/runs"],
        tmp_path,
        timeout=150,
        PYTHONPATH=path,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "hybridpar: error:" in line]
    assert len(errors) == 1 and "drop parallel.emulate" in errors[0], proc.stderr[-3000:]


def test_configs_ship_in_the_wheel(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = tmp_path.glob("hybridpar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (root / "conf").rglob("*.yaml"):
        assert f"hybridpar/conf/{yaml.relative_to(root / 'conf')}" in names, yaml
    for init in (root / "hybridpar").rglob("__init__.py"):
        assert str(init.relative_to(root)) in names, f"package {init.parent.name} missing from the wheel"


def test_a_setup_error_on_one_worker_stops_every_worker():
    from hybridpar.comm import run_emulated
    from hybridpar.errors import HybridparError
    from hybridpar.trainer import SetupFailed, _agreed

    def work(comm):
        def setup():
            if comm.rank == 1:
                raise HybridparError("data.root=/x does not exist on this node")
            return "ok"

        try:
            return _agreed(comm, setup)
        except HybridparError as exc:
            return type(exc), str(exc)

    out = run_emulated(3, work)
    assert out[1] == (HybridparError, "data.root=/x does not exist on this node")
    for r in (0, 2):
        assert out[r] == (SetupFailed, "worker 1: data.root=/x does not exist on this node")


@pytest.mark.timeout(300)
def test_bf16_and_deterministic_runs(tmp_path):
    # The same command in two processes of their own, launched together.
    runs = concurrently(
        *(
            lambda i=i: _run(
                [
                    sys.executable,
                    *TRAIN,
                    "parallel.emulate=2",
                    "trainer.precision=bf16",
                    "trainer.deterministic=true",
                    "trainer.max_steps=5",
                    "trainer.log_every_steps=1",
                    "logger=none",
                    f"output_root={tmp_path}/{i}",
                ],
                tmp_path,
            )
            for i in range(2)
        )
    )
    losses = []
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = _run_dir(proc)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["precision"] == "bf16"
        # bf16 activations cross the wire: fewer bytes than the fp32 formula.
        assert 0 < summary["comm_bytes_per_step"] < _small_model_bytes(32, 2)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["train/loss"] for r in records if "train/loss" in r])
    assert losses[0] == losses[1]  # same seed, same data order, same dropout masks
    assert all(math.isfinite(v) for v in losses[0])


@pytest.mark.timeout(300)
def test_schemes_b_c_chunk_and_conv_lr_scale_from_the_command_line(tmp_path):
    cases = (
        ("b", ["optim.conv_lr_scale=sqrt"], 0.01 * 2**0.5),
        ("c", ["parallel.fc_batch=chunk", "optim.conv_lr_scale=linear"], 0.02),
    )
    runs = concurrently(  # independent: launched together
        *(
            lambda scheme=scheme, extra=extra: _run(
                [
                    sys.executable,
                    *TRAIN,
                    "parallel.emulate=2",
                    f"parallel.scheme={scheme}",
                    *extra,
                    "trainer.max_steps=4",
                    "optim.schedule=constant",  # the scaled rates themselves, no warm-up, in the summary
                    "optim.warmup_steps=0",
                    "parallel.comm_dtype=bf16",
                    "logger=none",
                    f"output_root={tmp_path}/{scheme}",
                ],
                tmp_path,
            )
            for scheme, extra, _ in cases
        )
    )
    for (scheme, _, conv_lr), proc in zip(cases, runs, strict=True):
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((_run_dir(proc) / "summary.json").read_text())
        assert summary["scheme"] == scheme and summary["steps"] == 4
        assert summary["lr"]["conv"] == pytest.approx(conv_lr) and summary["lr"]["fc"] == pytest.approx(0.01)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("compression", ["parallel.trunk_comm_dtype=bf16", "parallel.trunk_powersgd_rank=2"])
def test_ddp_baseline_with_torchs_compression_hooks(tmp_path, compression):
    """The baseline's best settings run through the app: torch DDP with its bf16 hook (bytes halved
    in the ledger) or its PowerSGD hook (one bucket: see trainer._ddp)."""
    proc = _run(
        [
            *TORCHRUN,
            *TRAIN,
            "parallel.scheme=ddp",
            compression,
            "trainer.max_steps=4",
            "logger=none",
            "trainer.progress=false",
            f"output_root={tmp_path}/runs",
        ],
        tmp_path,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((_run_dir(proc) / "summary.json").read_text())
    assert s["steps"] == 4 and math.isfinite(s["train_loss"])
    n = sum(p.numel() for p in alexnet_small(10, in_channels=1, channels=(32, 64, 96, 64, 64), hidden=512).parameters())
    if "bf16" in compression:
        assert s["comm_bytes_per_step"] == 2 * n  # K = 2: n elements each way, in bf16


_DDP_VIEWS = """
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from torchvision.models import alexnet
from hybridpar.comm import DistCommunicator
from hybridpar.runtime import end_process_groups
from hybridpar.trainer import _ddp

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
comm = DistCommunicator()
for dtype, rank in (("fp32", 0), ("bf16", 0), ("fp32", 2)):
    cfg = OmegaConf.create({"parallel": {"trunk_comm_dtype": dtype, "trunk_powersgd_rank": rank}})
    model = _ddp(cfg, alexnet(num_classes=10), comm, torch.device("cpu"))
    for _ in range(2):  # the second step: the gradients left from the first are kept in place
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    # Views of DDP's buckets: parameters share a bucket's storage (with copies each has its own).
    print(dtype, rank, len({g.untyped_storage().data_ptr() for g in grads}), len(grads))
end_process_groups()
"""


@pytest.mark.timeout(120)
def test_ddp_baseline_gradients_are_views_of_its_buckets():
    """The DDP baseline runs at its copy-free setting (``gradient_as_bucket_view``) with each of
    its hooks: the parameters' gradients live in DDP's buckets, not in buffers of their own that
    every step copies into."""
    out = subprocess.run([sys.executable, "-c", _DDP_VIEWS], capture_output=True, text=True, timeout=100, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == 3, out.stdout
    for _, _, storages, grads in rows:
        assert int(grads) == 16 and int(storages) < int(grads), rows
