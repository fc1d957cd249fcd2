"""The training loop one worker runs, the same under torchrun and in emulation.

Read it top to bottom: set up (data, model, optimiser; any error agreed by all workers before
the first collective), then the steps, each one ``forward → loss → backward → sync → update``,
with evaluation on the held-out set at the end of every epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from hybridpar import checkpoint, faults
from hybridpar.comm import Communicator, DistCommunicator
from hybridpar.comm.base import Agreement
from hybridpar.config import unknown_keys
from hybridpar.data import LOADERS, build_datasets, eval_batches, train_loader
from hybridpar.errors import ConfigError, HybridparError
from hybridpar.models import build_model
from hybridpar.models.split import split_model
from hybridpar.optim import Schedule, learning_rates, sgd
from hybridpar.outputs import Meter, Outputs
from hybridpar.parallel import HybridModel
from hybridpar.parallel.data_parallel import allreduce_gradients, ledger_allreduce_hook
from hybridpar.parallel.head import fewest_bytes_group
from hybridpar.parallel.hybrid import TRUNK_SYNCS
from hybridpar.parallel.program import SCHEMES as HYBRID_SCHEMES
from hybridpar.preemption import Preempted, StopRequest

log = logging.getLogger("hybridpar")

SCHEMES = (*HYBRID_SCHEMES, "ddp")
PRECISIONS = ("fp32", "bf16")
LR_SCALES = {"none": lambda K: 1.0, "sqrt": math.sqrt, "linear": float}


class SetupFailed(HybridparError):
    """Another worker could not set up; this one stops with it."""


class NonFiniteLoss(HybridparError):
    """The loss of a step is NaN or infinite (and trainer.skip_nonfinite is off)."""


@dataclass
class Setup:
    model: nn.Module  # what forward() is called on (HybridModel, DDP, or the replicated model)
    plain: nn.Module  # the module without a DDP wrapper (for evaluation)
    optimizer: torch.optim.Optimizer
    local_batch: int
    loader: torch.utils.data.DataLoader
    val: torch.utils.data.Dataset
    num_classes: int


def local_batch_size(data_cfg: DictConfig, world_size: int) -> int:
    b, g = data_cfg.batch_size, data_cfg.global_batch
    if g is not None:
        if g < 1 or g % world_size:
            raise ConfigError(f"data.global_batch={g} cannot be split evenly over {world_size} workers")
        return g // world_size
    if b < 1:
        raise ConfigError(f"data.batch_size must be a positive integer (images per worker), got {b!r}")
    return b


def validate(cfg: DictConfig) -> None:
    """Checks that need no data and no other worker: run on every rank before anything else.
    (Types were checked by Hydra against ``hybridpar/config.py``; these are the keys '+' added and
    the values.)"""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(
            f"unknown config key(s) {', '.join(extra)}: no such setting (`python -m hybridpar.train --cfg job` shows them all)"
        )
    if cfg.parallel.scheme not in SCHEMES:
        raise ConfigError(f"parallel.scheme={cfg.parallel.scheme!r} is not one of {', '.join(SCHEMES)}")
    if cfg.parallel.fc_batch not in ("full", "chunk"):
        raise ConfigError(f"parallel.fc_batch={cfg.parallel.fc_batch!r} is not one of full, chunk")
    if cfg.parallel.fc_batch == "chunk" and cfg.parallel.scheme not in ("b", "c"):
        raise ConfigError(
            f"parallel.fc_batch=chunk updates the head after each round: it needs parallel.scheme=b or c, not {cfg.parallel.scheme!r}"
        )
    if not cfg.parallel.timeout_s > 0:
        raise ConfigError(f"parallel.timeout_s must be a positive number of seconds, got {cfg.parallel.timeout_s!r}")
    for key, unit, off in (("peer_timeout_s", "seconds", "off"), ("move_piece_mb", "MB", "moves whole")):
        value = cfg.parallel[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ConfigError(f"parallel.{key} must be a positive number of {unit} or null ({off}), got {value!r}")
    if cfg.trainer.channels_last not in (True, False, "auto"):
        raise ConfigError(f"trainer.channels_last must be true, false or auto, got {cfg.trainer.channels_last!r}")
    if cfg.parallel.trunk_powersgd_rank < 0:
        raise ConfigError(
            f"parallel.trunk_powersgd_rank must be 0 (off) or a rank >= 1, got {cfg.parallel.trunk_powersgd_rank}"
        )
    if cfg.parallel.trunk_powersgd_rank and (
        cfg.parallel.trunk_sync != "bucketed" or cfg.parallel.trunk_comm_dtype != "fp32"
    ):
        raise ConfigError(
            "parallel.trunk_powersgd_rank runs with parallel.trunk_sync=bucketed and parallel.trunk_comm_dtype=fp32 "
            "(it compresses whole parameters, one compression at a time)"
        )
    if cfg.parallel.chunk_trunk and cfg.parallel.scheme not in ("b", "c"):
        raise ConfigError(
            f"parallel.chunk_trunk runs the trunk round by round: it needs parallel.scheme=b or c, not "
            f"{cfg.parallel.scheme!r} (scheme a: parallel.micro_batches)"
        )
    if cfg.parallel.micro_batches < 1 or (cfg.parallel.micro_batches > 1 and cfg.parallel.scheme != "a"):
        raise ConfigError(
            f"parallel.micro_batches={cfg.parallel.micro_batches} must be a positive integer, above 1 only with "
            f"parallel.scheme=a (schemes b and c have their rounds: parallel.chunk_trunk)"
        )
    if cfg.parallel.trunk_sync not in TRUNK_SYNCS:
        raise ConfigError(f"parallel.trunk_sync={cfg.parallel.trunk_sync!r} is not one of {', '.join(TRUNK_SYNCS)}")
    for key in ("comm_dtype", "trunk_comm_dtype"):
        if cfg.parallel[key] not in PRECISIONS:
            raise ConfigError(f"parallel.{key}={cfg.parallel[key]!r} is not one of fp32, bf16")
    _validate_loader(cfg.data)
    if cfg.optim.conv_lr_scale not in LR_SCALES:
        raise ConfigError(f"optim.conv_lr_scale={cfg.optim.conv_lr_scale!r} is not one of {', '.join(LR_SCALES)}")
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.trainer.max_steps is None and cfg.trainer.epochs < 1:
        raise ConfigError(f"trainer.epochs must be a positive integer, got {cfg.trainer.epochs!r}")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be a positive integer or null, got {cfg.trainer.max_steps!r}")


def _validate_loader(data: DictConfig) -> None:
    """``data.loader`` before any worker starts: a DALI run on a machine without DALI is one line, not a
    traceback from every worker after the rendezvous."""
    if data.loader not in LOADERS:
        raise ConfigError(f"data.loader={data.loader!r} is not one of {', '.join(LOADERS)}")
    if data.loader == "dali":
        if data.name != "imagenet":
            raise ConfigError(f"data.loader=dali reads image folders: it needs data=imagenet, not data={data.name}")
        from hybridpar.data.dali import require_dali

        require_dali()


def _agreed(comm: Communicator, fn):
    """Run ``fn()`` on every worker; if any worker fails with a HybridparError, all of them raise.

    Setup can fail on one rank only (a missing file on one node): without this, its peers would
    wait in their first collective until the timeout.
    """
    try:
        result, failure = fn(), None
    except HybridparError as exc:
        result, failure = None, exc
    errors = comm.gather_objects(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is not None:
        raise SetupFailed(f"worker {first[0]}: {first[1]}")
    return result


def setup(comm: Communicator, device: torch.device, cfg: DictConfig) -> Setup:
    K = comm.world_size
    b = local_batch_size(cfg.data, K)
    data = build_datasets(cfg.data)
    full = build_model(cfg.model, data.num_classes, data.in_channels, cfg.seed)
    if cfg.model.init_from:
        _init_from(full, cfg.model.init_from)
    split = split_model(full, cfg.model.head)

    if cfg.parallel.scheme != "ddp":
        model = plain = _hybrid(cfg, full, comm, device, b)
    else:
        compressed = cfg.parallel.trunk_comm_dtype != "fp32" or cfg.parallel.trunk_powersgd_rank
        if compressed and K > 1 and not isinstance(comm, DistCommunicator):
            raise ConfigError(
                "the DDP baseline compresses with torch's DDP hooks, which need torchrun: "
                "the emulated workers average in fp32 (drop trunk_comm_dtype / trunk_powersgd_rank)"
            )
        plain = full.to(device)
        model = _ddp(cfg, plain, comm, device) if isinstance(comm, DistCommunicator) and K > 1 else plain
    # The conv layers see a batch of K·b per update (the loss is the mean over it); the paper's
    # variance argument scales their rate by √K relative to the configured one, linear by K.
    conv_lr = cfg.optim.lr * LR_SCALES[cfg.optim.conv_lr_scale](K)
    groups = [
        {
            "name": "conv",
            "params": [p for n, p in plain.named_parameters() if not split.is_head_parameter(n)],
            "lr": conv_lr,
        },
        {"name": "fc", "params": [p for n, p in plain.named_parameters() if split.is_head_parameter(n)]},
    ]
    optimizer = sgd(groups, cfg.optim)
    loader = train_loader(
        data.train,
        local_batch=b,
        rank=comm.rank,
        world_size=K,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        loader=cfg.data.loader,
        device=device,
    )
    _fast_path(cfg, model if cfg.parallel.scheme != "ddp" else plain, split.trunk_module_names(), device)
    return Setup(model, plain, optimizer, b, loader, data.val, data.num_classes)


def _hybrid(cfg: DictConfig, full: nn.Module, comm: Communicator, device: torch.device, b: int) -> HybridModel:
    p = cfg.parallel
    return HybridModel(
        full,
        comm,
        plan=_plan(p.plan),
        head=cfg.model.head,
        seed=cfg.seed,
        comm_dtype=torch.bfloat16 if p.comm_dtype == "bf16" else None,
        overlap=p.overlap,
        bucket_cap=int(p.bucket_mb * 2**20 / 4),
        fc_group_size=_group_size(cfg, full, comm.world_size, b),
        sync_bn=p.sync_bn,
        trunk_sync=p.trunk_sync,
        trunk_comm_dtype=torch.bfloat16 if p.trunk_comm_dtype == "bf16" else None,
        chunk_trunk=p.chunk_trunk,
        micro_batches=p.micro_batches,
        trunk_powersgd_rank=p.trunk_powersgd_rank,
        defer_wgrad=p.defer_wgrad,
    ).to(device)


def _ddp(cfg: DictConfig, plain: nn.Module, comm: DistCommunicator, device: torch.device) -> nn.Module:
    """The DDP baseline with the same compression settings as the hybrid's trunk, by torch's own
    hooks: bf16 (bytes in the ledger) or PowerSGD (not). PowerSGD's hook issues its follow-up
    all-reduces from future callbacks, whose order across two buckets in flight differs between
    workers on gloo (a reset connection, seen on two hosts): one bucket for the whole model."""
    rank = cfg.parallel.trunk_powersgd_rank
    model = nn.parallel.DistributedDataParallel(
        plain,
        device_ids=[device] if device.type == "cuda" else None,
        process_group=comm.group,
        # Gradients as views of DDP's buckets: no copy between them each step and no second
        # set of gradient buffers (the baseline at its best settings; 244 MB for AlexNet).
        gradient_as_bucket_view=True,
        **({"bucket_cap_mb": 2**16} if rank else {}),
    )
    if rank:
        state = powerSGD_hook.PowerSGDState(comm.group, matrix_approximation_rank=rank, start_powerSGD_iter=2)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return model
    bf16 = cfg.parallel.trunk_comm_dtype == "bf16"
    model.register_comm_hook(
        comm, default_hooks.bf16_compress_wrapper(ledger_allreduce_hook) if bf16 else ledger_allreduce_hook
    )
    return model


def _fast_path(cfg: DictConfig, model: nn.Module, trunk_names: list[str], device: torch.device) -> None:
    """The GPU fast path, each part switchable (all of it runs on a CPU too): channels_last for the
    trunk's convolutions, torch.compile of the trunk's modules (in place: the parameter names stay),
    cuDNN autotuning. bf16 autocast and pinned, non-blocking input copies are set elsewhere."""
    if channels_last(cfg):
        model.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        for n in trunk_names:
            model.get_submodule(n).compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark and not cfg.trainer.deterministic


def channels_last(cfg: DictConfig) -> bool:
    """``trainer.channels_last``, ``auto`` resolved: on for hybridpar's and torchvision's models (they
    flatten with ``torch.flatten``, which takes any layout; on 2 CPU cores the small AlexNet's step is
    1.2× faster with it), off for a user's model, whose forward may ``.view()`` a conv output."""
    mode = cfg.trainer.channels_last
    return cfg.model.name != "custom" if mode == "auto" else bool(mode)


def _inputs(x: torch.Tensor, device: torch.device, cfg: DictConfig) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last(cfg) and x.dim() == 4 else x


def _init_from(model: nn.Module, path: str) -> None:
    """Start from a plain single-device state_dict (e.g. torchvision's AlexNet trained elsewhere);
    the hybrid shards it when it wraps the model."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from={path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - anything unreadable or with code in it
        raise ConfigError(
            f"model.init_from={path} is not a state_dict file torch can load safely ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"model.init_from={path} does not hold a state_dict (name -> tensor)")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from={path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in sd.items():
        if t.shape != own[name].shape:
            raise ConfigError(
                f"model.init_from={path} does not fit this model: {name} is {list(t.shape)} there, {list(own[name].shape)} here"
            )
    model.load_state_dict(sd, strict=True)


def _group_size(cfg: DictConfig, model: nn.Module, K: int, b: int) -> int | None:
    """``parallel.fc_group_size``: null (the head over all K workers), an int, or auto (the planner's
    fewest-bytes choice)."""
    G = cfg.parallel.fc_group_size
    if G is None:
        return None
    if G == "auto":
        return fewest_bytes_group(model, K, b, _plan(cfg.parallel.plan), cfg.model.head)
    if not isinstance(G, int) or isinstance(G, bool):
        raise ConfigError(f"parallel.fc_group_size={G!r} must be null, auto or a positive integer dividing the workers")
    return G


def _plan(plan: Any) -> Any:
    return tuple(plan) if OmegaConf.is_list(plan) or isinstance(plan, list | tuple) else plan


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(comm: Communicator, device: torch.device, cfg: DictConfig, s: Setup) -> dict[str, float]:
    """Exact held-out loss, top-1 and top-5 over every held-out example once."""
    s.plain.eval()
    k5 = min(5, s.num_classes)
    totals = torch.zeros(5, dtype=torch.float64)
    batches = eval_batches(
        s.val,
        local_batch=s.local_batch,
        rank=comm.rank,
        world_size=comm.world_size,
        num_workers=cfg.data.num_workers,
        loader=cfg.data.loader,
        device=device,
    )
    with torch.no_grad(), _autocast(device, cfg.trainer.precision):
        for x, y, valid in batches:
            x, y, valid = _inputs(x, device, cfg), y.to(device), valid.to(device)
            logits = s.plain(x).float()
            ce = F.cross_entropy(logits, y, reduction="none")
            top = logits.topk(k5, dim=1).indices
            hit1 = top[:, 0] == y
            hit5 = (top == y[:, None]).any(dim=1)
            totals[:4] += (
                torch.stack([ce[valid].sum(), hit1[valid].sum(), hit5[valid].sum(), valid.sum()]).double().cpu()
            )
    totals[4] = getattr(batches, "skipped", 0)  # unreadable held-out files (left out of the metrics)
    totals = comm.all_reduce(totals, tag="metrics") if comm.world_size > 1 else totals
    loss, top1, top5, n, unreadable = totals.tolist()
    s.plain.train()
    return {
        "val_loss": loss / n,
        "val_top1": top1 / n,
        "val_top5": top5 / n,
        "val_examples": int(n),
        "val_unreadable": int(unreadable),
    }


def train(
    comm: Communicator, device: torch.device, cfg: DictConfig, run_dir: Path, stop: StopRequest | None = None
) -> dict[str, Any] | None:
    """Train as configured; ``stop`` (a signal's request, preemption.py) ends the run after the
    step every worker learns of it in, with a checkpoint of that step (:class:`Preempted`)."""
    if isinstance(comm, DistCommunicator):
        # torch's global generator draws DDP's dropout masks; one stream per rank. (The hybrid
        # draws from per-worker generators and needs none; emulated workers share this one.)
        torch.manual_seed(cfg.seed * 1_000_003 + comm.rank)
    s = _agreed(comm, lambda: setup(comm, device, cfg))
    run = _Run(comm, device, cfg, run_dir, s, stop or StopRequest())
    checkpoint.check_shared(comm, run.ckpt_root)  # every worker sees it (one line if not), before step 1
    start = _agreed(comm, run.resume)
    step_fn, meter, K = _step_function(comm, device, cfg, s), Meter(), comm.world_size
    with Outputs(cfg, run_dir, run.total, comm.rank) as out:
        run.announce()
        asked = time.perf_counter()
        for step, epoch, x, y in faults.inject(_batches(s.loader, start, run.total), comm.rank):
            comm.ledger.reset()
            t0 = time.perf_counter()
            data_s = t0 - asked  # the wait for this batch: the loader's share, not the step's
            x, y = _inputs(x, device, cfg), y.to(device, non_blocking=True)
            s.optimizer.zero_grad(set_to_none=True)
            # The step's vote is issued as soon as the loss exists (run.vote), waited for after the step.
            loss = step_fn(x, y, run.vote).item()  # this worker's share of the global mean; one host sync per step
            # The step's traffic, not the vote's (issued inside the step, it is its own figure).
            comm_s, comm_bytes = comm.ledger.seconds, comm.ledger.sent - run.vote_bytes()
            if run.update_allowed(loss, step, epoch):  # every worker the same verdict: all update, or none
                s.optimizer.step()
            run.schedule.after_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            meter.add(time.perf_counter() - t0, data_s, comm_s, comm_bytes, x.shape[0] * K, loss)
            run.after_step(step, epoch, meter, out, x.shape[0] * K)  # log, evaluate, checkpoint: each on its cadence
            if run.stopping and step < run.total:
                run.preempt(step)  # a checkpoint of this step, then Preempted on every worker
            asked = time.perf_counter()  # evaluation and checkpoints above are neither data wait nor step
        run.finish_checkpoint()  # none is left in flight (the last step's is written at once); kept for safety
        summary = run.summary(start, meter)
    out.finish(summary)
    return summary if comm.rank == 0 else None


def _batches(loader, start: checkpoint.Position | None, total: int):
    """``(step, epoch, x, y)`` for steps 1, 2, ... up to ``total``, epoch after epoch; a resumed
    run starts after its checkpoint's step, mid-epoch where it left off."""
    step, epoch, skip = (start.step, start.epoch, start.step_in_epoch) if start else (0, 0, 0)
    while step < total:
        loader.start_epoch(epoch, skip)  # the batches before ``skip`` were trained on before the checkpoint
        for x, y in loader:
            step += 1
            yield step, epoch, x, y
            if step >= total:
                return
        epoch, skip = epoch + 1, 0


def _step_function(comm: Communicator, device: torch.device, cfg: DictConfig, s: Setup):
    """``(x, y) -> loss``: forward, backward and gradient sync of one step of the configured scheme,
    the loss as this worker's share of the global-batch mean (so shares add up on every scheme)."""

    def autocast():
        return _autocast(device, cfg.trainer.precision)

    if isinstance(s.model, HybridModel):
        fc_batch = cfg.parallel.fc_batch
        # Trunk gradients are summed; with fc_batch=chunk the head updates after every round.
        return lambda x, y, on_loss: s.model.train_step(
            x,
            y,
            scheme=cfg.parallel.scheme,
            fc_batch=fc_batch,
            optimizer=s.optimizer,
            autocast=autocast,
            on_loss=on_loss,
        )[0]
    emulated = not isinstance(s.model, nn.parallel.DistributedDataParallel) and comm.world_size > 1

    def ddp_step(x, y, on_loss):  # DDP: the local mean, gradients averaged (emulated workers average by hand)
        with autocast():
            logits = s.model(x)
        loss = F.cross_entropy(logits.float(), y)
        on_loss(loss.detach() / comm.world_size)
        loss.backward()
        if emulated:
            _average_gradients(s.plain, comm)
        return loss.detach() / comm.world_size

    return ddp_step


class _Run:
    """Everything around the step: the schedule, checkpoints, the non-finite policy, the cadence
    of logging, evaluation and checkpoints, and the summary."""

    def __init__(
        self, comm: Communicator, device: torch.device, cfg: DictConfig, run_dir: Path, s: Setup, stop: StopRequest
    ):
        self.comm, self.device, self.cfg, self.s, self.stop = comm, device, cfg, s, stop
        self.stopping = False  # a worker was asked to stop: every worker leaves after this step
        self.steps_per_epoch = len(s.loader)
        self.total = cfg.trainer.max_steps or cfg.trainer.epochs * self.steps_per_epoch
        self.schedule = Schedule(s.optimizer, cfg.optim, self.steps_per_epoch, self.total)
        self.ck = cfg.checkpoint
        self.ckpt_root = Path(self.ck.dir or run_dir / "checkpoints")
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.saved_at: int | None = None  # the step of the newest committed checkpoint
        # checkpoint.async: the checkpoint written by a background thread while training goes on,
        # committed at the first step boundary at which every worker's file is done (see save()).
        self.background = bool(self.ck["async"])
        self.writing: checkpoint.Write | None = None  # the one checkpoint in flight
        self.host_buffers = checkpoint.HostBuffers()  # its snapshot, reused by the next (empty until used)
        self.written_everywhere = False  # this step's vote: every worker's file of it is done
        self.voting: Agreement | None = None  # the step's vote in flight (vote())
        self.skipped, self.train_loss, self.last_val = 0, float("nan"), {}

    def resume(self) -> checkpoint.Position | None:
        start = _resume(self.comm, self.cfg, self.ckpt_root, self.s, self.schedule)
        self.saved_at = start.step if start else None
        return start

    def announce(self) -> None:
        log.info(
            "world size %d (%s), scheme %s, %d images per worker, %d steps per epoch, %d steps",
            self.comm.world_size,
            "emulated" if not isinstance(self.comm, DistCommunicator) else "torch.distributed",
            self.cfg.parallel.scheme,
            self.s.local_batch,
            self.steps_per_epoch,
            self.total,
        )

    def vote(self, loss: torch.Tensor) -> None:
        """Issue the step's vote (:meth:`update_allowed` reads it) as soon as ``loss``, this
        worker's share, exists: before the step's gradient sums, which on a slow link would hold a
        tiny collective issued after them for tens of milliseconds (docs/design.md). The finite
        check is read on the loss's device: no host sync inside the step."""
        flags = [torch.isfinite(loss), self.stop.requested]
        if self.background:
            flags.append(self.writing is None or self.writing.written())
        self.voting = self.comm.votes_async(flags, "step_votes")

    def vote_bytes(self) -> int:
        """The bytes this step's vote sent (the ledger holds them with the step's)."""
        return self.comm.ledger.by_tag().get("step_votes", (0, 0))[0]

    def update_allowed(self, loss: float, step: int, epoch: int) -> bool:
        """Whether every worker's loss is finite; if not, stop before the update (one line naming
        the step) or, with trainer.skip_nonfinite, skip it. The same tiny collective tells every
        worker whether any was asked to stop (a signal): then all leave after this step. With
        checkpoint.async it also tells whether every worker's part of the checkpoint in flight is
        written (one more integer: no collective of its own, and none from the writer thread).
        Issued by :meth:`vote` inside the step (here if the step did not)."""
        if self.voting is None:
            self.vote(torch.tensor(loss))
        voting, self.voting = self.voting, None
        finite, stops, *written = voting.wait()
        self.stopping = stops > 0
        self.written_everywhere = self.writing is not None and written == [self.comm.world_size]
        if finite == self.comm.world_size:
            return True
        if not self.cfg.trainer.skip_nonfinite:
            self.finish_checkpoint()  # the one in flight holds an earlier, finite step: keep it
            last = f"step {self.saved_at}" if self.saved_at is not None else "none written yet"
            raise NonFiniteLoss(
                f"non-finite loss at step {step} (epoch {epoch}); stopped before the update "
                f"(last checkpoint: {last}, intact); trainer.skip_nonfinite=true skips such steps"
            )
        if self.comm.rank == 0:
            log.warning("step %d: non-finite loss, step skipped (no update)", step)
        self.s.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        return False

    def after_step(self, step: int, epoch: int, meter: Meter, out: Outputs, images: int) -> None:
        if self.written_everywhere:  # voted this step: every file of the checkpoint in flight is done
            self.finish_checkpoint()
        every_eval, every_ck = self.cfg.trainer.eval_every_steps, self.ck.every_steps
        logged = step % self.cfg.trainer.log_every_steps == 0 or step == self.total
        if logged:
            self.train_loss = _global_mean(self.comm, meter.loss_sum, meter.loss_n)
            meter.loss_sum, meter.loss_n = 0.0, 0
            lrs = {f"lr/{name}": lr for name, lr in learning_rates(self.s.optimizer).items()}
            out.emit({"step": step, "epoch": epoch, "train/loss": self.train_loss, **meter.last_step(images), **lrs})
            self._warn_data_bound(meter)
        out.stepped(self.train_loss if logged else None)
        if (every_eval and step % every_eval == 0) or step % self.steps_per_epoch == 0 or step == self.total:
            self.evaluate(step, epoch, out)
        if (every_ck and step % every_ck == 0) or step >= self.total:
            self.save(step)

    def _warn_data_bound(self, meter: Meter) -> None:
        slow = meter.data_bound(window=max(self.cfg.trainer.log_every_steps, 5))
        if slow and self.comm.rank == 0:
            wait, step = slow
            log.warning(
                "the data loader is the bottleneck: %.1f ms waiting for each batch, %.0f%% of the %.1f ms step "
                "(more data.num_workers, data.loader=dali for image folders; data=synthetic times the step alone)",
                wait * 1e3,
                100 * wait / step,
                step * 1e3,
            )

    def preempt(self, step: int) -> None:
        """Leave after ``step`` with a checkpoint of it (every worker: they voted together),
        committed before the process exits."""
        self.finish_checkpoint()
        if self.saved_at != step:
            self.save(step)
        path = self.ckpt_root / f"step-{step:08d}"
        if self.comm.rank == 0:
            log.warning("step %d: asked to stop (%s); checkpoint %s written", step, self.stop.name, path)
        raise Preempted(step, self.stop.name if self.stop.requested else "a peer's signal", str(path))

    def evaluate(self, step: int, epoch: int, out: Outputs) -> None:
        self.last_val = evaluate(self.comm, self.device, self.cfg, self.s)
        self.schedule.after_eval(self.last_val)
        out.emit({"step": step, "epoch": epoch, **{f"val/{k[4:]}": v for k, v in self.last_val.items()}})
        if self.comm.rank == 0:
            v = self.last_val
            log.info(
                "step %d epoch %d: train loss %.4f, held-out top-1 %.4f top-5 %.4f",
                *(step, epoch, self.train_loss, v["val_top1"], v["val_top5"]),
            )

    def save(self, step: int) -> None:
        """The checkpoint of ``step``. Blocking: written and committed now. With checkpoint.async:
        the state is copied to host memory now and written by a background thread; the step's vote
        tells when every worker's file is done and after_step commits it then. At most one write is
        in flight: one still running when the next is due is waited for and committed first. The
        last step's checkpoint, and one taken because a worker was asked to stop, are written at
        once: the process must not exit before they are committed, so there is nothing to overlap."""
        self.finish_checkpoint()
        position = checkpoint.Position(step, step // self.steps_per_epoch, step % self.steps_per_epoch)
        hybrid = isinstance(self.s.model, HybridModel)
        if hybrid:
            self.s.model.flush()  # the weights and momenta of the step just taken, all of them
        background = self.background and step < self.total and not self.stopping
        self.writing = checkpoint.start(
            self.comm,
            self.ckpt_root,
            model=self.s.model if hybrid else self.s.plain,
            plain=self.s.plain,
            optimizer=self.s.optimizer,
            position=position,
            schedule_state=self.schedule.state_dict(),
            scheme=self.cfg.parallel.scheme,
            config_yaml=self.config_yaml,
            keep_last=self.ck.keep_last,
            background=background,
            buffers=self.host_buffers,
        )
        if not background:
            self.finish_checkpoint()

    def finish_checkpoint(self) -> None:
        """Commit the checkpoint in flight, if any, waiting for this worker's write (every worker
        calls this at the same point: whether one is in flight is the same everywhere). A failed
        write raises the same CheckpointError on every worker, the last committed one intact."""
        writing, self.writing, self.written_everywhere = self.writing, None, False
        if writing is None:
            return
        path = writing.commit(self.comm)
        self.saved_at = writing.step
        if self.comm.rank == 0:
            log.info("step %d: checkpoint %s", writing.step, path)

    def summary(self, start: checkpoint.Position | None, meter: Meter) -> dict[str, Any]:
        steps = start.step if start else 0
        steps += len(meter.step_s)
        if not self.last_val:  # resumed from the run's final checkpoint: nothing left to train
            self.last_val = evaluate(self.comm, self.device, self.cfg, self.s)
        # Training images whose file could not be read (each replaced by a readable one), all workers.
        unreadable = torch.tensor([float(getattr(self.s.loader, "skipped", 0))], dtype=torch.float64)
        K = self.comm.world_size
        unreadable = int((self.comm.all_reduce(unreadable, tag="metrics") if K > 1 else unreadable).item())
        if unreadable and self.comm.rank == 0:
            log.warning("%d training images could not be read and were replaced (listed above)", unreadable)
        return _summary(self, start, meter, steps, unreadable)


def _summary(run: _Run, start, meter: Meter, steps: int, unreadable: int) -> dict[str, Any]:
    cfg, s, K, val = run.cfg, run.s, run.comm.world_size, run.last_val
    return {
        "val_top1": val.get("val_top1"),
        "val_top5": val.get("val_top5"),
        "val_loss": val.get("val_loss"),
        "train_loss": run.train_loss,
        "steps": steps,
        "epochs": steps / run.steps_per_epoch,
        "world_size": K,
        "scheme": cfg.parallel.scheme,
        "fc_group_size": s.model.comm.world_size if isinstance(s.model, HybridModel) else None,
        "emulated": not isinstance(run.comm, DistCommunicator),
        "device": str(run.device),
        "precision": cfg.trainer.precision,
        "local_batch": s.local_batch,
        "global_batch": s.local_batch * K,
        # End to end (waiting for data included); the step's own rate beside it: the gap is the loader's.
        "images_per_s": meter.images / (meter.train_s + sum(meter.data_s)) if meter.train_s else 0.0,
        "step_images_per_s": meter.images / meter.train_s if meter.train_s else 0.0,
        "data_s_per_step": meter.median("data_s"),
        "step_s": meter.median("step_s"),
        "comm_s_per_step": meter.median("comm_s"),
        "compute_s_per_step": max(0.0, meter.median("step_s") - meter.median("comm_s")),
        "comm_bytes_per_step": int(meter.median("comm_bytes")),
        "lr": learning_rates(s.optimizer),
        "resumed_from_step": start.step if start else None,
        "skipped_nonfinite_steps": run.skipped,
        "unreadable_train_images": unreadable,
        "unreadable_val_images": val.get("val_unreadable", 0),
        "checkpoint": str(run.ckpt_root / f"step-{run.saved_at:08d}") if run.saved_at else None,
    }


def _resume(
    comm: Communicator, cfg: DictConfig, root: Path, s: Setup, schedule: Schedule
) -> checkpoint.Position | None:
    """Find the checkpoint to continue from (``checkpoint.resume``: auto | none | a path) and load
    it. Worker 0 chooses and tells the others, so all load the same one."""
    choice = cfg.checkpoint.resume
    found, error = None, None
    if comm.rank == 0:
        try:
            if choice == "auto":
                found = checkpoint.latest(root)
            elif choice != "none":
                found = (Path(choice), checkpoint.verify(Path(choice)))
        except checkpoint.CheckpointError as exc:
            error = f"checkpoint.resume={choice}: {exc}"
    found, error = comm.gather_objects((found, error))[0]
    if error:
        raise checkpoint.CheckpointError(error)
    if found is None:
        return None
    path, meta = found
    position, schedule_state = checkpoint.load(
        comm,
        path,
        meta,
        model=s.model if cfg.parallel.scheme != "ddp" else s.plain,
        plain=s.plain,
        optimizer=s.optimizer,
        scheme=cfg.parallel.scheme,
    )
    schedule.load_state_dict(schedule_state)
    if comm.rank == 0:
        log.info(
            "resuming from %s (step %d, epoch %d, batch %d of the epoch)",
            path,
            position.step,
            position.epoch,
            position.step_in_epoch,
        )
    return position


def _average_gradients(model: nn.Module, comm: Communicator) -> None:
    # DDP's semantics for emulated workers: the mean of the replicas' gradients.
    params = [p for p in model.parameters() if p.requires_grad]
    allreduce_gradients(params, comm, tag="ddp_grads")
    for p in params:
        p.grad.div_(comm.world_size)


def _global_mean(comm: Communicator, loss_sum: float, n: int) -> float:
    """The training loss over the global batch, averaged over the last ``n`` steps: every worker
    holds its shares of the global means, which add up over the workers."""
    t = torch.tensor([loss_sum], dtype=torch.float64)
    if comm.world_size > 1:
        t = comm.all_reduce(t, tag="metrics")
    return t.item() / max(1, n)
