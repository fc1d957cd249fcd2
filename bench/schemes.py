"""Schemes (a), (b), (c) on real gloo workers: step time, compute, communication, overlap.

    torchrun --standalone --nproc_per_node=2 bench/schemes.py [--batch 16] [--steps 6]

Full-size AlexNet (224 px, 1000 classes, dropout 0), b images per worker, fp32, SGD. Each scheme
runs twice: with overlap (async feature exchange, bucketed trunk all-reduce during backward)
and serialised (every operation waited for at once). The serialised run gives the communication
time (time blocked in collectives) and the compute time (step − communication); the hidden
fraction is (serialised step − overlapped step) / communication. Also times the trunk gradient
sync as one all-reduce vs reduce-scatter + all-gather. Medians over the timed steps, rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from hybridpar.comm import DistCommunicator
from hybridpar.models import alexnet, build_seeded
from hybridpar.parallel import HybridModel
from hybridpar.parallel.cost import ddp_step_bytes


def run(comm, scheme: str, overlap: bool, b: int, steps: int, warmup: int = 2) -> dict[str, float]:
    model = HybridModel(build_seeded(lambda: alexnet(1000, dropout=0.0), 0), comm, overlap=overlap)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(comm.rank)
    x, y = torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 1000, (b,), generator=g)
    step_s, comm_s = [], []
    link0 = link_bytes()
    for i in range(warmup + steps):
        dist.barrier()
        comm.ledger.reset()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.train_step(x, y, scheme=scheme, optimizer=opt)
        opt.step()
        if i >= warmup:
            step_s.append(time.perf_counter() - t0)
            comm_s.append(comm.ledger.seconds)
    wire = (link_bytes() - link0) / (warmup + steps) if link0 is not None else None
    return {"step": statistics.median(step_s), "comm": statistics.median(comm_s), "bytes": comm.ledger.sent, "wire": wire}


def run_ddp(comm, b: int, steps: int, warmup: int = 1) -> dict[str, float]:
    """torch DDP over the whole model (the baseline), its default bucketing and average."""
    model = torch.nn.parallel.DistributedDataParallel(build_seeded(lambda: alexnet(1000, dropout=0.0), 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(comm.rank)
    x, y = torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 1000, (b,), generator=g)
    step_s = []
    link0 = link_bytes()  # after DDP's initial broadcast of the parameters
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            step_s.append(time.perf_counter() - t0)
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


def trunk_sync_times(comm, n: int, reps: int = 7) -> dict[str, float]:
    x = torch.randn(n)
    out = {}
    for name in ("all_reduce", "rs_ag"):
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            if name == "all_reduce":
                dist.all_reduce(x.clone())
            else:
                part = torch.empty(n // comm.world_size)
                dist.reduce_scatter_single(part, x[: part.numel() * comm.world_size].clone())
                full = torch.empty(part.numel() * comm.world_size)
                dist.all_gather_single(full, part)
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--schemes", default="a,b,c", help="comma list of a, b, c, ddp")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    comm = DistCommunicator()
    rows = []
    for scheme in args.schemes.split(","):
        if scheme == "ddp":
            d = run_ddp(comm, args.batch, max(2, args.steps // 2))
            rows.append((scheme, d["step"], None, None, None, None, None, d["bytes"], d["wire"]))
            continue
        serial = run(comm, scheme, False, args.batch, args.steps)
        overlapped = run(comm, scheme, True, args.batch, args.steps)
        compute = serial["step"] - serial["comm"]
        hidden = (serial["step"] - overlapped["step"]) / serial["comm"] if serial["comm"] > 0 else 0.0
        rows.append((scheme, overlapped["step"], serial["step"], compute, serial["comm"], overlapped["comm"], hidden,
                     overlapped["bytes"], overlapped["wire"]))  # fmt: skip
    sync = trunk_sync_times(comm, sum(p.numel() for p in alexnet(1000).features.parameters()))
    if comm.rank == 0:
        print(f"AlexNet 224 px, b = {args.batch} per worker, K = {comm.world_size} gloo processes, 1 thread each; medians of {args.steps} steps")
        print("| scheme | step s (overlap) | step s (serialised) | compute s | communication s | exposed comm s (overlap) | hidden | MB sent/worker (ledger) | MB on the link/step (tx+rx) |")
        print("|---|---|---|---|---|---|---|---|---|")
        f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
        for scheme, st, ss, cp, cm, ex, hid, by, wire in rows:
            print(f"| {scheme} | {st:.3f} | {f(ss, '.3f')} | {f(cp, '.3f')} | {f(cm, '.3f')} | {f(ex, '.3f')} | "
                  f"{f(hid, '.0%')} | {by / 1e6:.2f} | {f(None if wire is None else wire / 1e6, '.2f')} |")  # fmt: skip
        print(f"trunk gradient sync (2,469,696 floats): all-reduce {sync['all_reduce'] * 1e3:.1f} ms, "
              f"reduce-scatter + all-gather {sync['rs_ag'] * 1e3:.1f} ms", flush=True)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    # Some exits abort in a C++ static destructor after all work is done (seen with gloo here);
    # the figures are printed, so leave without interpreter teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
