"""The training loop one worker runs, the same under torchrun and in emulation.

Read it top to bottom: set up (data, model, optimiser; any error agreed by all workers before
the first collective), then the steps, each one ``forward → loss → backward → sync → update``,
with evaluation on the held-out set at the end of every epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hybridpar import checkpoint
from hybridpar.comm import Communicator, DistCommunicator
from hybridpar.data import build_datasets, eval_batches, train_loader
from hybridpar.errors import ConfigError, HybridparError
from hybridpar.models import build_model
from hybridpar.models.split import split_model
from hybridpar.optim import Schedule, learning_rates, sgd
from hybridpar.parallel import HybridModel
from hybridpar.parallel.data_parallel import allreduce_gradients, ledger_allreduce_hook
from hybridpar.parallel.head import fewest_bytes_group
from hybridpar.parallel.program import SCHEMES as HYBRID_SCHEMES

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


@dataclass
class Meter:
    """Per-step timings and bytes of this worker; medians go into the summary."""

    step_s: list[float] = field(default_factory=list)
    comm_s: list[float] = field(default_factory=list)
    comm_bytes: list[int] = field(default_factory=list)
    train_s: float = 0.0
    images: int = 0

    def median(self, name: str) -> float:
        xs = getattr(self, name)
        return float(statistics.median(xs)) if xs else 0.0


def local_batch_size(data_cfg: DictConfig, world_size: int) -> int:
    b, g = data_cfg.get("batch_size"), data_cfg.get("global_batch")
    if g is not None:
        if not isinstance(g, int) or g < 1 or g % world_size:
            raise ConfigError(f"data.global_batch={g} cannot be split evenly over {world_size} workers")
        return g // world_size
    if not isinstance(b, int) or b < 1:
        raise ConfigError(f"data.batch_size must be a positive integer (images per worker), got {b!r}")
    return b


def validate(cfg: DictConfig) -> None:
    """Checks that need no data and no other worker: run on every rank before anything else."""
    if cfg.parallel.scheme not in SCHEMES:
        raise ConfigError(f"parallel.scheme={cfg.parallel.scheme!r} is not one of {', '.join(SCHEMES)}")
    if cfg.parallel.get("fc_batch", "full") not in ("full", "chunk"):
        raise ConfigError(f"parallel.fc_batch={cfg.parallel.fc_batch!r} is not one of full, chunk")
    if cfg.parallel.get("fc_batch", "full") == "chunk" and cfg.parallel.scheme not in ("b", "c"):
        raise ConfigError(
            f"parallel.fc_batch=chunk updates the head after each round: it needs parallel.scheme=b or c, not {cfg.parallel.scheme!r}"
        )
    if cfg.parallel.get("comm_dtype", "fp32") not in PRECISIONS:
        raise ConfigError(f"parallel.comm_dtype={cfg.parallel.comm_dtype!r} is not one of fp32, bf16")
    if cfg.optim.get("conv_lr_scale", "none") not in LR_SCALES:
        raise ConfigError(f"optim.conv_lr_scale={cfg.optim.conv_lr_scale!r} is not one of {', '.join(LR_SCALES)}")
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.trainer.max_steps is None and not (isinstance(cfg.trainer.epochs, int) and cfg.trainer.epochs >= 1):
        raise ConfigError(f"trainer.epochs must be a positive integer, got {cfg.trainer.epochs!r}")
    if cfg.trainer.max_steps is not None and not (
        isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps >= 1
    ):
        raise ConfigError(f"trainer.max_steps must be a positive integer or null, got {cfg.trainer.max_steps!r}")


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
    if cfg.model.get("init_from"):
        _init_from(full, cfg.model.init_from)
    split = split_model(full, cfg.model.get("head"))

    if cfg.parallel.scheme != "ddp":
        model = HybridModel(
            full,
            comm,
            plan=_plan(cfg.parallel.plan),
            head=cfg.model.get("head"),
            seed=cfg.seed,
            comm_dtype=torch.bfloat16 if cfg.parallel.get("comm_dtype", "fp32") == "bf16" else None,
            overlap=cfg.parallel.get("overlap", True),
            bucket_cap=int(cfg.parallel.get("bucket_mb", 4) * 2**20 / 4),
            fc_group_size=_group_size(cfg, full, K, b),
            sync_bn=bool(cfg.parallel.get("sync_bn", True)),
        ).to(device)
        plain = model
    else:
        plain = full.to(device)
        model = plain
        if isinstance(comm, DistCommunicator) and K > 1:
            model = nn.parallel.DistributedDataParallel(
                plain, device_ids=[device] if device.type == "cuda" else None, process_group=comm.group
            )
            model.register_comm_hook(comm, ledger_allreduce_hook)
    # The conv layers see a batch of K·b per update (the loss is the mean over it); the paper's
    # variance argument scales their rate by √K relative to the configured one, linear by K.
    conv_lr = cfg.optim.lr * LR_SCALES[cfg.optim.get("conv_lr_scale", "none")](K)
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
        num_workers=cfg.data.get("num_workers", 0),
        pin_memory=device.type == "cuda",
    )
    _fast_path(cfg, model if cfg.parallel.scheme != "ddp" else plain, split.trunk_module_names(), device)
    return Setup(model, plain, optimizer, b, loader, data.val, data.num_classes)


def _fast_path(cfg: DictConfig, model: nn.Module, trunk_names: list[str], device: torch.device) -> None:
    """The GPU fast path, each part switchable (all of it runs on a CPU too): channels_last for the
    trunk's convolutions, torch.compile of the trunk's modules (in place: the parameter names stay),
    cuDNN autotuning. bf16 autocast and pinned, non-blocking input copies are set elsewhere."""
    if cfg.trainer.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    if cfg.trainer.get("compile", False):
        for n in trunk_names:
            model.get_submodule(n).compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = (
            bool(cfg.trainer.get("cudnn_benchmark", True)) and not cfg.trainer.deterministic
        )


def _inputs(x: torch.Tensor, device: torch.device, cfg: DictConfig) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return (
        x.contiguous(memory_format=torch.channels_last)
        if cfg.trainer.get("channels_last", False) and x.dim() == 4
        else x
    )


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
    G = cfg.parallel.get("fc_group_size")
    if G is None:
        return None
    if G == "auto":
        return fewest_bytes_group(model, K, b, _plan(cfg.parallel.plan), cfg.model.get("head"))
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
        num_workers=cfg.data.get("num_workers", 0),
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


def train(comm: Communicator, device: torch.device, cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    rank0 = comm.rank == 0
    K = comm.world_size
    if isinstance(comm, DistCommunicator):
        # torch's global generator draws DDP's dropout masks; one stream per rank. (The hybrid
        # draws from per-worker generators and needs none; emulated workers share this one.)
        torch.manual_seed(cfg.seed * 1_000_003 + comm.rank)
    s = _agreed(comm, lambda: setup(comm, device, cfg))
    steps_per_epoch = len(s.loader)
    total = cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch
    schedule = Schedule(s.optimizer, cfg.optim, steps_per_epoch, total)
    hybrid = cfg.parallel.scheme != "ddp"
    ck = cfg.get("checkpoint") or {}
    ckpt_root = Path(ck.get("dir") or run_dir / "checkpoints")
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    start = _agreed(comm, lambda: _resume(comm, cfg, ckpt_root, s, schedule))
    fault = _fault(comm)
    emulated_ddp = not hybrid and not isinstance(s.model, nn.parallel.DistributedDataParallel) and K > 1

    run = _wandb_run(cfg, run_dir) if rank0 else None
    bar = _progress(cfg, total) if rank0 else None
    metrics_file = (run_dir / "metrics.jsonl").open("a") if rank0 else None
    meter = Meter()
    loss_sum, loss_n, train_loss, last_val = 0.0, 0, float("nan"), {}
    step, epoch, skip = (start.step, start.epoch, start.step_in_epoch) if start else (0, 0, 0)
    skipped_steps, saved_at = 0, step if start else None

    def save() -> None:
        nonlocal saved_at
        position = checkpoint.Position(step, step // steps_per_epoch, step % steps_per_epoch)
        path = checkpoint.save(
            comm,
            ckpt_root,
            model=s.model if hybrid else s.plain,
            plain=s.plain,
            optimizer=s.optimizer,
            position=position,
            schedule_state=schedule.state_dict(),
            scheme=cfg.parallel.scheme,
            config_yaml=config_yaml,
            keep_last=ck.get("keep_last"),
        )
        saved_at = step
        if rank0:
            log.info("step %d: checkpoint %s", step, path)

    log.info(
        "world size %d (%s), scheme %s, %d images per worker, %d steps per epoch, %d steps",
        K,
        "emulated" if not isinstance(comm, DistCommunicator) else "torch.distributed",
        cfg.parallel.scheme,
        s.local_batch,
        steps_per_epoch,
        total,
    )

    def emit(record: dict[str, Any]) -> None:
        if not rank0:
            return
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if run is not None:
            run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    try:
        while step < total:
            # Resumed mid-epoch: the batches before ``skip`` were trained on before the checkpoint.
            s.loader.start_epoch(epoch, skip)
            for x, y in s.loader:
                comm.ledger.reset()
                if fault.get("nan") == step + 1 and comm.rank == 0:
                    x = x.clone().fill_(float("nan"))
                t0 = time.perf_counter()
                x, y = _inputs(x, device, cfg), y.to(device, non_blocking=True)
                s.optimizer.zero_grad(set_to_none=True)
                if hybrid:
                    # This worker's share of the global-batch mean; trunk gradients are summed.
                    loss, _ = s.model.train_step(
                        x,
                        y,
                        scheme=cfg.parallel.scheme,
                        fc_batch=cfg.parallel.get("fc_batch", "full"),
                        optimizer=s.optimizer,
                        autocast=lambda: _autocast(device, cfg.trainer.precision),
                    )
                else:
                    # DDP: the local mean; gradients averaged.
                    with _autocast(device, cfg.trainer.precision):
                        logits = s.model(x)
                    loss = F.cross_entropy(logits.float(), y)
                    loss.backward()
                    if emulated_ddp:
                        _average_gradients(s.plain, comm)
                step_comm_s, step_bytes = comm.ledger.seconds, comm.ledger.sent
                loss_value = loss.item()  # one host sync per step, read by the check and the log
                if not comm.all_finite(math.isfinite(loss_value)):
                    # Every worker sees the same verdict (one tiny all-reduce), so all skip or all stop.
                    if not cfg.trainer.get("skip_nonfinite", False):
                        last = f"step {saved_at}" if saved_at is not None else "none written yet"
                        raise NonFiniteLoss(
                            f"non-finite loss at step {step + 1} (epoch {epoch}); stopped before the update "
                            f"(last checkpoint: {last}, intact); trainer.skip_nonfinite=true skips such steps"
                        )
                    if rank0:
                        log.warning("step %d: non-finite loss, step skipped (no update)", step + 1)
                    s.optimizer.zero_grad(set_to_none=True)
                    skipped_steps += 1
                else:
                    s.optimizer.step()
                schedule.after_step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                meter.step_s.append(dt)
                meter.comm_s.append(step_comm_s)
                meter.comm_bytes.append(step_bytes)
                meter.train_s += dt
                meter.images += x.shape[0] * K
                if math.isfinite(loss_value):
                    loss_sum += loss_value
                    loss_n += 1
                step += 1
                if fault.get("kill") == step:
                    os.kill(os.getpid(), signal.SIGKILL)  # fault injection (HYBRIDPAR_FAULT), tests only
                if bar is not None:
                    bar.update(1)

                if step % cfg.trainer.log_every_steps == 0 or step == total:
                    train_loss = _global_mean(comm, loss_sum, loss_n, hybrid)
                    loss_sum, loss_n = 0.0, 0
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "train/loss": train_loss,
                        "perf/step_s": dt,
                        "perf/comm_s": meter.comm_s[-1],
                        "perf/compute_s": max(0.0, dt - meter.comm_s[-1]),
                        "perf/images_per_s": x.shape[0] * K / dt,
                        "perf/comm_bytes": meter.comm_bytes[-1],
                    }
                    record |= {f"lr/{name}": lr for name, lr in learning_rates(s.optimizer).items()}
                    emit(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
                every = cfg.trainer.eval_every_steps
                epoch_end = step % steps_per_epoch == 0
                if (every and step % every == 0) or epoch_end or step == total:
                    last_val = evaluate(comm, device, cfg, s)
                    schedule.after_eval(last_val)
                    emit({"step": step, "epoch": epoch, **{f"val/{k[4:]}": v for k, v in last_val.items()}})
                    if rank0:
                        log.info(
                            "step %d epoch %d: train loss %.4f, held-out top-1 %.4f top-5 %.4f",
                            step,
                            epoch,
                            train_loss,
                            last_val["val_top1"],
                            last_val["val_top5"],
                        )
                ck_every = ck.get("every_steps")
                if (ck_every and step % ck_every == 0) or step >= total:
                    save()
                if step >= total:
                    break
            epoch, skip = epoch + 1, 0
        if not last_val:  # resumed from the run's final checkpoint: nothing left to train
            last_val = evaluate(comm, device, cfg, s)
        # Training images whose file could not be read (each replaced by a readable one), all workers.
        unreadable = torch.tensor([float(getattr(s.loader, "skipped", 0))], dtype=torch.float64)
        unreadable = int((comm.all_reduce(unreadable, tag="metrics") if K > 1 else unreadable).item())
        if unreadable and rank0:
            log.warning("%d training images could not be read and were replaced (listed above)", unreadable)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()

    summary = {
        "val_top1": last_val.get("val_top1"),
        "val_top5": last_val.get("val_top5"),
        "val_loss": last_val.get("val_loss"),
        "train_loss": train_loss,
        "steps": step,
        "epochs": step / steps_per_epoch,
        "world_size": K,
        "scheme": cfg.parallel.scheme,
        "fc_group_size": s.model.comm.world_size if hybrid else None,
        "emulated": not isinstance(comm, DistCommunicator),
        "device": str(device),
        "precision": cfg.trainer.precision,
        "local_batch": s.local_batch,
        "global_batch": s.local_batch * K,
        "images_per_s": meter.images / meter.train_s if meter.train_s else 0.0,
        "step_s": meter.median("step_s"),
        "comm_s_per_step": meter.median("comm_s"),
        "compute_s_per_step": max(0.0, meter.median("step_s") - meter.median("comm_s")),
        "comm_bytes_per_step": int(meter.median("comm_bytes")),
        "lr": learning_rates(s.optimizer),
        "resumed_from_step": start.step if start else None,
        "skipped_nonfinite_steps": skipped_steps,
        "unreadable_train_images": unreadable,
        "unreadable_val_images": last_val.get("val_unreadable", 0),
        "checkpoint": str(ckpt_root / f"step-{saved_at:08d}") if saved_at else None,
    }
    if run is not None:
        run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
        run.finish()
    return summary if rank0 else None


def _resume(
    comm: Communicator, cfg: DictConfig, root: Path, s: Setup, schedule: Schedule
) -> checkpoint.Position | None:
    """Find the checkpoint to continue from (``checkpoint.resume``: auto | none | a path) and load
    it. Worker 0 chooses and tells the others, so all load the same one."""
    choice = str((cfg.get("checkpoint") or {}).get("resume", "none") or "none")
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


def _fault(comm: Communicator) -> dict[str, int]:
    """Fault injection for the reliability tests: ``HYBRIDPAR_FAULT="kill@7:1,nan@3"`` SIGKILLs
    worker 1's process after step 7 (first attempt only, not after a torchrun restart) and feeds
    NaN images at step 3. Unset in normal use."""
    spec = os.environ.get("HYBRIDPAR_FAULT", "")
    out: dict[str, int] = {}
    for item in filter(None, spec.split(",")):
        what, _, rest = item.partition("@")
        at, _, rank = rest.partition(":")
        if what == "kill" and (
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or (rank and int(rank) != comm.rank)
        ):
            continue
        out[what] = int(at)
    return out


def _average_gradients(model: nn.Module, comm: Communicator) -> None:
    # DDP's semantics for emulated workers: the mean of the replicas' gradients.
    params = [p for p in model.parameters() if p.requires_grad]
    allreduce_gradients(params, comm, tag="ddp_grads")
    for p in params:
        p.grad.div_(comm.world_size)


def _global_mean(comm: Communicator, loss_sum: float, n: int, hybrid: bool) -> float:
    """The training loss over the global batch, averaged over the last ``n`` steps."""
    t = torch.tensor([loss_sum], dtype=torch.float64)
    if comm.world_size > 1:
        t = comm.all_reduce(t, tag="metrics")
    # Hybrid workers hold shares that add up to the global mean; DDP workers hold local means.
    total = t.item() if hybrid else t.item() / comm.world_size
    return total / max(1, n)


def _wandb_run(cfg: DictConfig, run_dir: Path):
    if cfg.logger.name != "wandb":
        return None
    import wandb

    from hybridpar.rundir import sweep_group

    return wandb.init(
        project=cfg.logger.project,
        dir=str(run_dir),
        mode=cfg.logger.mode,
        name=run_dir.name,
        group=sweep_group(run_dir),
        job_type=f"scheme-{cfg.parallel.scheme}",
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _progress(cfg: DictConfig, total: int):
    if not cfg.trainer.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, leave=False)
