"""Sharded checkpoints: written atomically, found again after a crash, loadable by any K.

One checkpoint is a directory ``step-00000123/`` holding

* ``worker-000.pt`` … one file per worker: its head shards (and their momentum), its RNG
  streams; worker 0's file also holds everything replicated — the conv weights and their
  momentum, written once — and the LR schedule's state;
* ``meta.json``: step, epoch and position in the epoch, the world size and scheme that wrote it,
  every tensor's full name, full shape and how it is cut (dim, sizes per worker), each file's
  size and SHA-256, and the config that produced it.

Names are the single-device model's (torchvision's for AlexNet), so a checkpoint is a sharded
``state_dict``: any worker count and any scheme loads it by re-cutting the full tensors
(:func:`load`). Nothing in the files is code: they load with ``torch.load(weights_only=True)``.

Writes are atomic: every worker writes into ``.step-00000123.tmp/``; when all files are on disk
(fsync'd) worker 0 writes ``meta.json`` and renames the directory. A crash at any point leaves
either the complete directory or a ``.tmp`` one that is never read (and removed by the next
write). A checkpoint whose files do not match ``meta.json`` (size or hash) is refused.

A checkpoint is written in two halves, :func:`start` and :meth:`Write.commit`, each called by
every worker at the same point of the run. :func:`save` (blocking) calls them back to back. With
``checkpoint.async`` the trainer calls :func:`start` with ``background=True``: the payload is
copied to host memory at the step and one thread per worker writes, fsyncs and hashes the file,
while training goes on; the trainer learns at a later step's vote that every worker's file is
done and only then calls :meth:`Write.commit` (trainer.py, ``_Run``). Every collective of both
halves runs on the calling (training) thread; the writer thread only writes its file.

Why not ``torch.distributed.checkpoint``: it reshards through DTensor/ShardedTensor metadata on
a process group; the head's uneven cuts (``even_split``) are not DTensor's, and the emulated
workers have no process group. Re-cutting full tensors from memory-mapped shard files is a few
lines and works the same on every backend.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridpar.comm import Communicator
from hybridpar.errors import HybridparError
from hybridpar.parallel import HybridModel, ShardSpec, WorkerDropout

log = logging.getLogger("hybridpar")

FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(HybridparError):
    """A checkpoint that cannot be used (missing, truncated, foreign, or not a checkpoint)."""


@dataclass
class Position:
    """Where training stands: ``step`` steps done; the next batch is ``step_in_epoch`` of ``epoch``."""

    step: int
    epoch: int
    step_in_epoch: int


# ---- what a worker holds -----------------------------------------------------------------


def _specs(model: nn.Module) -> dict[str, ShardSpec]:
    return model.shard_specs() if isinstance(model, HybridModel) else {}


def _full_shapes(model: nn.Module, plain: nn.Module) -> dict[str, list[int]]:
    return (
        model.full_shapes()
        if isinstance(model, HybridModel)
        else {n: list(t.shape) for n, t in plain.state_dict().items()}
    )


def _param_names(plain: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in plain.named_parameters()}


def _dropout_generators(model: nn.Module, device: torch.device) -> dict[str, torch.Generator]:
    """Each of the head's dropout layers' generator on ``device`` (made now if not used yet)."""
    return {
        f"{name}@{device.type}": m.generator(device)
        for name, m in model.named_modules()
        if isinstance(m, WorkerDropout)
    }


def _device(plain: nn.Module) -> torch.device:
    return next(plain.parameters()).device


def _worker_payload(
    model: nn.Module,
    plain: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    snapshot: HostBuffers | None = None,
) -> dict[str, Any]:
    """What this worker's file holds. With ``snapshot`` every tensor is a copy in those host
    buffers, which later steps do not touch (a background write reads it while training updates
    the weights in place); without, a CPU tensor is the live one (written at once, before anything
    changes it)."""
    specs = _specs(model)
    names = _param_names(plain)
    # Replicated tensors: worker 0 writes them once. Head shards: the first group (2-D layout: the
    # other groups hold copies of the same shards).
    first_group = not isinstance(model, HybridModel) or model.replicas is None or model.replicas.rank == 0
    keep = lambda n: (n in specs and first_group) or (n not in specs and rank == 0)
    host = snapshot.copy if snapshot is not None else lambda _, t: _row_major(t.detach().cpu())
    tensors = {f"model/{n}": host(f"model/{n}", t) for n, t in plain.state_dict().items() if keep(n)}
    for p, st in optimizer.state.items():
        buf = st.get("momentum_buffer")
        if buf is not None and keep(names[id(p)]):
            tensors[f"momentum/{names[id(p)]}"] = host(f"momentum/{names[id(p)]}", buf)
    if snapshot is not None and _device(plain).type == "cuda":
        torch.cuda.current_stream(_device(plain)).synchronize()  # the non-blocking copies have landed
    rng = {"torch": torch.get_rng_state()}  # get_rng_state / get_state return copies
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng |= {f"dropout/{k}": g.get_state() for k, g in _dropout_generators(model, _device(plain)).items()}
    return {"tensors": tensors, "rng": rng, "lr": [g["lr"] for g in optimizer.param_groups]}


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its strides are plain row-major ones, else a row-major copy. ``contiguous()``
    is not enough: a channels_last tensor with a size-1 dimension (a 1-channel stem's weight) counts
    as contiguous with other strides, and torch.save writes the strides — the file would depend on
    the memory format the run trained in (and differ from :class:`HostBuffers`' copy)."""
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= max(n, 1)  # torch's own rule (torch.empty's strides), empty dimensions included
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


class HostBuffers:
    """Host memory for one worker's checkpoint snapshots, kept from one checkpoint to the next.

    Copying into memory already mapped costs a memcpy; fresh memory costs its page faults as well
    (254 MB, one core: 0.013 s against 0.09 s), and this copy is what the step waits for. The price:
    with ``checkpoint.async`` each worker keeps a host copy of its part of the checkpoint for the
    whole run (pinned on a GPU host: the device-to-host copies run without blocking and the caller
    synchronises once). A buffer is never refilled while a write reads it: :func:`start` refuses
    buffers whose last write has not ended (the trainer commits one checkpoint before the next)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.in_use = False  # a background write reads them (set when it starts, cleared when it ends)

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in this worker's buffer for ``key``: contiguous, on the host, the same
        dtype, shape and strides as the blocking path's :func:`_row_major` (so both write the same
        bytes)."""
        t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self._buffers[key] = buf
        return buf.copy_(t, non_blocking=t.device.type == "cuda")


# ---- writing -----------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save(comm: Communicator, root: Path, **keywords: Any) -> Path:
    """Write one checkpoint (every worker calls this at the same step, with :func:`start`'s
    keywords, ``background`` left off); returns its directory.

    A failure on any worker (e.g. a full disk) raises the same :class:`CheckpointError` on all,
    and leaves every earlier checkpoint as it was."""
    return start(comm, root, **keywords).commit(comm)


def start(
    comm: Communicator,
    root: Path,
    *,
    model: nn.Module,
    plain: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    schedule_state: Mapping[str, Any],
    scheme: str,
    config_yaml: str,
    keep_last: int | None,
    background: bool = False,
    buffers: HostBuffers | None = None,
) -> Write:
    """The first half of a checkpoint (every worker, at the same step): take this worker's payload,
    agree that there is room and make the ``.tmp`` directory (collectives, on this thread), and
    write this worker's file — here, or with ``background`` in a thread of its own from a copy of
    the payload in ``buffers`` (:class:`HostBuffers`; fresh ones if None), while training continues.
    :meth:`Write.commit` finishes it. A failure of the set-up raises the same
    :class:`CheckpointError` on every worker."""
    root = Path(root)
    final = root / f"step-{position.step:08d}"
    tmp = root / f".step-{position.step:08d}.tmp"
    snapshot = None
    if background:
        snapshot = buffers if buffers is not None else HostBuffers()
        if snapshot.in_use:
            raise RuntimeError("checkpoint.start: a write still reads these host buffers (commit it first)")
    payload = _worker_payload(model, plain, optimizer, comm.rank, snapshot)
    if comm.rank == 0:
        payload["schedule"] = copy.deepcopy(dict(schedule_state))  # nothing shared with the live schedule
    # What the checkpoint will take on disk (tensor bytes; torch.save adds a little per tensor).
    need = sum(comm.gather_objects(_payload_bytes(payload)))
    error = None
    if comm.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
            free = shutil.disk_usage(root).free
            if free < need:
                error = f"it needs {_mb(need)} in {root}, which has {_mb(free)} free"
            else:
                tmp.mkdir()
        except OSError as exc:
            error = f"cannot create {tmp}: {exc}"
    _raise_if_any(comm, error, f"checkpoint of step {position.step}", root)
    meta = {  # all but the files' sizes and hashes, known once every worker has written its file
        "format": FORMAT,
        "step": position.step,
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "world_size": comm.world_size,
        "scheme": scheme,
        "shapes": {n: list(s) for n, s in _full_shapes(model, plain).items()},
        "specs": {n: [s.dim, list(s.sizes)] for n, s in _specs(model).items()},
    }
    return Write(comm.rank, meta, tmp, final, need, config_yaml, keep_last, payload, snapshot)


class Write:
    """One checkpoint on its way to disk: this worker's file (written by :func:`start`, or being
    written by a background thread), then :meth:`commit`. At most one per worker is in flight: the
    trainer commits one before it starts the next."""

    def __init__(
        self,
        rank: int,
        meta: dict[str, Any],
        tmp: Path,
        final: Path,
        need: int,
        config_yaml: str,
        keep_last: int | None,
        payload: dict[str, Any],
        snapshot: HostBuffers | None,
    ):
        self.rank, self.meta, self.tmp, self.final, self.need = rank, meta, tmp, final, need
        self.step: int = meta["step"]
        self.config_yaml, self.keep_last = config_yaml, keep_last
        self._record: tuple[tuple | None, str | None] = (None, f"worker {rank}: the write of {tmp} never ran")
        self._thread: threading.Thread | None = None
        if snapshot is not None:
            # A daemon: a run that dies for another reason is not kept alive by its write (the
            # .tmp directory it leaves is never read). The thread holds the only reference to
            # the payload.
            self._thread = threading.Thread(
                target=self._write, args=(payload, snapshot), name=f"hybridpar-checkpoint-{rank}", daemon=True
            )
            snapshot.in_use = True
            self._thread.start()
        else:
            self._write(payload, None)

    def _write(self, payload: dict[str, Any], snapshot: HostBuffers | None) -> None:
        try:
            self._record = _write_worker_file(payload, self.tmp, self.rank)
        except Exception as exc:  # noqa: BLE001 - anything else that fails in the thread is reported, not lost with it
            self._record = None, f"worker {self.rank} cannot write its part of {self.tmp}: {type(exc).__name__}: {exc}"
        finally:
            if snapshot is not None:
                snapshot.in_use = False  # the file is written (or failed): the buffers may be refilled

    def written(self) -> bool:
        """This worker's file is on disk, fsync'd and hashed, or its write failed: nothing runs."""
        return self._thread is None or not self._thread.is_alive()

    def commit(self, comm: Communicator) -> Path:
        """The second half (every worker, at the same point; waits for this worker's own write):
        every worker's file record or error is gathered, and when none failed worker 0 writes
        ``meta.json``, renames the directory into place and prunes. A failure anywhere raises the
        same :class:`CheckpointError` on every worker, with the partial ``.tmp`` removed."""
        if self._thread is not None:
            self._thread.join()
        records = comm.gather_objects(self._record)
        errors = [f"{e} (the checkpoint needs {_mb(self.need)})" for _, e in records if e]
        if not errors and comm.rank == 0:
            meta = {
                **self.meta,
                "files": {r[0]: {"bytes": r[1], "sha256": r[2]} for r, _ in records},
                "config": self.config_yaml,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            try:
                _commit(self.tmp, self.final, meta, self.keep_last)
            except OSError as exc:
                errors.append(f"cannot finish {self.final}: {exc}")
        if errors and comm.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)  # a partial write frees its space; nothing reads it
        _raise_if_any(comm, errors[0] if errors else None, f"checkpoint of step {self.step}", self.final.parent)
        return self.final


def _payload_bytes(payload: dict) -> int:
    tensors = sum(t.numel() * t.element_size() for t in payload["tensors"].values())
    return int(tensors * 1.01) + 2**16  # torch.save's zip records, alignment and pickled names


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _write_worker_file(payload: dict, tmp: Path, rank: int) -> tuple[tuple | None, str | None]:
    """This worker's file in ``tmp``: ``((name, bytes, sha256), None)``, or ``(None, error)``."""
    name = f"worker-{rank:03d}.pt"
    try:
        torch.save(payload, tmp / name)
        _fsync_file(tmp / name)
        return (name, (tmp / name).stat().st_size, _sha256(tmp / name)), None
    except (OSError, RuntimeError) as exc:  # torch.save reports a missing directory as RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"worker {rank} cannot write {tmp / name}: {first}"


def _commit(tmp: Path, final: Path, meta: dict, keep_last: int | None) -> None:
    """meta.json last, then the whole directory into place in one rename (worker 0)."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _fsync_file(tmp / "meta.json")
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (a restart); the new copy is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _prune(final.parent, keep_last)


def _raise_if_any(comm: Communicator, error: str | None, what: str | None = None, root: Path | None = None) -> None:
    """Every worker raises the same error if any worker has one (no worker is left waiting):
    ``what`` not written, naming the last checkpoint under ``root`` still intact; without ``what``
    the error as it is."""
    seen = [e for e in comm.gather_objects(error) if e]
    if not seen:
        return
    if what is None:
        raise CheckpointError(seen[0])
    kept = checkpoints(root) if root is not None and root.is_dir() else []
    intact = f"; the last checkpoint, {kept[-1].name}, is intact" if kept else ""
    raise CheckpointError(f"{what} not written: {seen[0]}{intact}")


def check_shared(comm: Communicator, root: Path) -> None:
    """Before step 1: every worker must see the same, writable checkpoint directory. Worker 0
    writes a token there and every worker reads it back; a node with its own local copy of the
    path (no shared file system) or a directory it cannot write fails here, in one line, instead
    of at the first checkpoint."""
    root = Path(root)
    token, error = None, None
    if comm.rank == 0:
        token = f"{os.getpid()}-{time.time_ns()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / ".shared-check").write_text(token)
        except OSError as exc:
            error = f"cannot write to checkpoint.dir {root}: {exc.strerror or exc}"
    _raise_if_any(comm, error)
    token = comm.gather_objects(token)[0]
    try:
        seen = (root / ".shared-check").read_text() == token
    except OSError:
        seen = False
    missing = [r for r, ok in enumerate(comm.gather_objects(seen)) if not ok]
    if comm.rank == 0:
        (root / ".shared-check").unlink(missing_ok=True)
    if missing:
        raise CheckpointError(
            f"checkpoint.dir {root} is not the same directory on every worker (worker(s) {', '.join(map(str, missing))} "
            "cannot see what worker 0 wrote there): put checkpoint.dir on storage every node sees (a shared file system)"
        )


def _prune(root: Path, keep_last: int | None) -> None:
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last:
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# ---- finding and checking ----------------------------------------------------------------


def checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories under ``root``, oldest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def verify(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """``meta.json`` of the checkpoint at ``path`` if every file it lists is there, whole."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a hybridpar checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this hybridpar reads {FORMAT}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}/meta.json is not a hybridpar checkpoint description ({exc})") from None
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(
                f"{path}: {name} is {f.stat().st_size} bytes, meta.json says {want['bytes']} (truncated?)"
            )
        if hashes and _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its SHA-256 in meta.json (corrupted)")
    return meta


def latest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``root`` that verifies; broken ones are reported and skipped."""
    for path in reversed(checkpoints(root)):
        try:
            return path, verify(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


# ---- loading -----------------------------------------------------------------------------


def _read(path: Path, name: str) -> dict[str, Any]:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not our file
        raise CheckpointError(
            f"{path}/{name} cannot be read as a checkpoint file ({type(exc).__name__}: {exc})"
        ) from None


class _Full:
    """Full (single-device) tensors of a checkpoint, re-assembled from its shards on demand."""

    def __init__(self, path: Path, meta: Mapping[str, Any]):
        self.meta = meta
        self.files = [_read(path, f"worker-{r:03d}.pt") for r in range(meta["world_size"])]
        self.specs = {n: ShardSpec(d, tuple(s)) for n, (d, s) in meta["specs"].items()}

    def get(self, key: str) -> torch.Tensor | None:
        _, name = key.split("/", 1)
        if name in self.specs:  # the shards are in the first len(sizes) workers' files
            parts = [f["tensors"].get(key) for f in self.files[: len(self.specs[name].sizes)]]
            if any(p is None for p in parts):
                return None
            return torch.cat(parts, self.specs[name].dim)
        return self.files[0]["tensors"].get(key)


def load(
    comm: Communicator,
    path: Path,
    meta: Mapping[str, Any],
    *,
    model: nn.Module,
    plain: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheme: str,
) -> tuple[Position, dict[str, Any]]:
    """Load the checkpoint into this worker's model and optimizer, re-cut for this layout; return
    the position and the schedule state. RNG streams are restored when the world size and scheme
    are the ones that wrote it (otherwise every worker's streams start from the seed again)."""
    path = Path(path)
    _check_shapes(path, _full_shapes(model, plain), meta["shapes"])
    full = _Full(path, meta)
    specs = _specs(model)

    def mine(name: str, t: torch.Tensor) -> torch.Tensor:
        return specs[name].take(t, comm.rank).clone() if name in specs else t.clone()

    state = {}
    for n in plain.state_dict():
        t = full.get(f"model/{n}")
        if t is None:
            raise CheckpointError(f"{path}: no tensor for {n}")
        state[n] = mine(n, t)
    plain.load_state_dict(state, strict=True)
    names = {id(p): n for n, p in plain.named_parameters()}
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = full.get(f"momentum/{names[id(p)]}")
            if buf is not None:
                optimizer.state[p] = {"momentum_buffer": mine(names[id(p)], buf).to(p.device)}
    lr = full.files[0]["lr"]
    if len(lr) == len(optimizer.param_groups):
        for g, v in zip(optimizer.param_groups, lr):
            g["lr"] = v
    _restore_rng(comm, full, meta, model, plain, scheme)
    position = Position(meta["step"], meta["epoch"], meta["step_in_epoch"])
    return position, full.files[0].get("schedule", {})


def _check_shapes(path: Path, here: Mapping[str, Any], there: Mapping[str, Any]) -> None:
    for n in sorted(set(here) | set(there)):
        if n not in there or n not in here:
            where = "the model here" if n not in here else "the checkpoint"
            raise CheckpointError(f"{path} was written for another model: {n} is missing from {where}")
        if list(here[n]) != list(there[n]):
            raise CheckpointError(
                f"{path} was written for another model: {n} is {list(there[n])} there, {list(here[n])} here"
            )


def _restore_rng(comm: Communicator, full: _Full, meta, model: nn.Module, plain: nn.Module, scheme: str) -> None:
    """Every random stream as it was, when the world size and scheme are the ones that wrote it."""
    own = full.files[comm.rank] if comm.rank < len(full.files) else None
    if own is not None and meta["world_size"] == comm.world_size and meta.get("scheme") == scheme:
        rng = own["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        for k, g in _dropout_generators(model, _device(plain)).items():
            if f"dropout/{k}" in rng:
                g.set_state(rng[f"dropout/{k}"])
    elif comm.rank == 0:
        log.info(
            "resuming with %d workers (%s) from a checkpoint of %d (%s): random streams restart from the seed",
            comm.world_size,
            scheme,
            meta["world_size"],
            meta.get("scheme"),
        )


def full_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The single-device ``state_dict`` held by the checkpoint at ``path`` (for export)."""
    meta = verify(path)
    full = _Full(Path(path), meta)
    out = {}
    for n in meta["shapes"]:
        t = full.get(f"model/{n}")
        if t is None:
            raise CheckpointError(f"{path}: no tensor for {n}")
        out[n] = t.clone()
    return out
