"""Entry point: ``torchrun --nproc_per_node=N -m hybridpar.train [overrides]`` or, with K emulated
workers in one process, ``python -m hybridpar.train parallel.emulate=K``.

Every rank runs this; only rank 0 writes the config, logs, metrics and summary.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.errors import record

from hybridpar import runtime
from hybridpar.config import register
from hybridpar.errors import HybridparError
from hybridpar.preemption import EXIT_PREEMPTED, Preempted, StopRequest
from hybridpar.rundir import register_resolvers

# The configs ship inside the package (mapped from the repository's conf/), so an installed
# wheel or a Docker image finds them too.
CONF_DIR = str(files("hybridpar.conf"))
register_resolvers()
register()


def _logging(run_dir: Path, rank0: bool) -> None:
    logger = logging.getLogger("hybridpar")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[hybridpar] %(message)s"))
    logger.addHandler(console)
    if rank0:
        f = logging.FileHandler(run_dir / "train.log")
        f.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(f)


def _summary_text(s: dict) -> str:
    return (
        f"scheme {s['scheme']} on {s['world_size']} worker(s) ({'emulated' if s['emulated'] else 'torch.distributed'}, "
        f"{s['device']}, {s['precision']}): {s['steps']} steps, {s['epochs']:.2f} epochs\n"
        f"held-out top-1 {s['val_top1']:.4f}  top-5 {s['val_top5']:.4f}  train loss {s['train_loss']:.4f}\n"
        f"{s['images_per_s']:.1f} images/s ({s['step_images_per_s']:.1f} by step time alone; "
        f"{s['data_s_per_step'] * 1e3:.1f} ms waiting for data per step); per step {s['step_s'] * 1e3:.1f} ms "
        f"(compute {s['compute_s_per_step'] * 1e3:.1f} ms, communication {s['comm_s_per_step'] * 1e3:.1f} ms), "
        f"{s['comm_bytes_per_step'] / 1e6:.3f} MB sent per worker; wall {s['wall_s']:.1f} s"
    )


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
@record
def main(cfg: DictConfig) -> float | None:
    """One run; returns its held-out top-1 on worker 0 (None elsewhere): the objective a Hydra sweeper
    such as Optuna's maximises."""
    from hybridpar.trainer import train, validate

    t0 = time.perf_counter()
    runtime.adopt_scheduler_env()  # srun / submitit tasks: each process one worker, as under torchrun
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    rank0 = runtime.env_rank() == 0
    _logging(run_dir, rank0)
    try:
        validate(cfg)
        if cfg.trainer.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            import torch

            torch.use_deterministic_algorithms(True)
        with StopRequest() as stop:  # SIGTERM, SIGINT, SIGUSR1: stop after the step, checkpointed
            summary = runtime.run_workers(
                lambda comm, device: train(comm, device, cfg, run_dir, stop),
                emulate=cfg.parallel.emulate,
                timeout_s=cfg.parallel.timeout_s,
                peer_timeout_s=cfg.parallel.peer_timeout_s,
                move_piece_mb=cfg.parallel.move_piece_mb,
            )
    except Preempted as exc:
        if rank0:
            print(f"hybridpar: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except HybridparError as exc:
        # One line, from rank 0 only, and a non-zero exit: no traceback wall from every rank.
        _error_exit(str(exc))
    if rank0 and summary is not None:
        summary["wall_s"] = time.perf_counter() - t0
        summary["run_dir"] = str(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        print(_summary_text(summary), flush=True)
        print(f"run directory: {run_dir}", flush=True)
        return summary["val_top1"]
    return None


def cli() -> None:
    """``main`` with Hydra's composition errors (a wrong type, an unknown key or option) as one
    line and exit code 2, like every other bad input. Hydra prints them over several lines and
    exits 1 unless HYDRA_FULL_ERROR is set, when it raises them instead: we set it and catch.
    A user who sets it gets Hydra's full report, as documented."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as exc:
        _error_exit(_one_line(exc))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


# How long a worker other than 0 waits, after a bad input, for worker 0 to say so and leave.
WORKER0_GRACE_S = 10.0


def _error_exit(message: str) -> None:
    """Worker 0 prints the one line; exit code 2 on every worker.

    Bad input (a config, a launch, a setup error the workers agreed on) is met by every worker,
    and only worker 0 speaks. A worker that left at once could leave first: torchrun then stops
    the others, worker 0 among them, before it has printed, and the user is left without the
    line. So the others wait: torchrun stops them as soon as worker 0 has left, and a launcher
    that does not (srun) has them leave, silent, after ``WORKER0_GRACE_S``."""
    if runtime.env_rank() == 0:
        print(f"hybridpar: error: {message}", file=sys.stderr, flush=True)
    elif runtime.under_torchrun():
        time.sleep(WORKER0_GRACE_S)
    sys.exit(2)


def _one_line(exc: BaseException) -> str:
    """Hydra's message and its cause's, first lines only; a missing option keeps its list."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0].rstrip(".") if lines else type(exc).__name__
    if isinstance(exc, MissingConfigException) and len(lines) > 1 and lines[1].startswith("Available options"):
        options = list(itertools.takewhile(lambda line: not line.startswith("Config search path"), lines[2:]))
        text += f" ({lines[1].rstrip(':').lower()}: {', '.join(options)})"
    if isinstance(exc, OverrideParseException):
        text = f"cannot parse the override {exc.override!r}: {text}"
    if exc.__cause__ is not None:
        text += ": " + str(exc.__cause__).strip().splitlines()[0]
    return text


if __name__ == "__main__":
    cli()
