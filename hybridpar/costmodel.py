"""Step-time cost model: per-layer compute times, an alpha-beta link, the overlap of each scheme.

    python -m hybridpar.costmodel profile --batch 16 --out profile.json     # measure this device
    python -m hybridpar.costmodel predict --profile profile.json --rate 1gbit --workers 2 --batch 16
    python -m hybridpar.costmodel project --profile profile.json --rate 1gbit --batch 128 --max-workers 64

``predict`` also lists the trunk's options for that link (pipelined sums, micro-batches, chunked
rounds; ``--lossy``: each with bf16 sums), fastest first, as the overrides that set them.

**Compute** comes from a :class:`Profile`: forward and backward seconds per image of each trunk
stage (a layer with weights plus the weight-free layers after it), the FLOP rate of the head's
matrix products, and the optimizer's seconds per parameter — measured on the machine it runs on
(:func:`measure_profile`) or given as JSON. A device ``speed`` times faster divides all of them.

**Communication** is alpha-beta per collective: ``steps · alpha + elements · itemsize / bandwidth``
with ``steps`` = K−1 (all-gather, reduce-scatter, all-to-all) or 2(K−1) (ring all-reduce), and
``elements`` the larger of what the busiest worker sends and receives in that direction (every
worker has its own full-duplex link, e.g. a port on a switch). The moves, their element counts and
message steps are the step program's (:mod:`hybridpar.parallel.program`), the same ones the model
runs and the ledger is checked against.

**Overlap** is a two-resource timeline per worker — the processor and the link — replayed in the
order each scheme issues its work (:func:`step_time`):

* DDP: forward; backward, each gradient bucket's all-reduce issued when its last gradient is ready
  (25 MB buckets, last layer first); wait; optimizer.
* hybrid (a): trunk forward; the head's moves block (features out, logits' gradients back); trunk
  backward with the trunk's bucketed all-reduce issued as in DDP; wait; optimizer.
* hybrid (b)/(c): K rounds; round j+1's features are issued before round j computes, round j's
  feature gradients leave while round j+1 computes; the moves inside the head block; then trunk
  backward with its buckets as in (a).
* the head's weight gradients (``defer_wgrad``, the default): after the trunk's backward, while
  its sums travel; the head's backward on the chain is its input gradients only.

The processor also pays for the transport where they share cores (``Link.cpu_s_per_byte``, more
per byte for bf16 sums) and for issuing each collective (``Link.cpu_s_per_call``, on the timeline
of the thread that issues it): the step is at least compute + those. The model has no fitted
constants: alpha, the bandwidth and the transport's processor time are measured on the link
(``bench/schemes.py`` does this before the runs it predicts), compute on the device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from hybridpar.comm.base import AGREE_ITEMSIZE, even_split
from hybridpar.models.split import split_model
from hybridpar.parallel.cost import AGREE_BYTES_PER_PEER, allreduce_bytes, allreduce_steps, head_shard_params
from hybridpar.parallel.data_parallel import TRUNK_BUCKET_ELEMENTS, bucket_sizes, trunk_bucket_numels
from hybridpar.parallel.head import choose_styles
from hybridpar.parallel.program import MOVES, head_layout, scheme_rounds
from hybridpar.parallel.program import SCHEMES as HYBRID_SCHEMES
from hybridpar.parallel.trunk_pipeline import PARTITION_ELEMENTS, WINDOW, partitions, propose_cap, schedule

SCHEMES = ("ddp", *HYBRID_SCHEMES)
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb
GRAD_ITEMSIZE = 4  # gradients are all-reduced in fp32 (fp32 master weights) whatever the compute dtype
# The input gradient's share of a conv's backward (the weight gradient's is the rest; the two are
# products of the same size): AlexNet's conv5 at b = 16 on a 2-core CPU, 20.0 of 44.0 ms. The
# pipelined trunk makes its deepest conv's weight gradient first; the profiles here are of trunks
# that end in a conv (AlexNet, VGG).
INPUT_GRAD_SHARE = 0.45


# ---- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One trunk stage: seconds per image forward and backward, and its parameter sizes."""

    name: str
    fwd_s: float
    bwd_s: float
    params: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """The compute side of the model: what one device does, per image or per FLOP."""

    device: str
    dtype: str
    batch: int  # images per timed call when measured
    trunk: tuple[Stage, ...]
    head: tuple[tuple[int, int], ...]  # (in, out) of each Linear of the head, in order
    # Achieved FLOP/s of the head's matrix products, forward and backward (input and weight
    # gradients), by the number of rows they run on: (rows, fwd, bwd), rows ascending. Few rows
    # run far below peak (the weights are read for little work), and the schemes differ exactly
    # in that: (a) runs the head shards on K·b rows, (b)/(c) on b per round, DDP on b.
    fc_rates: tuple[tuple[int, float, float], ...]
    opt_s_per_param: float  # one SGD (momentum, weight decay) step over the model, per parameter
    itemsize: int = 4  # bytes per activation element on the wire (2 under bf16 autocast)
    notes: str = ""
    # The trunk's time per image on fewer rows than ``batch``, relative to its time per image on
    # ``batch``: (rows, fwd, bwd), rows ascending. A trunk run in chunks (micro-batches, rounds)
    # is not ``rows`` times its per-image time: on a CPU smaller convolutions keep their working
    # set in cache (faster per image), on a GPU they fill fewer cores (slower). Empty: linear.
    trunk_scale: tuple[tuple[int, float, float], ...] = ()
    # A sum in bf16 (torch's bf16_compress_hook; parallel.trunk_comm_dtype=bf16) first casts the
    # gradient down and divides it, and copies the result back into the fp32 gradient: seconds per
    # element, on the processor that computes. 0: not measured (profiles from before it was).
    cast_s_per_elem: float = 0.0

    def scaled(self, speed: float) -> Profile:
        """The same network on a device ``speed`` times faster."""
        return replace(
            self,
            trunk=tuple(replace(s, fwd_s=s.fwd_s / speed, bwd_s=s.bwd_s / speed) for s in self.trunk),
            fc_rates=tuple((r, f * speed, b * speed) for r, f, b in self.fc_rates),
            opt_s_per_param=self.opt_s_per_param / speed,
            notes=f"{self.notes} ×{speed:g} speed".strip(),
        )

    def fc_rate(self, rows: float, backward: bool) -> float:
        """FLOP/s of the head's products on ``rows`` rows: interpolated in log(rows), clamped."""
        return _log_interp([(r, b if backward else f) for r, f, b in self.fc_rates], rows)

    def trunk_factor(self, rows: float, backward: bool) -> float:
        """The trunk's time per image on ``rows`` rows over its time per image on ``batch``
        (interpolated in log(rows), clamped; 1 where unmeasured)."""
        pts = [(r, b if backward else f) for r, f, b in self.trunk_scale if r < self.batch]
        return _log_interp([*pts, (self.batch, 1.0)], rows)

    def trunk_s(self, rows: float, backward: bool = False) -> list[float]:
        """Seconds of each trunk stage on ``rows`` images, forward or backward."""
        f = self.trunk_factor(rows, backward) * rows
        return [(s.bwd_s if backward else s.fwd_s) * f for s in self.trunk]

    @property
    def trunk_params(self) -> list[int]:
        return [n for s in self.trunk for n in s.params]

    @property
    def head_params(self) -> list[int]:
        return [n for i, o in self.head for n in (i * o, o)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        d = json.loads(text)
        d["trunk"] = tuple(Stage(s["name"], s["fwd_s"], s["bwd_s"], tuple(s["params"])) for s in d["trunk"])
        d["head"] = tuple(tuple(w) for w in d["head"])
        d["fc_rates"] = tuple(tuple(r) for r in d["fc_rates"])
        d["trunk_scale"] = tuple(tuple(r) for r in d.get("trunk_scale", ()))
        return cls(**d)


def _log_interp(points: Sequence[tuple[float, float]], rows: float) -> float:
    """``points`` = (rows, value), rows ascending: the value at ``rows``, interpolated in
    log(rows), clamped to the end points."""
    pts = [(math.log(r), v) for r, v in points]
    x = math.log(max(rows, 1e-9))
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


@dataclass(frozen=True)
class Link:
    """Alpha-beta: ``alpha_s`` per message step, ``bytes_per_s`` per direction per worker.

    ``cpu_s_per_byte``: processor time the transport itself takes per byte sent or received
    (socket copies, the sums of a reduction) where it shares the cores that compute — a CPU
    worker over TCP; ~0 for a GPU whose collectives run on their own engines. A step then takes
    at least compute + that transport time, however well the rest overlaps.

    ``burst_bytes``: a token-bucket link (``tc tbf``, as the two-host benchmark shapes its veth)
    saves up to this many bytes of credit while it is idle and sends them at once when traffic
    resumes — a move after a pause of the link is cheaper than bytes / rate; 0 for a wire.

    ``cpu_s_per_call``: processor time of issuing one collective, whatever its size (the
    communicator's bookkeeping, the transport's wake-ups), spent by the thread that issues it —
    it delays the work after it. Tens of microseconds on a GPU host, hundreds on a loaded CPU.

    ``cpu_s_per_bf16_byte``: the transport's processor time per byte of a bf16 sum. A sum costs per
    element as well as per byte (gloo adds bf16 element by element at nearly fp32's cost), so half
    the bytes do not take half the time; 0: as ``cpu_s_per_byte``.

    ``steal_s_per_byte``: what the transport takes from compute running beside it, per byte sent
    or received — measured directly (compute timed alone and beside a sum, as
    ``bench/schemes.py`` does), 0 where unmeasured. Where set it is the per-byte cost, and a bf16
    byte's is scaled by the same ratio. On a CPU host it exceeds the busy time the transport
    itself is counted for (1.4 against 0.3–0.5 ns/B at 1 Gbit/s on 2 cores): its threads wake on
    cores that compute holds, and each such delay on one worker holds the other at the next
    collective."""

    alpha_s: float
    bytes_per_s: float
    cpu_s_per_byte: float = 0.0
    burst_bytes: float = 0.0
    cpu_s_per_call: float = 0.0
    cpu_s_per_bf16_byte: float = 0.0
    steal_s_per_byte: float = 0.0

    def time(self, steps: int, elements: float, itemsize: int) -> float:
        return steps * self.alpha_s + elements * itemsize / self.bytes_per_s

    def transport_s(self, sent: float, bf16_sums: float = 0.0, calls: float = 0) -> float:
        """Processor seconds the communication takes from compute: ``sent`` bytes per worker,
        ``bf16_sums`` of them in bf16 sums (every worker receives about what it sends), in
        ``calls`` collectives."""
        fp32 = self.cpu_s_per_byte
        bf16 = self.cpu_s_per_bf16_byte or fp32
        if self.steal_s_per_byte:
            bf16 *= self.steal_s_per_byte / fp32 if fp32 else 1.0
            fp32 = self.steal_s_per_byte
        return 2 * (fp32 * (sent - bf16_sums) + bf16 * bf16_sums) + calls * self.cpu_s_per_call


def tbf_burst(rate: str) -> int:
    """The token bucket ``bench/twohost.sh`` gives a link of ``rate``: 10 ms at the rate, at least
    256 kB (a smaller one caps fast links below the rate)."""
    return max(262144, int(parse_rate(rate) / 100))


def parse_rate(text: str) -> float:
    """``'100mbit'``, ``'1gbit'``, ``'10Gbit'``, ``'6GB'`` (bytes), or bits/s as a number → bytes/s."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(bit|b|bps)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the rate {text!r}: use e.g. 100mbit, 1gbit, 10gbit or 6GB")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    unit = m.group(3) or "bit"
    return value if unit == "B" else value / 8


# ---- measuring a profile -----------------------------------------------------------------


def trunk_stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The trunk's modules (as the model's graph splits it; a chain, as in AlexNet and VGG) cut
    before each module with weights."""
    mods: list[tuple[str, nn.Module]] = []
    for name in split_model(model).trunk_module_names():
        child = model.get_submodule(name)
        mods += (
            [(f"{name}.{i}", m) for i, m in enumerate(child)] if isinstance(child, nn.Sequential) else [(name, child)]
        )
    stages: list[tuple[str, list[nn.Module]]] = []
    for name, m in mods:
        if not stages or any(True for _ in m.parameters(recurse=False)):
            stages.append((name, []))
        stages[-1][1].append(m)
    return [(name, nn.Sequential(*ms)) for name, ms in stages]


def _timed(fn, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_profile(
    model: nn.Module,
    image_size: int,
    batch: int,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int = 5,
    warmup: int = 2,
    head_rows: int | None = None,
    trunk_rows: Sequence[int] = (),
) -> Profile:
    """Time each trunk stage (forward, backward), the head's Linear layers and an SGD step.

    ``dtype=torch.bfloat16`` times under autocast (as the trainer's bf16 precision runs); the head
    is timed on up to ``head_rows`` rows (default ``batch``; scheme (a) runs it on K·b); the whole
    trunk also on each of ``trunk_rows`` (< batch) rows, for a trunk run in chunks."""
    dev = torch.device(device)
    model = model.to(dev)
    timer = _Timer(dev, torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32), reps, warmup)
    head = [m for m in split_model(model).head_layers(model) if isinstance(m, nn.Linear)]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    trunk = tuple(_time_trunk(model, timer, torch.randn(batch, 3, image_size, image_size, device=dev)))
    return Profile(
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        trunk=trunk,
        head=tuple((m.in_features, m.out_features) for m in head),
        fc_rates=tuple(_time_head(head, timer, head_rows or batch)),
        opt_s_per_param=_time_optimizer(model, timer),
        itemsize=2 if dtype == torch.bfloat16 else 4,
        trunk_scale=tuple(_trunk_scale(model, timer, trunk, batch, image_size, sorted(set(trunk_rows)), dev)),
        cast_s_per_elem=_time_cast(timer),
    )


def _trunk_scale(model, timer, trunk: Sequence[Stage], batch: int, image_size: int, rows: Sequence[int], dev) -> list:
    """(rows, fwd, bwd): the trunk's time per image on ``rows`` over its time per image on ``batch``."""
    out, fwd, bwd = [], sum(s.fwd_s for s in trunk), sum(s.bwd_s for s in trunk)
    for r in rows:
        if 0 < r < batch:
            small = _time_trunk(model, timer, torch.randn(r, 3, image_size, image_size, device=dev))
            out.append((r, sum(s.fwd_s for s in small) / fwd, sum(s.bwd_s for s in small) / max(bwd, 1e-12)))
    return out


@dataclass(frozen=True)
class _Timer:
    device: torch.device
    autocast: object
    reps: int
    warmup: int

    def forward_backward(self, fn, inp: torch.Tensor, grad: torch.Tensor | None = None) -> tuple[float, float]:
        """Median seconds of ``fn(inp)`` and of its backward (after warm-up)."""

        def fwd():
            with self.autocast:
                return fn(inp)

        def fwd_bwd():
            # Fresh gradients, as a training step has them after zero_grad(set_to_none=True):
            # accumulating into old ones would add a read and a write of every weight.
            for p in fn.parameters() if isinstance(fn, nn.Module) else ():
                p.grad = None
            inp.grad = None
            out = fwd()
            out.backward(grad if grad is not None else torch.ones_like(out))

        for _ in range(self.warmup):
            fwd_bwd()
        t_f = _timed(fwd, self.device, self.reps)
        return t_f, _timed(fwd_bwd, self.device, self.reps) - t_f


def _time_trunk(model: nn.Module, timer: _Timer, x: torch.Tensor) -> list[Stage]:
    stages, batch = [], x.shape[0]
    for i, (name, stage) in enumerate(trunk_stages(model)):
        inp = x.detach().requires_grad_(i > 0)  # the first layer's input needs no gradient
        with timer.autocast:
            out = stage(inp)
        t_f, t_b = timer.forward_backward(stage, inp, torch.randn_like(out))
        stages.append(Stage(name, t_f / batch, max(t_b, 0.0) / batch, tuple(p.numel() for p in stage.parameters())))
        x = out.detach().float()
    return stages


def _time_head(head: Sequence[nn.Linear], timer: _Timer, batch: int) -> list[tuple[int, float, float]]:
    """Achieved FLOP/s of the head's products, forward and backward, by rows (powers of 2 up to batch)."""
    rates = []
    for rows in sorted({1 << i for i in range(16) if 1 << i <= batch} | {batch}):
        flops, t_fwd, t_bwd = 0.0, 0.0, 0.0
        for lin in head:
            f, b = timer.forward_backward(
                lin, torch.randn(rows, lin.in_features, device=timer.device, requires_grad=True)
            )
            t_fwd, t_bwd = t_fwd + f, t_bwd + max(b, 1e-9)
            flops += 2.0 * rows * lin.in_features * lin.out_features
        rates.append((rows, flops / t_fwd, 2 * flops / t_bwd))
    return rates


def _time_cast(timer: _Timer, n: int = DDP_BUCKET_BYTES // GRAD_ITEMSIZE) -> float:
    """Seconds per element of a bf16 sum's own work: ``g.to(bf16).div_(K)``, then ``g.copy_(sum)``,
    on a DDP bucket's worth (per element, a buffer that fits the cache is 2-3x cheaper on a CPU;
    a small trunk partition costs little either way)."""
    g = torch.randn(n, device=timer.device)
    for _ in range(timer.warmup):
        g.copy_(g.to(torch.bfloat16).div_(2))
    return _timed(lambda: g.copy_(g.to(torch.bfloat16).div_(2)), timer.device, timer.reps) / n


def _time_optimizer(model: nn.Module, timer: _Timer) -> float:
    """Seconds per parameter of SGD over the model's own parameters (their sizes set its memory traffic)."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(timer.warmup):
        opt.step()
    return _timed(opt.step, timer.device, timer.reps) / sum(p.numel() for p in params)


# ---- the timeline ------------------------------------------------------------------------


@dataclass
class _Timeline:
    """One worker's processor and link: work runs in issue order on each; a collective starts
    when it is issued and the link is free; waiting for one stalls the processor. ``burst_s``:
    the link's token bucket in seconds at its rate (:attr:`Link.burst_bytes`): credit saved
    while the link is idle shortens the next transfers."""

    burst_s: float = 0.0
    call_s: float = 0.0  # Link.cpu_s_per_call
    cpu: float = 0.0
    link: float = 0.0
    compute: float = 0.0
    comm: float = 0.0
    tokens: float = 0.0
    calls: int = 0
    inflight: list[float] = field(default_factory=list)

    @classmethod
    def on(cls, link: Link) -> _Timeline:
        return cls(link.burst_bytes / link.bytes_per_s, link.cpu_s_per_call)

    def run(self, seconds: float) -> None:
        self.cpu += seconds
        self.compute += seconds

    def issue(self, seconds: float) -> float:
        self.cpu += self.call_s  # issuing it takes the processor first
        self.calls += 1
        if self.cpu > self.link:  # the link stood idle since its last transfer: the bucket fills
            self.tokens = min(self.burst_s, self.tokens + self.cpu - self.link)
        credit = min(self.tokens, seconds)
        self.tokens -= credit
        self.link = max(self.cpu, self.link) + seconds - credit
        self.comm += seconds - credit
        return self.link

    def post(self) -> None:
        """A tiny collective issued now and waited for only once it is long in (the batch-shape
        agreement, waited for after the trunk's forward; the pipelined trunk's proposals, a step
        later): the processor's call time only."""
        self.cpu += self.call_s
        self.calls += 1

    def wait(self, done: float) -> None:
        self.cpu = max(self.cpu, done)

    def blocking(self, seconds: float) -> None:
        self.wait(self.issue(seconds))


@dataclass(frozen=True)
class StepTime:
    step_s: float  # predicted step time
    compute_s: float  # processor busy time (forward, backward, optimizer)
    comm_s: float  # link busy time (all collectives, alpha included)
    bytes_sent: int  # per worker (rank 0), all collectives
    calls: float = 0  # collectives worker 0 issues per step (the ledger's entries)

    @property
    def exposed_s(self) -> float:
        return self.step_s - self.compute_s


def _move_time(link: Link, kind: str, n: int, betas: Sequence[int], itemsize: int, backward: bool) -> tuple[float, int]:
    """Seconds of one head move (forward or its backward mirror) and the elements rank 0 sends.

    The slowest worker sets the pace: the most any worker sends or receives in that direction."""
    move, K = MOVES[kind], len(betas)
    per_rank = [move.sent_recv(n, betas, r) for r in range(K)]
    if backward:
        per_rank = [(r, s) for s, r in per_rank]
    busiest = max(max(s, r) for s, r in per_rank)
    return link.time(move.steps(K), busiest, itemsize), per_rank[0][0]


def _allreduce_time(link: Link, n: int, K: int, itemsize: int = GRAD_ITEMSIZE) -> float:
    return link.time(allreduce_steps(K), max(allreduce_bytes(n, K, r, 1) for r in range(K)), itemsize)


def _issue_sum(tl: _Timeline, link: Link, n: int, K: int, itemsize: int, cast_s_per_elem: float) -> float:
    """Issue a gradient sum of ``n`` elements; in bf16 (``itemsize`` 2) the processor casts first."""
    if itemsize == 2:
        tl.run(n * cast_s_per_elem)
    return tl.issue(_allreduce_time(link, n, K, itemsize))


def _head_program(widths: Sequence[tuple[int, int]], styles: Sequence[str]) -> list[tuple]:
    """The step program's head (:func:`head_layout`) as ``('linear', i)`` and ``('move', kind, width)``."""
    per_linear, tail = head_layout(widths, styles)
    program: list[tuple] = []
    for i, (before, after) in enumerate(per_linear):
        program += [*(("move", *m) for m in before), ("linear", i), *(("move", *m) for m in after)]
    return program + [("move", *m) for m in tail]


def _linear_flops(n_in: int, n_out: int, style: str, rows: int, K: int) -> float:
    """Forward FLOPs of this worker's shard of one Linear on ``rows`` examples (worker 0's shard)."""
    return 2.0 * rows * (n_in * even_split(n_out, K)[0] if style == "col" else even_split(n_in, K)[0] * n_out)


def _backward_with_buckets(
    tl: _Timeline,
    link: Link,
    stages_bwd: Sequence[tuple[float, Sequence[int]]],
    bucket_cap: int,
    K: int,
    overlap: bool = True,
    itemsize: int = GRAD_ITEMSIZE,
    cast_s_per_elem: float = 0.0,
) -> list[float]:
    """Run the backward stages (last first); issue each bucket's all-reduce when its last
    gradient is ready (and wait for it at once unless ``overlap``). Buckets as
    :func:`bucket_sizes` forms them over the forward order."""
    numels = [n for _, params in reversed(stages_bwd) for n in params]  # forward order
    buckets = bucket_sizes(numels, bucket_cap)
    bucket_of = {i: b for b, idx in enumerate(buckets) for i in idx}
    missing = [len(idx) for idx in buckets]
    done, index = [], len(numels)
    for seconds, params in stages_bwd:
        tl.run(seconds)
        index -= len(params)
        for i in range(index, index + len(params)):
            b = bucket_of[i]
            missing[b] -= 1
            if missing[b] == 0 and K > 1:
                n = sum(numels[j] for j in buckets[b])
                done.append(_issue_sum(tl, link, n, K, itemsize, cast_s_per_elem))
                if not overlap:
                    tl.wait(done[-1])
    return done


def step_time(
    profile: Profile,
    link: Link,
    scheme: str,
    K: int,
    b: int,
    *,
    plan: str | Sequence[str] = "min_bytes",
    overlap: bool = True,
    bucket_cap: int = TRUNK_BUCKET_ELEMENTS,
    fc_group_size: int | None = None,
    trunk_sync: str = "bucketed",
    chunk_trunk: bool = False,
    micro_batches: int = 1,
    grad_itemsize: int = GRAD_ITEMSIZE,
    defer_wgrad: bool = True,
    comm_itemsize: int | None = None,
    weight_first: bool = True,
) -> StepTime:
    """Predicted time of one training step with ``K`` workers, ``b`` images each.

    ``fc_group_size=G`` (hybrid schemes): the 2-D layout — the head is sharded inside groups of G
    workers (its moves stay in the group), and each shard's gradient is all-reduced over the K/G
    workers holding it, issued when the head's backward is done; the trunk's over all K.
    ``trunk_sync="pipelined"``: the trunk's sums pipelined across the step boundary
    (``trunk_pipeline.py``); ``chunk_trunk`` (schemes b, c) or ``micro_batches = m`` (scheme a, m
    rounds): the trunk round by round (``rounds.py``); with any of them, the step time is the
    period of consecutive steps. ``grad_itemsize=2``: the trunk's
    (DDP: all) gradient sums travel in bf16. ``defer_wgrad`` (the default, as
    ``parallel.defer_wgrad``): the head's weight gradients are computed after the trunk's backward,
    while its sums travel; the backward of a head product then holds only its input gradient,
    timed as its forward; False: autograd's order. ``comm_itemsize=2`` (``parallel.comm_dtype=bf16``):
    the features' move and its gradients travel in bf16, the head's other moves as the profile's
    activations. ``weight_first`` (pipelined): the deepest conv's weight gradient made before its
    input gradient, as the code does (False: autograd's order)."""
    G = fc_group_size or K
    if K % G:
        raise ValueError(f"fc_group_size {G} must divide the number of workers {K}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if (chunk_trunk and scheme == "a") or (micro_batches > 1 and scheme != "a"):
        raise ValueError("chunk_trunk runs with schemes b and c, micro_batches with scheme a")
    if scheme == "ddp":
        tl, sent, done, n_opt = _ddp_step(profile, link, K, b, grad_itemsize)
        bf16_sums = sent if grad_itemsize == 2 else 0
    else:
        styles = choose_styles(list(profile.head), G, plan)
        # defer as the code: at K = 1 there is nothing to hide the weight gradients behind.
        step = _HybridStep(profile, link, K, b, G, styles, overlap, grad_itemsize, defer_wgrad and K > 1, comm_itemsize)
        step.input_grad_share = INPUT_GRAD_SHARE if weight_first else 0.0
        if K > 1 and (trunk_sync == "pipelined" or chunk_trunk or micro_batches > 1):
            rounds = scheme_rounds(scheme, b, G, micro_batches) if chunk_trunk or micro_batches > 1 else None
            return step.steady(scheme, trunk_sync == "pipelined", rounds, bucket_cap)
        tl, sent, done, n_opt = step.run(scheme, bucket_cap)
        bf16_sums = step.bf16_sums
    for t in done:
        tl.wait(t)
    tl.run(n_opt * profile.opt_s_per_param)
    floor = tl.compute + link.transport_s(sent, bf16_sums, tl.calls)
    return StepTime(max(tl.cpu, floor), tl.compute, tl.comm, int(sent), tl.calls)


def _ddp_step(
    profile: Profile, link: Link, K: int, b: int, itemsize: int = GRAD_ITEMSIZE
) -> tuple[_Timeline, int, list[float], int]:
    """DDP: forward; backward with each 25 MB bucket's all-reduce issued when its gradients are in
    (``itemsize`` 2: torch's bf16 compression hook, the buckets cut by their fp32 size)."""
    tl, widths = _Timeline.on(link), list(profile.head)
    tl.run(sum(profile.trunk_s(b)) + sum(2.0 * b * i * o for i, o in widths) / profile.fc_rate(b, False))
    head_bwd = [(4.0 * b * i * o / profile.fc_rate(b, True), (i * o, o)) for i, o in reversed(widths)]
    trunk_bwd = [(t, s.params) for t, s in zip(reversed(profile.trunk_s(b, True)), reversed(profile.trunk))]
    done = _backward_with_buckets(
        tl, link, head_bwd + trunk_bwd, DDP_BUCKET_BYTES // GRAD_ITEMSIZE, K, True, itemsize, profile.cast_s_per_elem
    )
    sent = allreduce_bytes(profile.trunk_params + profile.head_params, K, 0, itemsize)
    return tl, sent, done, sum(profile.trunk_params) + sum(profile.head_params)


class _Partitions:
    """The pipelined trunk sync's partitions (``trunk_pipeline.partitions``, the code's own cut)
    over a profile's trunk: ``sizes``; ``spans[s]``, the partitions stage s's parameters span;
    ``stage[j]``, the stage of partition j's first piece (j is ready once that stage's backward is
    done: every later piece belongs to a stage whose backward ran before)."""

    def __init__(self, profile: Profile):
        stage_of = [s for s, stage in enumerate(profile.trunk) for _ in stage.params]
        parts = partitions(profile.trunk_params, PARTITION_ELEMENTS)
        self.sizes = [sum(p.hi - p.lo for p in part) for part in parts]
        self.stage = [stage_of[part[0].param] for part in parts]
        self.backward, self.held = schedule(parts)  # the code's issue order
        self.spans: list[list[int]] = [[] for _ in profile.trunk]
        for j, part in enumerate(parts):
            for piece in part:
                if not self.spans[stage_of[piece.param]] or self.spans[stage_of[piece.param]][-1] != j:
                    self.spans[stage_of[piece.param]].append(j)


class _HybridStep:
    """One hybrid step on the timeline: the schedule the code runs (``rounds.py`` for (b)/(c))."""

    def __init__(
        self,
        profile: Profile,
        link: Link,
        K: int,
        b: int,
        G: int,
        styles,
        overlap: bool,
        grad_itemsize: int,
        defer: bool,
        comm_itemsize: int | None = None,
    ):
        self.profile, self.link, self.K, self.b, self.G = profile, link, K, b, G
        self.styles, self.overlap, self.gi = styles, overlap, grad_itemsize  # gi: the trunk's sums
        self.widths = list(profile.head)
        self.tl, self.sent, self.bf16_sums = _Timeline.on(link), 0, 0
        self.program = _head_program(self.widths, styles)
        self.comm_itemsize = comm_itemsize or profile.itemsize
        self.defer, self.deferred = defer, {}  # deferred: rows of each Linear's weight gradient not yet made
        self.caps: list[int] = []  # pipelined: the partitions each coming backward issues as ready
        self.input_grad_share = INPUT_GRAD_SHARE  # pipelined: the deepest conv's backward after its sums leave

    def run(self, scheme: str, bucket_cap: int) -> tuple[_Timeline, int, list[float], int]:
        tl, G, K, link = self.tl, self.G, self.K, self.link
        self.agree()
        tl.run(sum(self.profile.trunk_s(self.b)))
        self.head(scheme)
        shard = head_shard_params(self.widths, self.styles, G, 0)
        fc_sync = []

        def sum_shards():  # 2-D: the shard's gradient is summed over the K/G groups
            if K > G:
                fc_sync.append(tl.issue(_allreduce_time(link, shard, K // G)))
                self.sent += allreduce_bytes(shard, K // G, 0, GRAD_ITEMSIZE)

        if not self.defer:
            sum_shards()  # while the trunk's backward runs
        trunk = self.profile.trunk
        trunk_bwd = [(t, s.params) for t, s in zip(reversed(self.profile.trunk_s(self.b, True)), reversed(trunk))]
        done = _backward_with_buckets(
            tl, link, trunk_bwd, bucket_cap, K, self.overlap, self.gi, self.profile.cast_s_per_elem
        )
        self.run_deferred()
        if self.defer:
            sum_shards()  # once the deferred weight gradients exist
        done += fc_sync
        self.add_trunk_sums(allreduce_bytes(trunk_bucket_numels(self.profile.trunk_params, bucket_cap), K, 0, self.gi))
        return tl, self.sent, done, sum(self.profile.trunk_params) + shard

    def add_trunk_sums(self, nbytes: int) -> None:
        self.sent += nbytes
        self.bf16_sums += nbytes if self.gi == 2 else 0

    def agree(self) -> None:
        """The batch-shape agreement: issued at the step's start, waited for before the head's
        first move, long in by then (``Communicator.agree_async``)."""
        if self.G > 1:
            self.tl.post()
            self.sent += (self.G - 1) * AGREE_BYTES_PER_PEER

    def head(self, scheme: str) -> None:
        program = self.program
        if scheme == "a" or self.G == 1:
            self.head_pass([self.b] * self.G, program, False)
            self.head_pass([self.b] * self.G, program, True)
        else:
            self.rounds(scheme_rounds(scheme, self.b, self.G), program[0], program[1:])

    def steady(
        self, scheme: str, pipelined: bool, chunks: list[list[int]] | None, bucket_cap: int, steps: int = 6
    ) -> StepTime:
        """Consecutive steps with ``trunk_sync=pipelined`` and/or the trunk in ``chunks`` (the
        rounds' sizes); the step time is the period of the last two (the first has nothing pending).

        Pipelined: before each trunk stage runs, its partitions of the previous step's sums must be
        in (and its update applied); during the backward, the first ``cap`` partitions of the
        deepest-first order are issued as they are ready — every one in the first two steps, then
        the cap the code's rule (``propose_cap``) makes of this timeline's own step two before; at
        its end the rest go out in forward order.
        Chunked: round j's rows go through the trunk and leave; after all chunks, round j's head
        runs, its gradients return, and chunk j-1's trunk backward runs meanwhile; only the last
        chunk's backward issues the sums."""
        if self.K > self.G:
            raise ValueError("the cost model pipelines the 1-D hybrid's trunk only (fc_group_size = workers)")
        tl, prof = self.tl, self.profile
        layout = _Partitions(prof) if pipelined else None
        done: list[float] = [0.0] * (len(layout.sizes) if layout else 0)
        starts = []
        for _ in range(steps):
            starts.append(tl.cpu)
            self.sent = self.bf16_sums = 0
            self.agree()
            if chunks is not None:
                issued = self.chunked_rounds(chunks, done, layout, bucket_cap)
            else:
                self.trunk_forward(self.b, done, layout)
                self.head(scheme)
                issued = self.trunk_backward(self.b, layout, bucket_cap)
            self.run_deferred()
            if layout is None:
                for t in issued:  # bucketed: every sum is in before the optimizer
                    tl.wait(t)
            done = issued
            opt = head_shard_params(self.widths, self.styles, self.G, 0) + (0 if layout else sum(prof.trunk_params))
            tl.run(opt * prof.opt_s_per_param)
        if layout:
            self.add_trunk_sums(allreduce_bytes(layout.sizes, self.K, 0, self.gi))
            self.sent += (self.K - 1) * AGREE_ITEMSIZE
        else:
            self.add_trunk_sums(allreduce_bytes(trunk_bucket_numels(prof.trunk_params, bucket_cap), self.K, 0, self.gi))
        period = starts[-1] - starts[-2]
        compute, comm = tl.compute / steps, tl.comm / steps
        calls = tl.calls / steps
        floor = compute + self.link.transport_s(self.sent, self.bf16_sums, calls)
        return StepTime(max(period, floor), compute, comm, int(self.sent), calls)

    def trunk_forward(self, rows: float, done: Sequence[float], layout: _Partitions | None) -> None:
        """The trunk's forward on ``rows`` images; pipelined (``layout``), each stage waits for its
        partitions of the previous step's sums and applies its update first."""
        for s, (stage, seconds) in enumerate(zip(self.profile.trunk, self.profile.trunk_s(rows))):
            if layout is not None:
                self.tl.wait(max((done[j] for j in layout.spans[s]), default=0.0))
                self.tl.run(sum(stage.params) * self.profile.opt_s_per_param)
            self.tl.run(seconds)

    def trunk_backward(self, rows: float, layout: _Partitions | None, bucket_cap: int) -> list[float]:
        """The trunk's backward on ``rows`` images and its sums: the done time of each bucket, or
        (pipelined) of each partition."""
        tl, link, K, trunk = self.tl, self.link, self.K, self.profile.trunk
        seconds = self.profile.trunk_s(rows, True)
        if layout is None:
            stages = [(t, s.params) for t, s in zip(reversed(seconds), reversed(trunk))]
            return _backward_with_buckets(
                tl, link, stages, bucket_cap, K, self.overlap, self.gi, self.profile.cast_s_per_elem
            )
        issued, order, k = [0.0] * len(layout.sizes), layout.backward, 0
        cast = self.profile.cast_s_per_elem
        window = WINDOW if self.overlap else 0
        if not self.caps:  # the first two steps: every partition as it is ready (none: serialised)
            self.caps = [len(order) if window else 0] * 2
        cap = self.caps.pop(0)
        deepest, late = len(trunk) - 1, self.input_grad_share
        for s in reversed(range(len(trunk))):
            # The deepest conv makes its weight's gradient first (trunk_pipeline.weight_grads_first):
            # its partitions are ready before its input gradient is made.
            tl.run(seconds[s] * (1.0 - late if s == deepest else 1.0))
            # A partition is ready once every stage it spans is through its backward.
            while k < cap and layout.stage[order[k]] >= s:
                issued[order[k]] = _issue_sum(tl, link, layout.sizes[order[k]], K, self.gi, cast)
                k += 1
            if s == deepest:
                tl.run(seconds[s] * late)
        done = sum(1 for j in order[:k] if issued[j] <= tl.cpu)
        rest = order[k:cap] + sorted(order[cap:]) + layout.held
        for j in rest:  # forward order, the held-back deepest partitions last
            issued[j] = _issue_sum(tl, link, layout.sizes[j], K, self.gi, cast)
        # This step's proposal, agreed (the workers' largest: the slowest worker sets the pace, as
        # here) and taken two steps on; issued now, waited for long after: its call time only.
        self.caps.append(propose_cap(done, cap, window, len(order)))
        tl.post()
        return issued

    def chunked_rounds(
        self, rounds: list[list[int]], done: Sequence[float], layout: _Partitions | None, bucket_cap: int
    ) -> list[float]:
        """The trunk chunk by chunk (``rounds._train_chunked``), seen from the last worker (in (b)
        its one chunk is the last round's: it sets the pace)."""
        tl, R = self.tl, len(rounds)
        program = self.program
        pending, returns = {}, {}
        for j, betas in enumerate(rounds):
            self.trunk_forward(betas[-1], done if j == 0 else [], layout if j == 0 else None)
            pending[j] = tl.issue(self.move(program[0], betas, False))
        for j, betas in enumerate(rounds):
            tl.wait(pending.pop(j))
            self.head_pass(betas, program[1:], False)
            self.head_pass(betas, program[1:], True)
            returns[j] = tl.issue(self.move(program[0], betas, True))
            if j > 0:
                tl.wait(returns.pop(j - 1))
                tl.run(sum(self.profile.trunk_s(rounds[j - 1][-1], True)))
        tl.wait(returns.pop(R - 1))
        return self.trunk_backward(rounds[-1][-1], layout, bucket_cap)

    def linear(self, i: int, rows: int, backward: bool) -> None:
        if self.defer and backward:
            # The input gradient reads the weight as the forward does (same time); the weight
            # gradient runs after the trunk's backward, one product over every round's rows.
            self.tl.run(self._linear_s(i, rows, False))
            self.deferred[i] = self.deferred.get(i, 0) + rows
        else:
            self.tl.run(self._linear_s(i, rows, backward))

    def _linear_s(self, i: int, rows: int, backward: bool) -> float:
        """Seconds of Linear ``i``'s forward (or whole backward: twice its FLOPs) on ``rows``.
        The rate goes by rows, not FLOPs: a product of ``rows`` examples with a weight (shard)
        does ~rows/2 FLOPs per weight byte read whatever the shard's width, so a shard on K·b
        rows runs like the full layer on K·b rows (roofline), and a round of b/K·K rows slower."""
        f = _linear_flops(*self.widths[i], self.styles[i], rows, self.G)
        return (2 if backward else 1) * f / self.profile.fc_rate(rows, backward)

    def run_deferred(self) -> None:
        """The head's deferred weight gradients (the trunk's sums already issued): the backward
        of each Linear over all its rows, less its input gradient (timed as the forward)."""
        for i, rows in self.deferred.items():
            self.tl.run(max(0.0, self._linear_s(i, rows, True) - self._linear_s(i, rows, False)))
        self.deferred = {}

    def move(self, op: tuple, betas: Sequence[int], backward: bool) -> float:
        # parallel.comm_dtype casts the features' move (the head's first) and its gradients only.
        itemsize = self.comm_itemsize if op is self.program[0] else self.profile.itemsize
        seconds, elements = _move_time(self.link, op[1], op[2], betas, itemsize, backward)
        self.sent += elements * itemsize
        return seconds

    def head_pass(self, betas: Sequence[int], body: Sequence[tuple], backward: bool) -> None:
        for op in reversed(body) if backward else body:
            if op[0] == "linear":
                self.linear(op[1], sum(betas), backward)
            elif self.G > 1:
                self.tl.blocking(self.move(op, betas, backward))

    def rounds(self, rounds: list[list[int]], first: tuple, body: Sequence[tuple]) -> None:
        """Schemes (b)/(c): round j+1's features issued before round j computes; round j's feature
        gradients leave while round j+1 computes."""
        tl, G = self.tl, self.G
        pending = {0: tl.issue(self.move(first, rounds[0], False))}
        returns = []
        for j in range(G):
            if self.overlap and j + 1 < G:
                pending[j + 1] = tl.issue(self.move(first, rounds[j + 1], False))
            tl.wait(pending.pop(j))
            self.head_pass(rounds[j], body, False)
            self.head_pass(rounds[j], body, True)
            returns.append(tl.issue(self.move(first, rounds[j], True)))
            if not self.overlap:
                tl.wait(returns[-1])
                if j + 1 < G:
                    pending[j + 1] = tl.issue(self.move(first, rounds[j + 1], False))
        tl.wait(max(returns))


def single_device_time(profile: Profile, b: int) -> float:
    """One device, no communication: the baseline every speedup is measured against."""
    return step_time(profile, Link(0.0, math.inf), "ddp", 1, b).step_s


def speedup(profile: Profile, link: Link, scheme: str, K: int, b: int, **kw) -> float:
    """Throughput of K workers (b images each) over one device's throughput at b images."""
    return K * single_device_time(profile, b) / step_time(profile, link, scheme, K, b, **kw).step_s


# ---- the paper's setting -----------------------------------------------------------------


def alexnet_profile_from_speed(images_per_s: float, reference: Profile) -> Profile:
    """``reference`` scaled so that one device trains ``images_per_s`` at the reference's batch."""
    return reference.scaled(reference.batch / single_device_time(reference, reference.batch) / images_per_s)


# ---- CLI ---------------------------------------------------------------------------------


def _cmd_profile(args) -> None:
    from omegaconf import OmegaConf

    from hybridpar.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(OmegaConf.create({"name": args.model, "dropout": 0.0}), 1000, 3, 0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    prof = measure_profile(model, args.image_size, args.batch, device=args.device, dtype=dtype, reps=args.reps)
    text = prof.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if not args.out else f"profile of {prof.device} ({prof.dtype}, b = {prof.batch}) written to {args.out}")


def _load(args) -> tuple[Profile, Link]:
    with open(args.profile) as f:
        prof = Profile.from_json(f.read())
    if args.speed != 1.0:
        prof = prof.scaled(args.speed)
    return prof, Link(
        args.alpha_us * 1e-6,
        parse_rate(args.rate) * args.efficiency,
        args.cpu_ns_per_byte * 1e-9,
        cpu_s_per_call=args.cpu_us_per_call * 1e-6,
    )


# The training app's trunk options for a slow link, as the overrides that set them and the
# step_time arguments that model them (docs/training.md, "Slow links"). Each is exact; the trunk's
# sums in bf16 (lossy) are the same options with ``parallel.trunk_comm_dtype=bf16``.
MICRO_BATCHES = (2, 4, 8)


def trunk_options(scheme: str, b: int) -> list[tuple[str, dict]]:
    """``(overrides, step_time kwargs)`` of the trunk options a hybrid ``scheme`` runs with."""
    piped = {"trunk_sync": "pipelined"}
    out = [("", {}), ("parallel.trunk_sync=pipelined", piped)]
    if scheme == "a":
        out += [
            (f"parallel.trunk_sync=pipelined parallel.micro_batches={m}", {**piped, "micro_batches": m})
            for m in MICRO_BATCHES
            if m <= b
        ]
    else:
        out.append(("parallel.trunk_sync=pipelined parallel.chunk_trunk=true", {**piped, "chunk_trunk": True}))
    return out


def option_rows(
    prof: Profile, link: Link, schemes: Sequence[str], K: int, b: int, plan: str = "min_bytes", lossy: bool = False
) -> list[tuple[str, StepTime, bool]]:
    """Every hybrid scheme's trunk options (``lossy``: also with bf16 sums), fastest first, as
    ``(overrides, predicted step, exact)``."""
    rows = []
    for s in schemes:
        if s == "ddp":
            continue
        for overrides, kw in trunk_options(s, b):
            for bf16 in (False, True) if lossy else (False,):
                t = step_time(prof, link, s, K, b, plan=plan, grad_itemsize=2 if bf16 else GRAD_ITEMSIZE, **kw)
                words = [
                    f"parallel.scheme={s}",
                    overrides,
                    "parallel.trunk_comm_dtype=bf16" if bf16 else "",
                    f"parallel.plan={plan}" if plan != "min_bytes" else "",  # the layout it was predicted with
                ]
                rows.append((" ".join(w for w in words if w), t, not bf16))
    return sorted(rows, key=lambda r: r[1].step_s)


def _cmd_predict(args) -> None:
    prof, link = _load(args)
    K, b = args.workers, args.batch
    print(f"{prof.device} ({prof.dtype}); link {args.rate} (alpha {args.alpha_us:g} us); K = {K}, b = {b}")
    print("| scheme | step s | compute s | link busy s | exposed comm s | MB sent/worker |")
    print("|---|---|---|---|---|---|")
    times = {}
    for s in args.schemes.split(","):
        t = times[s] = step_time(prof, link, s, K, b, plan=args.plan)
        print(
            f"| {s} | {t.step_s:.3f} | {t.compute_s:.3f} | {t.comm_s:.3f} | {t.exposed_s:.3f} | {t.bytes_sent / 1e6:.2f} |"
        )
    rows = option_rows(prof, link, list(times), K, b, args.plan, args.lossy) if K > 1 else []
    if not rows:
        return
    # Against the bound an exact step can reach: the link busy the whole step, or the processor.
    print()
    print("| overrides (fastest first) | step s | exact | vs the bound | vs ddp |")
    print("|---|---|---|---|---|")
    ddp = times.get("ddp")
    for overrides, t, exact in rows:
        bound = max(t.compute_s, t.comm_s)
        vs_ddp = f"{ddp.step_s / t.step_s:.2f}×" if ddp else "–"
        print(f"| {overrides} | {t.step_s:.3f} | {'yes' if exact else 'no'} | {t.step_s / bound:.2f}× | {vs_ddp} |")
    best = next(r for r in rows if r[2])
    print(f"fastest exact: {best[0]} ({best[1].step_s:.3f} s predicted)")


def _cmd_project(args) -> None:
    prof, link = _load(args)
    schemes = args.schemes.split(",")
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.max_workers]
    print(
        f"{prof.device} ({prof.dtype}); link {args.rate} per worker (alpha {args.alpha_us:g} us); b = {args.batch}; "
        f"one device: {single_device_time(prof, args.batch):.3f} s/step"
    )
    print("| K | " + " | ".join(f"speedup {s}" for s in schemes) + " |")
    print("|---|" + "---|" * len(schemes))
    for k in ks:
        print(
            f"| {k} | "
            + " | ".join(f"{speedup(prof, link, s, k, args.batch, plan=args.plan):.2f}" for s in schemes)
            + " |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hybridpar.costmodel", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile", help="measure per-layer compute times of a model on this device")
    p.add_argument("--model", default="alexnet", help="alexnet, vgg11, vgg13, vgg16, vgg19 (1000 classes)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out")
    for name, fn in (("predict", _cmd_predict), ("project", _cmd_project)):
        q = sub.add_parser(name)
        q.set_defaults(fn=fn)
        q.add_argument("--profile", required=True, help="JSON written by 'profile'")
        q.add_argument("--rate", default="1gbit", help="link rate per worker and direction, e.g. 100mbit, 10gbit, 6GB")
        q.add_argument("--alpha-us", type=float, default=50.0, help="latency per message step, microseconds")
        q.add_argument("--efficiency", type=float, default=1.0, help="fraction of the rate that carries payload")
        q.add_argument(
            "--cpu-ns-per-byte", type=float, default=0.0, help="processor time of the transport per byte moved"
        )
        q.add_argument(
            "--cpu-us-per-call", type=float, default=0.0, help="processor time of issuing one collective, microseconds"
        )
        q.add_argument("--speed", type=float, default=1.0, help="device speed relative to the profile's")
        q.add_argument("--batch", type=int, default=128)
        q.add_argument("--plan", default="min_bytes")
        q.add_argument("--schemes", default=",".join(SCHEMES))
        if name == "predict":
            q.add_argument("--workers", type=int, default=2)
            q.add_argument("--lossy", action="store_true", help="also the options with the trunk's sums in bf16")
        else:
            q.add_argument("--max-workers", type=int, default=64)
    p.set_defaults(fn=_cmd_profile)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, OSError) as e:
        print(f"hybridpar.costmodel: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
