"""Export a checkpoint as a plain single-device ``state_dict``.

    python -m hybridpar.export CHECKPOINT OUT.pt

CHECKPOINT is a checkpoint directory (``.../checkpoints/step-00001000``), a checkpoints
directory or a run directory (then its newest valid checkpoint). The names are the single-device
model's, so for ``model=alexnet`` the file loads into ``torchvision.models.alexnet(num_classes=N)``
with ``strict=True``; ``model.init_from=OUT.pt`` starts a new run from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hybridpar import checkpoint


def resolve(path: Path) -> Path:
    if (path / "meta.json").exists():
        return path
    for root in (path, path / "checkpoints"):
        found = checkpoint.latest(root)
        if found is not None:
            return found[0]
    raise checkpoint.CheckpointError(
        f"{path}: no valid checkpoint there (looked for meta.json, and step-* in it and in checkpoints/)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hybridpar.export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    try:
        path = resolve(args.checkpoint)
        sd = checkpoint.full_state_dict(path)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        torch.save(sd, tmp)
        tmp.replace(args.out)  # never a half-written OUT.pt
    except (checkpoint.CheckpointError, OSError) as exc:
        print(f"hybridpar.export: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    n = sum(t.numel() for t in sd.values())
    print(f"exported {path} ({len(sd)} tensors, {n:,} values) to {args.out}")


if __name__ == "__main__":
    main()
