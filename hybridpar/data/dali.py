"""Image folders decoded and augmented by NVIDIA DALI: the torch loaders' batches, without worker processes.

On a fast GPU the PIL loader (``loaders.py``) needs many worker processes to keep up; DALI decodes JPEGs on the
GPU (nvJPEG, ``device="mixed"``) or in its own C++ threads (``"cpu"``) and resizes, crops, flips and normalises
the whole batch in one pipeline. Everything else is the torch loader's, so a run can switch ``data.loader``
(even mid-run, from a checkpoint) and see the same examples at the same steps:

* Order. Each epoch's indices come from the torch loader's own sampler (``loaders._Sampler``: one permutation
  seeded by ``seed + epoch``, worker ``r`` taking positions ``r, r+W, ...``, the examples after the last full
  global batch sitting the epoch out), cut into batches of ``local_batch``.
* Augmentation. Each example's crop window, flip and lighting are drawn in Python from the same keyed
  generator as ``PaperTransform`` (``example_generator(seed, epoch, index)``, same draws in the same order),
  on the same resized size, computed as torchvision computes it; they reach DALI as per-sample arguments.
  PCA lighting adds one RGB offset per image before normalisation, so it folds into that image's mean:
  ``((p/255 + rgb) - mean) / std = (p - 255 (mean - rgb)) / (255 std)``; one ``crop_mirror_normalize`` on the
  decoded batch (on the GPU when decoding is) does flip, lighting and normalisation.
* Unreadable files. The next readable example stands in (its label, the requested example's draws), counted
  on ``.skipped`` and logged once per file, as ``ImageFiles.load`` does.

Files reach DALI as encoded bytes read in Python (``fn.external_source``), not through ``fn.readers.file``:
the reader keeps its own order and shards, reads ahead across the epoch boundary and can only start an epoch
part-way by being rebuilt at an offset, and its samples could not carry the keyed per-example draws. With
bytes fed batch by batch, every row is the sampler's example, a resumed epoch starts at its batch with nothing
read ahead, and a batch that fails can be fed again with stand-ins. One batch is in flight: DALI decodes batch
``j + 1`` while the caller trains on batch ``j``.

What differs from the torch loader:

* Pixels. DALI's decoders (libjpeg-turbo via nvImageCodec on the CPU; nvJPEG on the GPU, with libjpeg's
  "fancy" chroma upsampling switched on to match) and its antialiased linear resize are not PIL's: values
  differ by about one grey level in 255 on the CPU, so a run is reproducible per loader, not across loaders.
  Both ignore EXIF orientation. CMYK and other unusual JPEGs may convert to RGB differently.
* Unreadable files. A file whose header cannot be read is found before DALI sees it. One that DALI cannot
  decode (cut short, say) fails its whole batch; the loader then finds the file(s) to blame (a full PIL decode,
  then DALI alone on each row if PIL decodes them all), replaces them and runs the batch again. A file found
  unreadable stays skipped for the rest of the loader's life instead of being tried again every epoch (each
  try would cost a failed batch and a new pipeline), and the decoders' own error lines go to stderr.
* ``num_workers`` and ``pin_memory`` have no meaning here; ``num_threads`` sizes DALI's thread pool and the
  one that reads files.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hybridpar.data.bundle import DataError, check_int
from hybridpar.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    PaperTransform,
    decode,
    example_generator,
    report_unreadable,
)
from hybridpar.data.loaders import _check_rank, _Sampler, eval_steps

DALI_MISSING = 'data.loader=dali needs NVIDIA DALI: pip install -e ".[dali]"'


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """Raise the one-line ``DataError`` saying how to install DALI, where it is missing."""
    if not dali_available():
        raise DataError(DALI_MISSING)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Row(NamedTuple):
    """One example as fed to the pipeline: the file that stands in for it and how to cut it."""

    path: str  # the file decoded: the example's own, or the next readable one
    encoded: np.ndarray  # its bytes
    label: int
    size: tuple[int, int]  # (height, width) after resizing the short side
    start: tuple[int, int]  # (top, left) of the crop in the resized image
    mirror: bool
    lighting: Tensor  # the RGB offset PCA lighting adds, in [0, 1] pixel units
    substituted: bool
    unreadable: tuple[tuple[str, str], ...]  # (path, reason) of the unreadable files passed over


def _resized(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``short_side``, truncated as torchvision truncates."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def _cause(exc: RuntimeError) -> str:
    """The line of DALI's error that says what went wrong (the rest is its pipeline traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Current pipeline object is no longer valid")]
    return lines[-1] if lines else repr(exc)


class _Failed(Exception):
    """The pipeline failed a batch (DALI's message); the pipeline object is gone with it."""


class _Pipeline:
    """A DALI pipeline for one worker: feeds a batch of rows, hands back their images as one tensor.

    DALI gives up on a pipeline once an operator has failed ("no longer valid"), and its message does not say
    which sample failed; after a failure this object drops the pipeline and builds a new one on the next feed.
    """

    def __init__(self, max_batch: int, image_size: int, device: torch.device, num_threads: int):
        self.max_batch, self.image_size, self.device, self.num_threads = max_batch, image_size, device, num_threads
        self._pipe: Any = None
        self._rows = 0  # rows of the batch in flight; 0: none

    def _build(self) -> Any:
        from nvidia.dali import Pipeline, fn, types

        cuda = self.device.type == "cuda"
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        )
        s = self.image_size
        # Depth 1: the caller, not DALI, decides what runs next, so a failure belongs to the one batch in flight.
        pipe = Pipeline(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            mean = fn.external_source(name="mean", dtype=types.FLOAT, ndim=1)
            decode_args: dict[str, Any] = {"jpeg_fancy_upsampling": True} if cuda else {}
            images = fn.decoders.image(
                encoded,
                device="mixed" if cuda else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,  # PIL (and so the torch loader) ignores EXIF orientation
                **decode_args,
            )
            images = fn.resize(images, size=size)
            images = fn.slice(images, start=start, shape=[s, s], axis_names="HW")
            pipe.set_outputs(
                fn.crop_mirror_normalize(
                    images,
                    mirror=mirror,
                    mean=mean,
                    std=[255.0 * v for v in IMAGENET_STD],
                    dtype=types.FLOAT,
                    output_layout="CHW",
                )
            )
        pipe.build()
        return pipe

    def submit(self, rows: Sequence[_Row]) -> None:
        """Start decoding ``rows``; ``result()`` waits for them."""
        self.discard()
        if self._pipe is None:
            self._pipe = self._build()
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        pipe = self._pipe
        pipe.feed_input("encoded", [row.encoded for row in rows])
        pipe.feed_input("size", [np.asarray(row.size, dtype=np.float32) for row in rows])
        pipe.feed_input("start", [np.asarray(row.start, dtype=np.int32) for row in rows])
        pipe.feed_input("mirror", [np.asarray(row.mirror, dtype=np.int32) for row in rows])
        pipe.feed_input("mean", [255.0 * (mean - row.lighting.numpy()) for row in rows])
        pipe.schedule_run()
        self._rows = len(rows)

    def result(self) -> Tensor:
        """The images of the batch in flight, ``N×3×S×S`` float32 on the device; ``_Failed`` if DALI failed."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n, self._rows = self._rows, 0
        try:
            (images,) = self._pipe.share_outputs()
            x = torch.empty((n, 3, self.image_size, self.image_size), dtype=torch.float32, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            # As DALI's own torch iterator does: copy on torch's stream, then hand the buffers back.
            feed_ndarray(images.as_tensor(), x, cuda_stream=stream)
            self._pipe.release_outputs()
        except RuntimeError as exc:
            self._pipe = None
            raise _Failed(_cause(exc)) from exc
        return x

    def discard(self) -> None:
        """Wait out and drop a batch left in flight (its consumer stopped early)."""
        if self._rows:
            try:
                self.result()
            except _Failed:
                pass


class _Decoder:
    """Turns batches of example indices into ``(x, y, substituted, unreadable)``, one batch in flight."""

    def __init__(self, dataset: ImageFiles, max_batch: int, device: torch.device, num_threads: int):
        if not isinstance(dataset.preprocess, PaperTransform):
            raise DataError(f"data.loader=dali needs the paper's transform, got {dataset.preprocess!r}")
        require_dali()
        self.dataset, self.preprocess, self.device = dataset, dataset.preprocess, device
        self.pipeline = _Pipeline(max_batch, self.preprocess.image_size, device, num_threads)
        self.io = ThreadPoolExecutor(num_threads, thread_name_prefix="hybridpar-dali-read")
        self.bad: dict[str, str] = {}  # path -> why it is unreadable; never read again

    def batches(
        self, batches: Sequence[Sequence[int]], seed: int, epoch: int
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, list[tuple[str, str]]]]:
        if not batches:
            return
        rows = self._rows(batches[0], seed, epoch)
        self.pipeline.submit(rows)
        try:
            for j, indices in enumerate(batches):
                x, rows = self._finish(indices, rows, seed, epoch)
                y = torch.tensor([row.label for row in rows], dtype=torch.long)
                substituted = torch.tensor([row.substituted for row in rows], dtype=torch.bool)
                unreadable = [entry for row in rows for entry in row.unreadable]
                if j + 1 < len(batches):
                    rows = self._rows(batches[j + 1], seed, epoch)
                    self.pipeline.submit(rows)
                yield x, y.to(self.device), substituted.to(self.device), unreadable
        finally:
            self.pipeline.discard()

    def _finish(self, indices: Sequence[int], rows: list[_Row], seed: int, epoch: int) -> tuple[Tensor, list[_Row]]:
        """The batch in flight's images; after a failure, the batch again with its bad files replaced."""
        while True:
            try:
                return self.pipeline.result(), rows
            except _Failed as exc:
                blamed = self._blame(rows)
                if not blamed:
                    raise DataError(
                        f"DALI failed a batch of {len(rows)} images under {self.dataset.root}, but decodes each of "
                        f"them alone: {exc}"
                    ) from None
                self.bad.update(blamed)  # each round marks at least one more file: the loop ends
                rows = self._rows(indices, seed, epoch)
                self.pipeline.submit(rows)

    def _blame(self, rows: Sequence[_Row]) -> dict[str, str]:
        """The files of a failed batch that cannot be decoded, with why."""
        blamed: dict[str, str] = {}
        for row in rows:
            try:
                decode(row.path)  # full decode: a file cut short passes the header check
            except Exception as exc:  # noqa: BLE001 - any exception means the file is unusable
                blamed[row.path] = _reason(exc)
        if blamed:
            return blamed
        # PIL decodes them all: ask DALI, one file at a time.
        for row in rows:
            self.pipeline.submit([row])
            try:
                self.pipeline.result()
            except _Failed as exc:
                blamed[row.path] = f"DALI cannot decode it: {exc}"
        return blamed

    def _rows(self, indices: Sequence[int], seed: int, epoch: int) -> list[_Row]:
        samples = self.dataset.samples
        # Read in parallel: on a network file system each file is a round trip.
        todo = [samples[i][0] for i in indices if samples[i][0] not in self.bad]
        opened = dict(zip(todo, self.io.map(_open, todo)))
        return [self._row(i, seed, epoch, opened) for i in indices]

    def _row(self, index: int, seed: int, epoch: int, opened: dict[str, Any]) -> _Row:
        """Example ``index``, or the next readable one standing in for it, wrapping round (``ImageFiles.load``)."""
        samples = self.dataset.samples
        n = len(samples)
        unreadable: list[tuple[str, str]] = []
        for step in range(n):
            path, label = samples[(index + step) % n]
            if path not in self.bad:
                got = opened[path] if step == 0 and path in opened else _open(path)
                if not isinstance(got, str):
                    encoded, (width, height) = got
                    return self._placed(path, encoded, label, width, height, seed, epoch, index, step, unreadable)
                self.bad[path] = got
            unreadable.append((path, self.bad[path]))
        raise DataError(
            f"every one of the {n} images under {self.dataset.root} is unreadable (e.g. {unreadable[0][0]}: "
            f"{unreadable[0][1]}); nothing can stand in for them"
        )

    def _placed(
        self,
        path: str,
        encoded: np.ndarray,
        label: int,
        width: int,
        height: int,
        seed: int,
        epoch: int,
        index: int,
        step: int,
        unreadable: list[tuple[str, str]],
    ) -> _Row:
        """The row with ``PaperTransform``'s geometry and draws, keyed by the requested ``index``."""
        p, s = self.preprocess, self.preprocess.image_size
        h, w = _resized(width, height, p.resize)
        if p.train:
            g = example_generator(seed, epoch, index)
            top = int(torch.randint(0, h - s + 1, (1,), generator=g))
            left = int(torch.randint(0, w - s + 1, (1,), generator=g))
            mirror = torch.rand(1, generator=g).item() < 0.5
            lighting = p.lighting(torch.zeros(3, 1, 1), g).view(3)  # the offset Lighting adds, same draw
        else:
            # torchvision's centre crop rounds half to even (Python's round), and so does this.
            top, left = round((h - s) / 2.0), round((w - s) / 2.0)
            mirror, lighting = False, torch.zeros(3)
        return _Row(path, encoded, label, (h, w), (top, left), mirror, lighting, step > 0, tuple(unreadable))


def _open(path: str) -> tuple[np.ndarray, tuple[int, int]] | str:
    """The file's bytes and the image's (width, height) from its header, or why it is unreadable."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
    except Exception as exc:  # noqa: BLE001 - the file system, PIL and this one file: any failure means unusable
        return _reason(exc)
    return np.frombuffer(data, dtype=np.uint8), size


class DaliTrainLoader:
    """``train_loader``'s interface over DALI: ``start_epoch``, ``(x, y)`` batches on the device, ``len``, and
    ``skipped``, the examples over all epochs so far whose file was unreadable."""

    def __init__(
        self,
        dataset: ImageFiles,
        *,
        local_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        num_threads: int,
    ):
        self.dataset, self.batch_size, self.seed = dataset, local_batch, seed
        self.sampler = _Sampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skipped = 0
        self._decoder = _Decoder(dataset, local_batch, device, num_threads)

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Set the epoch (its permutation and draws) and leave out its first ``skip_batches`` batches unread."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = skip_batches * self.batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, b = list(self.sampler), self.batch_size
        batches = [order[j : j + b] for j in range(0, len(order) - b + 1, b)]
        for x, y, substituted, unreadable in self._decoder.batches(batches, self.seed, self.sampler.epoch):
            self.skipped += int(substituted.sum())
            report_unreadable(self.dataset, unreadable)
            yield x, y


class DaliEvalBatches(Iterator[tuple[Tensor, Tensor, Tensor]]):
    """``eval_batches``' ``(x, y, valid)`` over examples ``rank, rank+W, ...``, decoded by DALI; ``skipped``
    counts this worker's held-out examples whose file was unreadable (complete once exhausted)."""

    def __init__(
        self,
        dataset: ImageFiles,
        *,
        local_batch: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_threads: int,
    ):
        self.skipped = 0
        decoder = _Decoder(dataset, local_batch, device, num_threads)  # fails here, not at the first batch
        self._batches = self._padded(decoder, local_batch, rank, world_size)

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        return next(self._batches)

    def _padded(self, decoder: _Decoder, b: int, rank: int, world_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        dataset, device = decoder.dataset, decoder.device
        s = decoder.preprocess.image_size
        mine = list(range(rank, len(dataset), world_size))
        chunks = [mine[j : j + b] for j in range(0, len(mine), b)]
        # Seed and epoch 0: the evaluation transform draws nothing.
        for x_real, y_real, substituted, unreadable in decoder.batches(chunks, 0, 0):
            self.skipped += int(substituted.sum())
            report_unreadable(dataset, unreadable)
            k = len(y_real)
            x = torch.zeros((b, 3, s, s), device=device)
            y = torch.zeros(b, dtype=torch.long, device=device)
            x[:k], y[:k] = x_real, y_real
            valid = torch.arange(b, device=device) < k
            valid[:k] &= ~substituted  # a stand-in would count its own example twice
            yield x, y, valid
        for _ in range(eval_steps(len(dataset), b, world_size) - len(chunks)):
            zeros = torch.zeros(b, device=device)
            yield torch.zeros((b, 3, s, s), device=device), zeros.long(), zeros.bool()


def dali_train_loader(
    dataset: ImageFiles,
    *,
    local_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    num_threads: int = 2,
) -> DaliTrainLoader:
    """``train_loader`` for an image folder, decoded and augmented by DALI on ``device``'s kind of hardware."""
    check_int(local_batch, "local_batch")
    _check_rank(rank, world_size)
    check_int(seed, "seed", minimum=0)
    check_int(num_threads, "num_threads")
    global_batch = world_size * local_batch
    if len(dataset) < global_batch:
        raise DataError(
            f"the training set has {len(dataset)} examples, fewer than one global batch "
            f"(world_size={world_size} x local_batch={local_batch} = {global_batch})"
        )
    return DaliTrainLoader(
        dataset,
        local_batch=local_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=torch.device(device),
        num_threads=num_threads,
    )


def dali_eval_batches(
    dataset: ImageFiles, *, local_batch: int, rank: int, world_size: int, device: torch.device, num_threads: int = 2
) -> DaliEvalBatches:
    """``eval_batches`` for an image folder: exactly ``local_batch`` rows per batch, every worker
    ``eval_steps(len(dataset), local_batch, world_size)`` batches, padding and stand-ins marked invalid."""
    check_int(local_batch, "local_batch")
    _check_rank(rank, world_size)
    check_int(num_threads, "num_threads")
    if len(dataset) == 0:
        raise DataError("the held-out set is empty; nothing to evaluate")
    return DaliEvalBatches(
        dataset,
        local_batch=local_batch,
        rank=rank,
        world_size=world_size,
        device=torch.device(device),
        num_threads=num_threads,
    )
