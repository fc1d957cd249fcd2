"""One run directory per launch, the same on every rank.

Hydra names its output directory before any process group exists, on every rank separately,
so the name must come from what all ranks of one launch already share: torchrun's
``TORCHELASTIC_RUN_ID`` (a fresh id with ``--standalone``, the ``--rdzv-id`` otherwise; a
restart under ``--max-restarts`` keeps it, and so the directory). A static launch (run id
``none``, e.g. plain ``torchrun --nproc_per_node=N``) falls back to the master address and port
and the minute the launch started (ranks start within a second or two; should they straddle a
minute, the second directory stays empty, since only rank 0 writes). Without torchrun it is a
timestamp.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import OmegaConf


def run_name() -> str:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if "RANK" in os.environ:
        where = f"{os.environ.get('MASTER_ADDR', 'localhost')}-{os.environ.get('MASTER_PORT', '0')}"
        return f"static-{where}-{time.strftime('%Y-%m-%d_%H-%M')}"
    return time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}"


def rank0_only(value: str) -> str | None:
    """``value`` on rank 0, ``None`` elsewhere (e.g. Hydra's output_subdir: only rank 0 writes)."""
    return value if int(os.environ.get("RANK", "0")) == 0 else None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("hp_run_name"):
        # Cached: Hydra resolves the run dir more than once per job, the timestamp must not move.
        OmegaConf.register_new_resolver("hp_run_name", run_name, use_cache=True)
    if not OmegaConf.has_resolver("hp_rank0"):
        OmegaConf.register_new_resolver("hp_rank0", rank0_only)


def sweep_group(run_dir: Path) -> str | None:
    """The W&B group of a multirun job: its sweep directory's name; None for a single run."""
    return run_dir.parent.name if run_dir.parent.parent.name == "multirun" else None
