"""Where a slow link stands idle inside the hybrid's step: the veth's byte counters beside the step's events.

On a link-bound step every millisecond the link carries nothing is a millisecond the step spends
above bytes / rate. This script runs scheme (a) (or another, ``--scheme``) on full-size AlexNet
back to back, while a separate process on worker 0's host reads the interface's tx and rx byte
counters every ~0.5 ms; it logs, on the same clock (``time.monotonic``), each collective the
communicator issues, each wait on one, and each trunk conv's forward. Per step it prints
the link's gaps longer than ``--gap-ms`` (both directions quiet) and, for one step, the events
around them. Run under bench/twohost.sh (two workers, GLOO_SOCKET_IFNAME set):

    bench/twohost.sh 100mbit bench/link_idle.py --rate 100mbit --variant pipelined

A token-bucket link hands out packets in bursts (every ~5 ms at 100 Mbit/s here), so gaps up to
about that are the bucket's rhythm, not idle time. The sampler takes a core's share: step times
read a few percent slower than without it — compare gaps, not step times, across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from rate_ab import set_rate  # bench/rate_ab.py, beside this script
from schemes import hybrid_model, variant_options  # bench/schemes.py

from hybridpar.comm import DistCommunicator
from hybridpar.comm import base as comm_base

EVENTS: list[tuple[float, float, str]] = []  # (start, end, what), time.monotonic seconds


def _record_collectives() -> None:
    """Log every collective issued through a communicator and every wait on one (class-wide)."""

    def timed(fn, name):
        def wrapper(self, x, *args, **kwargs):
            t0 = time.monotonic()
            out = fn(self, x, *args, **kwargs)
            parts = x if isinstance(x, list | tuple) else [x]  # an all-to-all's chunks
            size = sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
            EVENTS.append((t0, time.monotonic(), f"{name} {kwargs.get('tag', '')} {size / 1e6:.2f} MB"))
            return out

        return wrapper

    for name in ("all_gather", "reduce_scatter", "all_to_all", "all_to_all_async", "all_reduce_async"):
        setattr(comm_base.Communicator, name, timed(getattr(comm_base.Communicator, name), name))
    wait = comm_base.Handle.wait

    def timed_wait(self):
        t0 = time.monotonic()
        out = wait(self)
        EVENTS.append((t0, time.monotonic(), "wait"))
        return out

    comm_base.Handle.wait = timed_wait


def _sample(ifname: str, out: str, stop: str) -> None:
    """The sampler process: (time, tx, rx) every ~0.5 ms until ``stop`` exists."""
    base = f"/sys/class/net/{ifname}/statistics/"
    tx, rx = os.open(base + "tx_bytes", os.O_RDONLY), os.open(base + "rx_bytes", os.O_RDONLY)
    rows = []
    open(stop + ".ready", "w").close()
    while len(rows) % 200 or not os.path.exists(stop):
        rows.append((time.monotonic(), int(os.pread(tx, 32, 0)), int(os.pread(rx, 32, 0))))
        time.sleep(0.0004)
    with open(out, "w") as f:
        json.dump(rows, f)


def gaps(samples: list, lo: float, hi: float, min_s: float) -> list[tuple[float, float]]:
    """``(start, seconds)`` of each stretch in [lo, hi] longer than ``min_s`` in which neither
    counter moved."""
    moved = [t for (t, tx, rx), (_, tx0, rx0) in zip(samples[1:], samples, strict=False) if (tx, rx) != (tx0, rx0)]
    out, prev = [], lo
    for t in [t for t in moved if lo <= t <= hi] + [hi]:
        if t - prev > min_s:
            out.append((prev, t - prev))
        prev = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="100mbit", help="the token bucket's rate for this run")
    ap.add_argument("--scheme", default="a")
    ap.add_argument("--variant", default="pipelined", help="a trunk variant of bench/schemes.py")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gap-ms", type=float, default=7.0)
    ap.add_argument("--show-step", type=int, default=5, help="the step whose events are printed")
    ap.add_argument("--sample", nargs=3, metavar=("IFNAME", "OUT", "STOP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sample:
        _sample(*args.sample)
        return
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    comm = DistCommunicator()
    set_rate(args.rate)
    opts = variant_options(args.scheme, args.variant)
    if opts is None:
        ap.error(f"the variant {args.variant!r} does not apply to scheme {args.scheme}")
    if opts["whole"]:
        comm.piece_bytes = None
    model = hybrid_model(comm, opts, overlap=True)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.register_forward_pre_hook(lambda *_, name=name: EVENTS.append((time.monotonic(),) * 2 + (f"{name} >",)))
            m.register_forward_hook(lambda *_, name=name: EVENTS.append((time.monotonic(),) * 2 + (f"{name} <",)))
    _record_collectives()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    work = tempfile.mkdtemp(prefix="link_idle")
    out, stop = os.path.join(work, "samples.json"), os.path.join(work, "stop")
    sampler = None
    if comm.rank == 0:
        sampler = subprocess.Popen([sys.executable, __file__, "--sample", os.environ["GLOO_SOCKET_IFNAME"], out, stop])
        while not os.path.exists(stop + ".ready"):
            time.sleep(0.05)
    dist.barrier()
    steps = []
    for _ in range(args.steps):
        t0 = time.monotonic()
        opt.zero_grad(set_to_none=True)
        model.train_step(x, y, scheme=args.scheme, optimizer=opt)
        opt.step()
        steps.append((t0, time.monotonic()))
    dist.barrier()
    if sampler is not None:
        open(stop, "w").close()
        sampler.wait()
        with open(out) as f:
            samples = json.load(f)
        idle = []
        print(f"scheme {args.scheme}/{args.variant}, b = {args.batch}, {args.rate}: link gaps > {args.gap_ms:g} ms")
        for i, (lo, hi) in enumerate(steps[2:], start=2):  # two warm-up steps
            found = gaps(samples, lo, hi, args.gap_ms / 1e3)
            idle.append(sum(s for _, s in found))
            spots = " ".join(f"{(t - lo) * 1e3:.0f}+{s * 1e3:.0f}" for t, s in found)
            print(f"step {i}: {(hi - lo) * 1e3:.0f} ms, idle {idle[-1] * 1e3:.0f} ms in gaps (at ms + ms): {spots}")
            if i == args.show_step:
                for t0, t1, what in EVENTS:
                    if lo <= t0 <= hi and (what != "wait" or t1 - t0 > 2e-3):
                        print(f"    {(t0 - lo) * 1e3:8.1f} {(t1 - lo) * 1e3:8.1f}  {what}")
        med = statistics.median(hi - lo for lo, hi in steps[2:])
        print(f"median step {med * 1e3:.0f} ms; median idle in gaps {statistics.median(idle) * 1e3:.0f} ms a step")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
