"""Schemes (a), (b), (c) on real gloo workers: step time, compute, communication, overlap.

    torchrun --standalone --nproc_per_node=2 bench/schemes.py [--batch 16] [--steps 6]

Full-size AlexNet (224 px, 1000 classes, dropout 0), b images per worker, fp32, SGD. Each scheme
runs twice: with overlap (async feature exchange, bucketed trunk all-reduce during backward)
and serialised (every operation waited for at once). The serialised run gives the communication
time (time blocked in collectives) and the compute time (step − communication); the hidden
fraction is (serialised step − overlapped step) / communication. Also times the trunk gradient
sync as one all-reduce vs reduce-scatter + all-gather. Medians over the timed steps, rank 0 prints.

Before the runs it measures the link (alpha: median of 1-float all-reduces; bandwidth: a large
all-reduce) and every worker's per-layer compute profile (both workers at once, as in the runs),
and prints the cost model's prediction next to each measured step (:mod:`hybridpar.costmodel`), and
the same with its compute anchored to the scheme's serialised run (:func:`anchored`); a speed probe
around each run records whether the processor moved since the profile (:class:`SpeedProbe`).
``--json PATH`` appends one JSON line with everything (for ``bench/twohost_sweep.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from hybridpar import costmodel
from hybridpar.comm import DistCommunicator
from hybridpar.models import alexnet, build_seeded
from hybridpar.parallel import HybridModel, trunk_pipeline
from hybridpar.parallel.cost import allreduce_bytes, ddp_step_bytes


def variant_options(scheme: str, variant: str) -> dict | None:
    """The hybrid's options of a trunk variant: ``bucketed`` | ``pipelined``, with ``+chunk`` (the
    trunk round by round: schemes b, c), ``+mbN`` (scheme a in N micro-batches) and/or ``+bf16``
    (the trunk's sums in bf16), ``+act16`` (the features and their gradients travel in bf16:
    ``parallel.comm_dtype=bf16``, lossy), ``+wlast`` (pipelined: the deepest conv's backward in
    autograd's order, its weight gradient not first: ``HybridModel(weight_first=False)``), ``+holdN``
    (pipelined: N of the deepest layer's partitions held back to end the step's sums, not
    ``trunk_pipeline.HOLD``) and/or
    ``+inline`` (the head's weight gradients made in its
    backward, as autograd makes them: ``parallel.defer_wgrad=false``), ``+whole`` (the head's moves in
    one message each, not in pieces: ``parallel.move_piece_mb=null``; these three for scheme a), a
    head layout such as ``+ccr`` (``parallel.plan=[col, col, row]``; default min_bytes); None
    where the variant does not apply to ``scheme``."""
    trunk_sync, *flags = variant.split("+")
    micro = next((int(f[2:]) for f in flags if f.startswith("mb")), 1)
    layout = next((f for f in flags if set(f) <= {"c", "r"}), None)
    plan = [{"c": "col", "r": "row"}[c] for c in layout] if layout else "min_bytes"
    if ("chunk" in flags and scheme == "a") or (micro > 1 and scheme != "a"):
        return None
    if ("inline" in flags or "act16" in flags or "whole" in flags) and scheme != "a":
        return None  # side-by-side rows, measured on the best scheme only (the sweep's time)
    return {
        "trunk_sync": trunk_sync,
        "chunk_trunk": "chunk" in flags,
        "micro_batches": micro,
        "bf16": "bf16" in flags,
        "defer": "inline" not in flags,
        "weight_first": "wlast" not in flags,
        "hold": next((int(f[4:]) for f in flags if f.startswith("hold")), trunk_pipeline.HOLD),
        "act16": "act16" in flags,
        "whole": "whole" in flags,
        "plan": plan,
    }


def hybrid_model(comm, opts: dict, overlap: bool) -> HybridModel:
    """Full-size AlexNet (seed 0, dropout off) as the hybrid with a variant's options
    (:func:`variant_options`); the communicator's piece size is the caller's."""
    hold, trunk_pipeline.HOLD = trunk_pipeline.HOLD, opts["hold"]  # read when the sync is made
    try:
        return HybridModel(
            build_seeded(lambda: alexnet(1000, dropout=0.0), 0),
            comm,
            overlap=overlap,
            trunk_sync=opts["trunk_sync"],
            chunk_trunk=opts["chunk_trunk"],
            micro_batches=opts["micro_batches"],
            trunk_comm_dtype=torch.bfloat16 if opts["bf16"] else None,
            defer_wgrad=opts["defer"],
            weight_first=opts["weight_first"],
            comm_dtype=torch.bfloat16 if opts["act16"] else None,
            plan=opts["plan"],
        )
    finally:
        trunk_pipeline.HOLD = hold


def run(
    comm, scheme: str, overlap: bool, b: int, steps: int, warmup: int, variant: str = "bucketed"
) -> dict[str, float]:
    """``variant``: see :func:`variant_options`."""
    opts = variant_options(scheme, variant)
    pieces, comm.piece_bytes = comm.piece_bytes, None if opts["whole"] else comm.piece_bytes
    model = hybrid_model(comm, opts, overlap)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(comm.rank)
    x, y = torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 1000, (b,), generator=g)
    step_s, comm_s = [], []
    link0 = link_bytes()
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        # Back to back, as a training loop runs them: a step is the time from the end of the one
        # before (a barrier per step would leave out what it waits for: sums still in flight).
        comm.ledger.reset()
        opt.zero_grad(set_to_none=True)
        model.train_step(x, y, scheme=scheme, optimizer=opt)
        opt.step()
        t1 = time.perf_counter()
        if i >= warmup:
            step_s.append(t1 - t0)
            comm_s.append(comm.ledger.seconds)
        t0 = t1
    wire = (link_bytes() - link0) / (warmup + steps) if link0 is not None else None
    comm.piece_bytes = pieces
    return {
        "step": statistics.median(step_s),
        "comm": statistics.median(comm_s),
        "bytes": comm.ledger.sent,
        "wire": wire,
    }


def run_ddp(comm, b: int, steps: int, warmup: int, hook: str = "") -> dict[str, float]:
    """torch DDP over the whole model (the baseline), its default bucketing and average; ``hook``:
    torch's ``bf16`` compression hook or ``powersgd`` (rank 4, error feedback, from step 2)."""
    # PowerSGD's hook issues its second and third all-reduce from future callbacks: with two
    # buckets in flight gloo workers can issue them in different orders (seen here: a reset
    # connection), so it gets one bucket for the whole model.
    cap = {"bucket_cap_mb": 1024} if hook == "powersgd" else {}
    # Gradients as views of the buckets (DDP's copy-free setting, as the training app's baseline):
    # at b = 256 the default's copies and fresh gradient buffers cost ~1 s a step here.
    model = torch.nn.parallel.DistributedDataParallel(
        build_seeded(lambda: alexnet(1000, dropout=0.0), 0), gradient_as_bucket_view=True, **cap
    )
    if hook == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(comm.rank)
    x, y = torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 1000, (b,), generator=g)
    step_s = []
    link0 = link_bytes()  # after DDP's initial broadcast of the parameters
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(warmup + steps):  # back to back, as in run()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        if i >= warmup:
            step_s.append(t1 - t0)
        t0 = t1
    n = sum(p.numel() for p in model.parameters())
    wire = (link_bytes() - link0) / (warmup + steps) if link0 is not None else None
    return {"step": statistics.median(step_s), "bytes": ddp_step_bytes(n, comm.world_size, comm.rank), "wire": wire}


def link_bytes() -> int | None:
    """tx + rx bytes of the interface gloo uses (set GLOO_SOCKET_IFNAME), if known."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if not ifname:
        return None
    base = f"/sys/class/net/{ifname}/statistics/"
    return sum(int(open(base + f).read()) for f in ("tx_bytes", "rx_bytes"))


PROC_STAT = os.path.exists("/proc/stat")


def busy_cpu_s() -> float:
    """Busy processor seconds of the whole machine (all cores, kernel included), or of this
    process where /proc/stat is missing."""
    if not PROC_STAT:
        return time.process_time()
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def calibrate_link(comm: DistCommunicator, workers_on_machine: int, reps: int = 5) -> costmodel.Link:
    """Alpha and bandwidth of the link as gloo sees it (all-reduces of 1 float and of ~0.3 s worth),
    and the processor time the transport takes: per byte of an fp32 and of a bf16 sum, and per
    collective issued through the communicator."""

    busy = []
    # The whole machine's busy time counts (the kernel's TCP work runs outside the process, e.g.
    # in softirq), shared by the workers on it; with one worker per core that is what it steals.
    # /proc/stat counts in clock ticks (10 ms here): busy times are summed over the repetitions,
    # never taken per repetition, where one tick is most of what a 100 Mbit/s transfer costs.
    share = workers_on_machine if PROC_STAT else 1

    def timed(n: int, dtype: torch.dtype = torch.float32) -> float:
        x, ts = torch.zeros(n, dtype=dtype), []
        for _ in range(reps):
            dist.barrier()
            t0, c0 = time.perf_counter(), busy_cpu_s()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t0)
            busy.append(busy_cpu_s() - c0)
        return statistics.median(ts)

    K = dist.get_world_size()
    steps = 2 * (K - 1)
    alpha = timed(1) / steps
    n = 1 << 18
    t = timed(n)
    size = torch.tensor([int(min(max(n * 0.3 / max(t, 1e-6), n), 1 << 24))])  # aim at ~0.3 s, at most 64 MB
    dist.broadcast(size, 0)  # every worker must all-reduce the same size
    n = int(size)
    elements = max(allreduce_bytes(n, K, r, 1) for r in range(K))
    per_byte = {}
    for dtype in (torch.float32, torch.bfloat16):
        busy.clear()
        t = timed(n, dtype)
        if dtype == torch.float32:
            bw = elements * 4 / max(t - steps * alpha, 1e-9)
        # Per byte moved (sent + received: 2 × elements × itemsize per worker).
        per_byte[dtype] = sum(busy) / (reps * 2 * elements * dtype.itemsize) / share
    # Per collective: small moves through the communicator, as the step issues its head's moves
    # (its bookkeeping, gloo's wake-ups; 1 kB each, so the bytes cost nothing); enough of them
    # that the clock's ticks resolve the time of one to a few percent.
    x, calls = torch.zeros(256), 200
    comm.all_gather(x, 0, [256] * K, "calibrate")
    dist.barrier()
    c0 = busy_cpu_s()
    for _ in range(calls):
        comm.all_gather(x, 0, [256] * K, "calibrate")
    per_call = (busy_cpu_s() - c0) / calls / share
    return costmodel.Link(
        alpha, bw, per_byte[torch.float32], cpu_s_per_call=per_call, cpu_s_per_bf16_byte=per_byte[torch.bfloat16]
    )


def trunk_sync_times(comm, n: int, reps: int = 7) -> dict[str, float]:
    """The trunk's gradient sum as one all-reduce vs reduce-scatter + all-gather (the paper's
    description), both through the communicator (its reduce-scatter moves (K-1)/K of the tensor)."""
    K = comm.world_size
    x = torch.randn(n - n % K)
    sizes = [x.numel() // K] * K
    out = {}
    for name in ("all_reduce", "rs_ag"):
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            if name == "all_reduce":
                comm.all_reduce(x.clone(), "bench")
            else:
                comm.all_gather(comm.reduce_scatter(x.clone(), 0, sizes, "bench"), 0, sizes, "bench")
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


class SpeedProbe:
    """Did the processor's speed move between the profile and a run? The median time of a fixed
    piece of the step's own work (AlexNet's trunk, forward and backward, on b/8 images), timed on
    every worker at once, right after each profile and right before and after each run — outside
    its timed steps (a probe between steps would run while the pipelined sums are still in
    flight). A run's ``drift``: the mean of its two probes over the one beside the profile.

    A diagnostic, recorded with each row and not fed to the predictions: on this kind of shared
    machine the same trunk step moves by ±20% back to back, and a probe of ~0.3 s follows that
    noise more than the minutes-long drift it is meant to see (docs/benchmarks.md)."""

    def __init__(self, batch: int, reps: int = 3):
        self.net = build_seeded(lambda: alexnet(1000, dropout=0.0), 0).features
        self.x = torch.randn(max(2, batch // 8), 3, 224, 224, generator=torch.Generator().manual_seed(0))
        self.reps = reps
        self.base = 0.0

    def time(self) -> float:
        dist.barrier()  # every worker at once
        ts = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            self.net.zero_grad(set_to_none=True)
            self.net(self.x).sum().backward()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def rebase(self) -> None:
        """Right after a profile: the time the drift of later runs is measured against."""
        self.time()  # warm-up: first-call allocations
        self.base = self.time()

    def around(self, fn, *args) -> dict:
        """``fn(*args)``'s result with its ``drift``: the probe's mean time before and after it over its base."""
        before = self.time()
        out = fn(*args)
        out["drift"] = (before + self.time()) / 2 / self.base
        return out


def _row(comm, args, scheme: str, variant: str, serial: dict, profile, link, probe: SpeedProbe) -> dict:
    """One table row: ``scheme`` overlapped with ``variant`` (:func:`variant_options`), next to its
    serialised run; predicted from the profile, and with the compute anchored to that serialised
    run (:func:`anchored`)."""
    overlapped = probe.around(run, comm, scheme, True, args.batch, args.steps, args.warmup, variant)
    pred = predict(profile, link, scheme, variant, comm.world_size, args.batch)
    compute = serial["step"] - serial["comm"]
    return {
        "scheme": scheme if variant == "bucketed" else f"{scheme}/{variant}",
        "step": overlapped["step"],
        "serial": serial["step"],
        "compute": compute,
        "comm": serial["comm"],
        "exposed": overlapped["comm"],
        "bytes": overlapped["bytes"],
        "wire": overlapped["wire"],
        "hidden": (serial["step"] - overlapped["step"]) / serial["comm"] if serial["comm"] > 0 else 0.0,
        "predicted": pred.step_s,
        "predicted_anchored": anchored(profile, link, scheme, variant, comm.world_size, args.batch, compute),
        "predicted_compute": pred.compute_s,
        "predicted_serial": costmodel.step_time(
            profile, link, scheme, comm.world_size, args.batch, overlap=False
        ).step_s,
        "drift": overlapped["drift"],
        "serial_drift": serial["drift"],
    }


def anchored(profile, link, scheme: str, variant: str, K: int, b: int, compute: float) -> float:
    """The cost model's overlapped step with the profile scaled so that the model's compute of the
    scheme's serialised step equals ``compute``, the one measured minutes apart from the profile in
    the same invocation: what is left of the error is the model's overlap, not the profile's
    speed."""
    own = costmodel.step_time(profile, link, scheme, K, b, overlap=False).compute_s
    return predict(profile.scaled(own / compute), link, scheme, variant, K, b).step_s


def predict(profile, link, scheme: str, variant: str, K: int, b: int) -> costmodel.StepTime:
    """The cost model's step for a hybrid ``scheme`` with a trunk ``variant``."""
    opts = variant_options(scheme, variant)
    return costmodel.step_time(
        profile,
        link,
        scheme,
        K,
        b,
        trunk_sync=opts["trunk_sync"],
        chunk_trunk=opts["chunk_trunk"],
        micro_batches=opts["micro_batches"],
        grad_itemsize=2 if opts["bf16"] else 4,
        defer_wgrad=opts["defer"],
        comm_itemsize=2 if opts["act16"] else None,
        plan=opts["plan"],
        weight_first=opts["weight_first"],
    )


def overlap_steal(link: costmodel.Link, reps: int = 5) -> float:
    """Processor seconds per byte (sent + received) that an all-reduce takes from compute running
    beside it, as the overlapped step runs them: a trunk-sized convolution's forward and backward
    (AlexNet's third conv at b = 16) is timed alone and with an all-reduce of ~0.2 s of link time
    issued at its start; the difference, past the longer of the two alone, over the bytes moved.
    It includes what the busy-time count of :func:`calibrate_link` cannot: the transport's threads
    waking on cores that compute holds, and the workers waiting for each other at the end. The cost
    model's per-byte transport cost where measured (``Link.steal_s_per_byte``)."""
    K = dist.get_world_size()
    conv = torch.nn.Conv2d(192, 384, 3, padding=1)
    x = torch.randn(16, 192, 13, 13)

    def load(n_reps: int) -> None:
        for _ in range(n_reps):
            conv(x).sum().backward()

    def timed(fn) -> float:
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    size = torch.tensor([int(0.2 * link.bytes_per_s / 4)])
    dist.broadcast(size, 0)  # each worker measured its own bandwidth: rank 0's sets the size
    n = int(size)
    buf = torch.zeros(n)
    t_link = timed(lambda: dist.all_reduce(buf))
    unit = timed(lambda: load(4)) / 4
    count = torch.tensor([max(1, round(1.5 * t_link / unit))])
    dist.broadcast(count, 0)  # the same load on every worker
    count = int(count)
    t_load = timed(lambda: load(count))

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        load(count)
        work.wait()

    t_both = timed(both)
    moved = 2 * max(allreduce_bytes(n, K, r, 1) for r in range(K)) * 4
    return max(0.0, t_both - max(t_load, t_link)) / moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schemes", default="a,b,c", help="comma list of a, b, c, ddp, ddp/bf16, ddp/powersgd")
    ap.add_argument(
        "--trunk-sync",
        default="bucketed",
        help="comma list of bucketed, pipelined, each optionally +chunk (schemes b, c), +mbN (scheme a) and/or "
        "+bf16: each hybrid scheme runs with each that applies to it",
    )
    ap.add_argument("--rate", default="", help="the link's nominal rate (recorded only), e.g. 1gbit")
    ap.add_argument("--json", help="append the results as one JSON line to this file (rank 0)")
    ap.add_argument("--calibrate-only", action="store_true", help="measure the link, print it as JSON, stop")
    ap.add_argument(
        "--profile-each", action="store_true", help="profile the compute again before each scheme (rows carry theirs)"
    )
    ap.add_argument("--workers-on-machine", type=int, default=0, help="workers sharing this machine's cores (0: all)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    comm = DistCommunicator()
    # twohost.sh and --standalone put every worker on this machine.
    link = calibrate_link(comm, args.workers_on_machine or comm.world_size)
    link = dataclasses.replace(link, steal_s_per_byte=overlap_steal(link))  # the predictions' per-byte cost
    if args.rate:  # bench/twohost.sh's token bucket, as the report's predictions have it
        link = dataclasses.replace(link, burst_bytes=costmodel.tbf_burst(args.rate))
    if args.calibrate_only:
        if comm.rank == 0:
            print(
                json.dumps(
                    {
                        "rate": args.rate,
                        "alpha_s": link.alpha_s,
                        "bytes_per_s": link.bytes_per_s,
                        "cpu_s_per_byte": link.cpu_s_per_byte,
                        "cpu_s_per_call": link.cpu_s_per_call,
                        "cpu_s_per_bf16_byte": link.cpu_s_per_bf16_byte,
                        "steal_s_per_byte": link.steal_s_per_byte,
                    }
                ),
                flush=True,
            )
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)

    # Both workers profile at once, as they compute at once in the runs (shared memory bandwidth).
    def measure() -> costmodel.Profile:
        return costmodel.measure_profile(
            build_seeded(lambda: alexnet(1000, dropout=0.0), 0),
            224,
            args.batch,
            reps=3,
            head_rows=args.batch * comm.world_size,
            trunk_rows=[args.batch // 2, args.batch // 4, args.batch // 8],  # the chunks: rounds, micro-batches
        )

    probe = SpeedProbe(args.batch)
    profile = measure()  # the record's: the one taken before the first scheme
    probe.rebase()
    rows = []
    for i, scheme in enumerate(args.schemes.split(",")):
        # --profile-each: measured again right before each scheme's runs, so that a prediction rests on
        # the machine's speed of the same minute (it drifts by up to ~10% within one invocation here).
        if args.profile_each and i > 0:
            now = measure()
            probe.rebase()
        else:
            now = profile
        start = len(rows)
        if scheme.startswith("ddp"):
            hook = scheme.partition("/")[2]
            d = probe.around(run_ddp, comm, args.batch, max(2, args.steps // 2), max(2, args.warmup // 2), hook)
            pred = costmodel.step_time(
                now, link, "ddp", comm.world_size, args.batch, grad_itemsize=2 if hook == "bf16" else 4
            )
            rows.append(
                {
                    "scheme": scheme,
                    "step": d["step"],
                    "bytes": d["bytes"],
                    "wire": d["wire"],
                    "predicted": None if hook == "powersgd" else pred.step_s,  # not modelled
                    "predicted_compute": pred.compute_s,
                    "drift": d["drift"],
                }
            )
        else:
            serial = probe.around(run, comm, scheme, False, args.batch, args.steps, args.warmup)
            for variant in args.trunk_sync.split(","):
                if variant_options(scheme, variant) is not None:
                    rows.append(_row(comm, args, scheme, variant, serial, now, link, probe))
        if args.profile_each:
            for r in rows[start:]:
                r["profile"] = json.loads(now.to_json())
    sync = trunk_sync_times(comm, sum(p.numel() for p in alexnet(1000).features.parameters()))
    if comm.rank == 0:
        print(
            f"AlexNet 224 px, b = {args.batch} per worker, K = {comm.world_size} gloo processes, 1 thread each; "
            f"medians of {args.steps} steps after {args.warmup} warm-up; link {args.rate or '?'}: alpha "
            f"{link.alpha_s * 1e6:.0f} us, {link.bytes_per_s * 8 / 1e9:.3f} Gbit/s, transport "
            f"{link.cpu_s_per_byte * 1e9:.2f} ns/byte of processor time ({link.cpu_s_per_bf16_byte * 1e9:.2f} in bf16 "
            f"sums), {link.cpu_s_per_call * 1e6:.0f} us per collective, measured; beside compute it took "
            f"{link.steal_s_per_byte * 1e9:.2f} ns/byte from it"
        )
        print(
            "| scheme | step s (overlap) | drift | predicted s | error | error, compute anchored | step s (serialised) | "
            "predicted s | compute s | communication s | exposed comm s (overlap) | hidden | MB sent/worker (ledger) | "
            "MB on the link/step (tx+rx) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        f = lambda v, fmt: "–" if v is None else format(v, fmt)
        for r in rows:
            g = r.get
            print(
                f"| {r['scheme']} | {r['step']:.3f} | {r['drift']:.3f} | {f(r['predicted'], '.3f')} | "
                f"{f(None if r['predicted'] is None else r['predicted'] / r['step'] - 1, '+.1%')} | "
                f"{f(None if g('predicted_anchored') is None else r['predicted_anchored'] / r['step'] - 1, '+.1%')} | "
                f"{f(g('serial'), '.3f')} | {f(g('predicted_serial'), '.3f')} | {f(g('compute'), '.3f')} | "
                f"{f(g('comm'), '.3f')} | {f(g('exposed'), '.3f')} | {f(g('hidden'), '.0%')} | {r['bytes'] / 1e6:.2f} | "
                f"{f(None if r['wire'] is None else r['wire'] / 1e6, '.2f')} |"
            )
        print(
            f"trunk gradient sync (2,469,696 floats): all-reduce {sync['all_reduce'] * 1e3:.1f} ms, "
            f"reduce-scatter + all-gather {sync['rs_ag'] * 1e3:.1f} ms",
            flush=True,
        )
        if args.json:
            record = {
                "rate": args.rate,
                "batch": args.batch,
                "K": comm.world_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "alpha_s": link.alpha_s,
                "bytes_per_s": link.bytes_per_s,
                "cpu_s_per_byte": link.cpu_s_per_byte,
                "cpu_s_per_call": link.cpu_s_per_call,
                "cpu_s_per_bf16_byte": link.cpu_s_per_bf16_byte,
                "steal_s_per_byte": link.steal_s_per_byte,
                "rows": rows,
                "sync": sync,
                "profile": json.loads(profile.to_json()),
            }
            with open(args.json, "a") as fh:
                fh.write(json.dumps(record) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    # Some exits abort in a C++ static destructor after all work is done (seen with gloo here);
    # the figures are printed, so leave without interpreter teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
