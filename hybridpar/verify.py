"""Check the hybrid against the single-device model: the truth every parallel path must match.

``python -m hybridpar.verify --workers 4`` runs K emulated workers; ``torchrun
--nproc_per_node=2 -m hybridpar.verify`` runs real processes. Both train a few SGD steps
(momentum 0.9, weight decay 5e-4) from the same seeded model on the same global batches as one
device does, and print the largest differences of logits, loss, every gradient (shards
re-assembled) and the weights after the last step.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.comm.base import Communicator
from hybridpar.models import alexnet_small, build_seeded
from hybridpar.parallel.hybrid import HybridModel, assemble
from hybridpar.parallel.program import SCHEMES

RTOL, ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Case:
    world_size: int
    local_batch: int = 3
    steps: int = 3
    plan: str | tuple[str, ...] = "min_bytes"
    image_size: int = 32
    num_classes: int = 10
    channels: tuple[int, ...] = (8, 16, 24, 16, 16)
    hidden: int = 50
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    scheme: str = "a"
    fc_batch: str = "full"
    comm_dtype: str = "fp32"
    overlap: bool = True
    fc_group_size: int | None = None  # the 2-D hybrid: the head sharded inside groups of this size

    def model(self) -> nn.Module:
        return build_seeded(
            lambda: alexnet_small(self.num_classes, dropout=0.0, channels=self.channels, hidden=self.hidden), self.seed
        )

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed + 1)
        n = self.world_size * self.local_batch
        return [
            (
                torch.randn(n, 3, self.image_size, self.image_size, generator=g),
                torch.randint(0, self.num_classes, (n,), generator=g),
            )
            for _ in range(self.steps)
        ]

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def _params(model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    # (fc_batch=chunk leaves the head's gradients spent: they are None after the step.)
    pick = {n: (p.grad if what == "grad" else p) for n, p in model.named_parameters()}
    return {n: t.detach().clone() for n, t in pick.items() if t is not None}


def hybrid_worker(comm: Communicator, case: Case, model: nn.Module | None = None) -> dict:
    """One worker's run of ``case``: what it saw at step 0 and its weights after the last step."""
    hybrid = HybridModel(
        model if model is not None else case.model(),
        comm,
        plan=case.plan,
        seed=case.seed,
        comm_dtype=torch.bfloat16 if case.comm_dtype == "bf16" else None,
        overlap=case.overlap,
        fc_group_size=case.fc_group_size,
    )
    opt = case.optimizer(hybrid.parameters())
    lo, hi = comm.rank * case.local_batch, (comm.rank + 1) * case.local_batch
    out: dict = {
        "specs": hybrid.shard_specs(),
        "styles": hybrid.styles,
        "group_size": hybrid.comm.world_size,
        "trunk": [n for n, _ in hybrid.named_parameters() if not hybrid.split.is_head_parameter(n)],
    }
    for step, (x, y) in enumerate(case.batches()):
        comm.ledger.reset()
        opt.zero_grad(set_to_none=True)
        loss, logits = hybrid.train_step(x[lo:hi], y[lo:hi], scheme=case.scheme, fc_batch=case.fc_batch, optimizer=opt)
        if step == 0:
            # Rounds take each worker's rows in order, so the logits come back in batch order.
            out |= {"logits": logits, "loss": loss, "grads": _params(hybrid, "grad")}
            out |= {"sent": comm.ledger.sent, "received": comm.ledger.received, "by_tag": comm.ledger.by_tag()}
        opt.step()
    out["weights"] = _params(hybrid, "weight")
    return out


def reference(case: Case, model: nn.Module | None = None) -> dict:
    """The single device on the concatenated K·b batch."""
    model = model if model is not None else case.model()
    opt = case.optimizer(model.parameters())
    out: dict = {}
    for step, (x, y) in enumerate(case.batches()):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if step == 0:
            out |= {"logits": logits.detach(), "loss": loss.detach(), "grads": _params(model, "grad")}
        opt.step()
    out["weights"] = _params(model, "weight")
    return out


def compare(
    workers: Sequence[dict], ref: dict, rtol: float = RTOL, atol: float = ATOL, check: bool = True
) -> dict[str, float]:
    """Largest absolute differences between the re-assembled workers and the reference.

    With ``check``, asserts ``torch.testing.assert_close`` at (rtol, atol) and that the trunk
    replicas are bit-identical across workers.
    """
    specs = workers[0]["specs"]
    G = workers[0].get("group_size", len(workers))  # the first group holds every shard once
    got = {
        "logits": torch.cat([w["logits"] for w in workers]),
        "loss": sum(w["loss"] for w in workers),
        "grads": assemble([w["grads"] for w in workers[:G]], specs),
        "weights": assemble([w["weights"] for w in workers[:G]], specs),
    }
    errors = {}
    for key in ("logits", "loss"):
        errors[key] = (got[key] - ref[key]).abs().max().item()
        if check:
            torch.testing.assert_close(got[key], ref[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    for key in ("grads", "weights"):
        if check and set(got[key]) != set(ref[key]):
            raise AssertionError(f"{key}: parameter names differ: {sorted(set(got[key]) ^ set(ref[key]))}")
        for name, expected in ref[key].items():
            actual = got[key][name]
            if check:
                torch.testing.assert_close(
                    actual, expected, rtol=rtol, atol=atol, msg=lambda m, k=f"{key}[{name}]": f"{k}: {m}"
                )
            errors[key] = max(errors.get(key, 0.0), (actual - expected).abs().max().item())
    if check:
        for name in workers[0]["trunk"]:
            for r, w in enumerate(workers[1:], 1):
                if not torch.equal(w["weights"][name], workers[0]["weights"][name]):
                    raise AssertionError(f"trunk replica {name} on worker {r} differs from worker 0")
        for name in specs:  # 2-D: the K/G copies of each head shard stay identical
            for r, w in enumerate(workers[G:], G):
                if not torch.equal(w["weights"][name], workers[r % G]["weights"][name]):
                    raise AssertionError(f"head shard {name} on worker {r} differs from its replica on worker {r % G}")
    return errors


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="emulated workers (ignored under torchrun)")
    ap.add_argument("--batch", type=int, default=3, help="local batch per worker")
    ap.add_argument("--plan", default="min_bytes", help="head layout: min_bytes | paper | e.g. row,row,row")
    ap.add_argument("--hidden", type=int, default=50)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--scheme", default="a", choices=SCHEMES)
    args = ap.parse_args(argv)
    plan = tuple(args.plan.split(",")) if "," in args.plan else args.plan
    under_torchrun = "LOCAL_RANK" in os.environ
    if under_torchrun:
        import torch.distributed as dist

        from hybridpar.comm import DistCommunicator

        dist.init_process_group("gloo")
        world = dist.get_world_size()
    else:
        world = args.workers
    case = Case(
        world, local_batch=args.batch, plan=plan, hidden=args.hidden, num_classes=args.classes, scheme=args.scheme
    )
    if under_torchrun:
        mine = hybrid_worker(DistCommunicator(), case)
        workers: list = [None] * world
        dist.all_gather_object(workers, mine)
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        from hybridpar.comm import run_emulated

        workers = run_emulated(world, hybrid_worker, case)
    ref = reference(case)
    errors = compare(workers, ref, check=False)
    print(f"K={world} b={case.local_batch} scheme {case.scheme} head layout {'/'.join(workers[0]['styles'])}")
    for k, v in errors.items():
        print(f"  max |hybrid - single device| {k:8s} {v:.3e}")
    print(f"  bytes sent per worker in step 0: {[w['sent'] for w in workers]}")
    try:
        compare(workers, ref)
    except AssertionError as exc:
        raise SystemExit(f"NOT equal to the single device at rtol={RTOL}, atol={ATOL}: {exc}") from None
    print(f"  equal to the single device at rtol={RTOL}, atol={ATOL}")


if __name__ == "__main__":
    main()
