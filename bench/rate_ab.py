"""The at-the-bound ratios measured interleaved: a configuration on the slow link against the same on
a fast one, and the exact scheme against max(its compute, its bytes at the link's rate), the rates
alternating round by round so that the machine's drift (3–10% between runs on this 2-core host)
falls on both sides alike.

Run under bench/twohost.sh, as root: between rounds each worker reshapes its own end of the link
(``tc qdisc change`` on the interface bench/twohost.sh gives it), then the workers meet at a barrier.
Every round runs, at each rate, scheme a serialised (compute = step − time blocked in collectives)
and each configuration overlapped (bench/schemes.py's ``run``: medians of back-to-back steps).

    bench/twohost.sh 100mbit bench/rate_ab.py --slow 100mbit --fast 10gbit \\
        --configs a/pipelined,a/pipelined+bf16,c/pipelined+bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess

import torch
import torch.distributed as dist
from schemes import calibrate_link, run  # bench/schemes.py, beside this script

from hybridpar import costmodel
from hybridpar.comm import DistCommunicator


def set_rate(rate: str) -> None:
    """This worker's end of the link at ``rate`` (the token bucket bench/twohost.sh made)."""
    ifc = os.environ["GLOO_SOCKET_IFNAME"]
    burst = str(costmodel.tbf_burst(rate))
    cmd = ["tc", "qdisc", "change", "dev", ifc, "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms"]
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow", default="100mbit")
    ap.add_argument("--fast", default="10gbit")
    ap.add_argument("--configs", default="a/pipelined,a/pipelined+bf16,b/pipelined+bf16,c/pipelined+bf16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="append the results as one JSON line to this file (rank 0)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    comm = DistCommunicator()
    configs = [c.partition("/") for c in args.configs.split(",")]
    rates = [args.slow, args.fast]
    links = {}
    for rate in rates:  # each rate's measured bandwidth: the link-limited communication's divisor
        set_rate(rate)
        dist.barrier()
        links[rate] = calibrate_link(comm, comm.world_size).bytes_per_s
    steps: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for rate in rates if r % 2 == 0 else rates[::-1]:  # alternate which rate goes first
            set_rate(rate)
            dist.barrier()
            serial = run(comm, "a", False, args.batch, args.steps, args.warmup)
            steps.setdefault((rate, "a/serial compute"), []).append(serial["step"] - serial["comm"])
            for scheme, _, variant in configs:
                got = run(comm, scheme, True, args.batch, args.steps, args.warmup, variant)
                steps.setdefault((rate, f"{scheme}/{variant}"), []).append(got["step"])
                steps.setdefault((rate, f"{scheme}/{variant} bytes"), []).append(got["bytes"])
    if comm.rank == 0:
        med = {k: statistics.median(v) for k, v in steps.items()}
        print(
            f"AlexNet 224 px, b = {args.batch} per worker, K = {comm.world_size}; {args.rounds} rounds, the rates "
            f"alternating; per round medians of {args.steps} back-to-back steps after {args.warmup}; "
            f"measured {args.slow} {links[args.slow] * 8e-9:.3f} Gbit/s, {args.fast} {links[args.fast] * 8e-9:.3f} Gbit/s"
        )
        print(
            f"| configuration | step s, {args.slow} | step s, {args.fast} | slow / fast (median of rounds) | "
            f"compute s, {args.slow} | link-limited comm s, {args.slow} | step / max(compute, comm), {args.slow} |"
        )
        print("|---|---|---|---|---|---|---|")
        for scheme, _, variant in configs:
            name = f"{scheme}/{variant}"
            slow, fast = steps[(args.slow, name)], steps[(args.fast, name)]
            ratio = statistics.median(s / f for s, f in zip(slow, fast, strict=True))
            compute = med[(args.slow, "a/serial compute")]
            link_s = med[(args.slow, f"{name} bytes")] / links[args.slow]
            print(
                f"| {name} | {med[(args.slow, name)]:.3f} | {med[(args.fast, name)]:.3f} | {ratio:.2f} | "
                f"{compute:.3f} | {link_s:.3f} | {med[(args.slow, name)] / max(compute, link_s):.2f} |"
            )
        if args.json:
            with open(args.json, "a") as f:
                rows = {f"{rate} {name}": v for (rate, name), v in steps.items()}
                f.write(json.dumps({"args": vars(args), "bytes_per_s": links, "rounds": rows}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
