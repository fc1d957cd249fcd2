"""Checkpoints: exact resume after a kill, K→K' resharding, torchvision export, init_from, broken
and foreign checkpoints, NaN losses, a SIGKILLed worker under torchrun, a silent peer."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from hybridpar import checkpoint, export
from hybridpar.comm import run_emulated
from hybridpar.models import alexnet, build_seeded
from hybridpar.parallel import HybridModel
from tests.helpers import compose_train, concurrently, run_cmd, start_workers, train_here

PY = sys.executable
TRAIN = [PY, "-m", "hybridpar.train"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
QUIET = ["logger=none", "trainer.progress=false"]


def _run(cmd, cwd, timeout=240, **env):
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
    if "HYBRIDPAR_FAULT" not in env:
        environ.pop("HYBRIDPAR_FAULT", None)
    return run_cmd(cmd, cwd=cwd, env=environ, timeout=timeout)


def _train(run_dir: Path, *overrides: str, K: int = 2, fault: str | None = None, timeout: int = 240):
    env = {"HYBRIDPAR_FAULT": fault} if fault else {}
    return _run(
        [*TRAIN, f"parallel.emulate={K}", *QUIET, f"hydra.run.dir={run_dir}", *overrides],
        run_dir.parent,
        timeout,
        **env,
    )


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    found = checkpoint.latest(run_dir / "checkpoints")
    assert found is not None, f"no checkpoint in {run_dir}"
    return checkpoint.full_state_dict(found[0])


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hybridpar: error:")]
    assert len(lines) == 1 and proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


EXACT = ["trainer.max_steps=8", "checkpoint.every_steps=3", "trainer.deterministic=true", "checkpoint.keep_last=null"]


@pytest.mark.timeout(300)
def test_killed_run_resumes_to_the_exact_same_weights(tmp_path, emulated_reference):
    """Dropout on (0.5), augmentation on: the RNG streams, momentum, LR schedule and data position
    all come back, so the resumed run ends bit-identical to the uninterrupted one (launched in the
    background: it trains while this test's runs do)."""
    killed = _train(tmp_path / "run", *EXACT, fault="kill@5")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000003"]
    resumed = _train(tmp_path / "run", *EXACT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 8
    ref = emulated_reference.result()
    a, b = _final(ref), _final(tmp_path / "run")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # The check can fail: one step fewer is not the same weights.
    assert not all(torch.equal(a[n], checkpoint.full_state_dict(ref / "checkpoints" / "step-00000006")[n]) for n in a)


RESHARD = ["trainer.max_steps=8", "checkpoint.every_steps=4", "data.global_batch=24", "model.dropout=0.0"]


@pytest.mark.timeout(400)
def test_resharding_across_world_sizes_matches_the_uninterrupted_run(tmp_path):
    """The same 24 examples make each global batch for every K, so a checkpoint written by K
    workers continues on K' and ends where the uninterrupted K-worker run ends (fp32)."""
    # The killed runs need processes of their own; the reference and the resumed runs are the app's
    # training in this process (no interpreter to start).
    train_here(tmp_path / "ref", *RESHARD, K=2)
    want = _final(tmp_path / "ref")
    # The K = 2 and K = 1 runs killed after step 6, launched together (independent).
    killed = concurrently(*(lambda K=K: _train(tmp_path / f"k{K}", *RESHARD, K=K, fault="kill@6") for K in (2, 1)))
    assert [run.returncode for run in killed] == [-9, -9], [run.stderr[-2000:] for run in killed]
    for K, K2 in ((2, 1), (2, 3), (1, 4)):
        first = tmp_path / f"k{K}"
        step4 = first / "checkpoints" / "step-00000004"
        second = tmp_path / f"k{K}to{K2}"
        assert train_here(second, *RESHARD, f"checkpoint.resume={step4}", K=K2)["resumed_from_step"] == 4
        got = _final(second)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=f"{K}->{K2}: {n}")
        moved = max((got[n] - checkpoint.full_state_dict(step4)[n]).abs().max().item() for n in want)
        assert moved > 1e-4, "the resumed run did not train"


def _save_alexnet(comm, root: Path, x: torch.Tensor):
    model = HybridModel(build_seeded(lambda: alexnet(10, dropout=0.5), 0), comm)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    b = x.shape[0] // comm.world_size
    mine = x[comm.rank * b : (comm.rank + 1) * b]
    model.train_step(mine, torch.arange(b) % 10, scheme="a", optimizer=opt)
    opt.step()
    checkpoint.save(
        comm,
        root,
        model=model,
        plain=model,
        optimizer=opt,
        position=checkpoint.Position(1, 0, 1),
        schedule_state={},
        scheme="a",
        config_yaml="",
        keep_last=None,
    )
    model.eval()
    with torch.no_grad():
        return model(mine)


@pytest.mark.timeout(300)
def test_export_loads_into_torchvision_with_the_same_logits(tmp_path):
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    logits = torch.cat(run_emulated(2, _save_alexnet, tmp_path / "ck", x))
    out = tmp_path / "alexnet.pt"
    proc = _run([PY, "-m", "hybridpar.export", str(tmp_path / "ck"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    tv = torchvision.models.alexnet(num_classes=10)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    tv.eval()
    with torch.no_grad():
        torch.testing.assert_close(tv(x), logits, rtol=1e-5, atol=1e-5)
    # init_from shards the plain file on load: the hybrid starts from exactly these weights.
    from hybridpar.trainer import _init_from

    fresh = build_seeded(lambda: alexnet(10), 1)
    _init_from(fresh, str(out))
    for n, t in torch.load(out, weights_only=True).items():
        assert torch.equal(fresh.state_dict()[n], t), n


@pytest.mark.timeout(300)
def test_init_from_a_state_dict_and_refusing_one_that_does_not_fit(tmp_path):
    # The run whose weights are exported, and the export from its run directory: the app's training and
    # the exporter's entry point in this process (no interpreter to start; the export test runs its command).
    train_here(tmp_path / "a", "trainer.max_steps=2", "checkpoint.every_steps=null", K=2)
    sd_file = tmp_path / "small.pt"
    export.main([str(tmp_path / "a"), str(sd_file)])
    sd = torch.load(sd_file, weights_only=True)
    # Its only step is skipped (a NaN batch, skip_nonfinite): the final checkpoint holds the
    # weights the run started from. And a model it does not fit: launched together (independent).
    same, bad = concurrently(
        lambda: _train(
            tmp_path / "b",
            "trainer.max_steps=1",
            f"model.init_from={sd_file}",
            "trainer.skip_nonfinite=true",
            fault="nan@1",
        ),
        lambda: _train(tmp_path / "c", "trainer.max_steps=1", f"model.init_from={sd_file}", "model.hidden=64"),
    )
    assert same.returncode == 0, same.stderr[-2000:]
    got = _final(tmp_path / "b")
    for n in sd:
        assert torch.equal(got[n], sd[n]), n
    assert "does not fit this model" in _error_line(bad)


@pytest.mark.timeout(300)
def test_broken_foreign_and_malicious_checkpoints_are_refused_in_one_line(tmp_path):
    # The checkpoints to break: the app's training in this process (no interpreter to start).
    train_here(tmp_path / "a", "trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=null", K=2)
    root = tmp_path / "a" / "checkpoints"
    good, newest = root / "step-00000002", root / "step-00000004"

    # A write killed before its rename leaves only a .tmp directory: never read.
    shutil.copytree(newest, root / ".step-00000006.tmp")
    (root / ".step-00000006.tmp" / "meta.json").unlink()
    assert checkpoint.latest(root)[0] == newest
    # A truncated file in the newest checkpoint: auto-resume falls back to the one before.
    victim = newest / "worker-001.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert checkpoint.latest(root)[0] == good
    # Named explicitly, a broken checkpoint (a copy of step 2's, made before the resume below runs) is
    # an error, not a fallback. The two runs are independent: launched together.
    shutil.copytree(good, tmp_path / "broken")
    (tmp_path / "broken" / "worker-000.pt").write_bytes(b"\0" * 10)
    proc, broken = concurrently(
        lambda: _train(tmp_path / "a", "trainer.max_steps=4", "checkpoint.every_steps=2"),
        lambda: _train(tmp_path / "b", "trainer.max_steps=4", f"checkpoint.resume={tmp_path / 'broken'}"),
    )
    assert proc.returncode == 0 and json.loads((tmp_path / "a" / "summary.json").read_text())["resumed_from_step"] == 2
    # One line from the command line ...
    assert "truncated" in _error_line(broken)
    # ... and the same resume path, in process, for the rest: not a checkpoint at all,
    assert "not a hybridpar checkpoint" in _resume_error(tmp_path)
    # another model (other head width): refused before any weight is touched,
    assert "written for another model" in _resume_error(good, "model.hidden=64")
    # another class count (its meta says 7 classes; this model has 10),
    foreign = _resume_error(_with_classes(good, tmp_path))
    assert "written for another model" in foreign and "[7" in foreign
    # a file with code in it: weights_only refuses to unpickle it; the code never runs.
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"
    torch.save({"tensors": {}, "rng": {}, "lr": [], "x": _Evil(str(marker))}, evil / "worker-000.pt")
    meta = json.loads((evil / "meta.json").read_text())
    meta["files"]["worker-000.pt"] = {
        "bytes": (evil / "worker-000.pt").stat().st_size,
        "sha256": checkpoint._sha256(evil / "worker-000.pt"),
    }
    (evil / "meta.json").write_text(json.dumps(meta))
    assert "cannot be read as a checkpoint file" in _resume_error(evil)
    assert not marker.exists()


def _resume_error(path: Path, *overrides: str) -> str:
    """The error the training app's resume step raises for ``checkpoint.resume=path`` (two emulated workers,
    the command line's default model with ``overrides``): what ``_error_line`` would show, without a launch."""
    from hybridpar.trainer import _resume, setup

    cfg = compose_train(f"checkpoint.resume={path}", "parallel.emulate=2", *overrides)

    def resume(comm):
        _resume(comm, cfg, path, setup(comm, torch.device("cpu"), cfg), schedule=None)

    with pytest.raises(checkpoint.CheckpointError) as info:
        run_emulated(2, resume)
    return str(info.value)


def _with_classes(good: Path, tmp_path: Path) -> Path:
    """A copy of ``good`` whose meta says the last layer had 7 classes (a foreign checkpoint)."""
    out = tmp_path / "classes7"
    shutil.copytree(good, out)
    meta = json.loads((out / "meta.json").read_text())
    last = [n for n in meta["shapes"] if n.startswith("classifier")][-1]
    meta["shapes"][last][0] = 7
    (out / "meta.json").write_text(json.dumps(meta))
    return out


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


NAN_RUNS = {  # each fed NaN images at step 3
    "stop": ["trainer.max_steps=6", "checkpoint.every_steps=2"],
    "skip": ["trainer.max_steps=6", "trainer.skip_nonfinite=true"],
    "chunk": [
        "trainer.max_steps=3",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=null",
        "trainer.skip_nonfinite=true",
        "parallel.scheme=b",
        "parallel.fc_batch=chunk",
    ],
}


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """The runs of the two NaN tests below, launched together (independent, nothing timed): each
    one's run directory and process."""
    tmp = tmp_path_factory.mktemp("nan")
    runs = concurrently(*(lambda k=k: _train(tmp / k, *NAN_RUNS[k], fault="nan@3") for k in NAN_RUNS))
    return {k: (tmp / k, run) for k, run in zip(NAN_RUNS, runs, strict=True)}


@pytest.mark.timeout(300)
def test_nan_loss_stops_naming_the_step_or_is_skipped(nan_runs):
    (a, stop), (b, skip) = nan_runs["stop"], nan_runs["skip"]
    assert "non-finite loss at step 3" in _error_line(stop)
    assert [p.name for p in checkpoint.checkpoints(a / "checkpoints")] == ["step-00000002"]
    checkpoint.verify(a / "checkpoints" / "step-00000002")  # intact
    assert skip.returncode == 0, skip.stderr[-2000:]
    summary = json.loads((b / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 1 and summary["steps"] == 6
    assert all(torch.isfinite(t).all() for t in _final(b).values())


@pytest.mark.timeout(300)
def test_nan_loss_in_chunk_mode_leaves_the_head_of_the_last_good_step(nan_runs):
    """fc_batch=chunk updates the head inside the step: a NaN step must still leave every weight
    (head shards included) as the previous step left them (the momentum: test_schemes)."""
    c, run = nan_runs["chunk"]
    assert run.returncode == 0, run.stderr[-2000:]
    step2 = checkpoint.full_state_dict(c / "checkpoints" / "step-00000002")
    step3 = checkpoint.full_state_dict(c / "checkpoints" / "step-00000003")
    assert any(k.startswith("classifier.") for k in step2)
    for name, t in step2.items():
        assert torch.equal(t, step3[name]), name


# The torchrun runs of this file and test_preemption.py: one uninterrupted reference serves both (conftest.py).
TORCH_EXACT_10 = ["trainer.max_steps=10", "checkpoint.every_steps=3", "trainer.deterministic=true", *QUIET]


@pytest.mark.timeout(600)
def test_sigkilled_worker_restarts_under_torchrun_and_ends_identical(tmp_path, torchrun_reference):
    run = _run(
        [*TORCHRUN, "--max-restarts=2", "-m", "hybridpar.train", *TORCH_EXACT_10, f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        280,
        HYBRIDPAR_FAULT="kill@5:1",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SIGKILL" in run.stderr or "Signal 9" in run.stderr or "-9" in run.stderr, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 10
    got = _final(tmp_path / "run")
    want = torchrun_reference.result()  # launched in the background: it trained while this test's run did
    for n in want:
        assert torch.equal(want[n], got[n]), n


def _silent_peer(rank: int, store: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from hybridpar.comm import DistCommunicator
    from hybridpar.runtime import end_process_groups

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3)
    )
    comm = DistCommunicator()
    if rank == 1:
        deadline = time.monotonic() + 12  # alive, connected, but never joins the collective: until
        while not Path(out).exists() and time.monotonic() < deadline:  # worker 0 has its error
            time.sleep(0.05)
    else:
        t0 = time.monotonic()
        try:
            comm.all_reduce(torch.ones(4), tag="trunk_grads")
            result = "no error"
        except Exception as exc:  # noqa: BLE001
            result = f"{type(exc).__name__}: {exc}"
        Path(out).write_text(json.dumps({"error": result, "seconds": time.monotonic() - t0}))
    del comm
    end_process_groups()


@pytest.mark.timeout(120)
def test_a_silent_peer_is_an_error_naming_the_collective(tmp_path):
    ctx = start_workers(_silent_peer, (str(tmp_path / "store"), str(tmp_path / "out.json")), 2, str(tmp_path))
    ctx.join(timeout=60)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["error"].startswith("PeerLostError: worker 0: all_reduce 'trunk_grads' did not complete"), got
    assert got["seconds"] < 10, got
