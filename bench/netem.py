"""A lossy, slow link between two network namespaces, in user space: what ``tc netem`` does,
for kernels without it.

Two TUN devices, one moved into each namespace (198.18.0.1 and 198.18.0.2, point to point); this
process reads every IP packet one side sends, drops it with probability ``--loss``, and writes it
to the other side after ``--delay-ms`` ± ``--jitter-ms`` (uniform, so packets may overtake each
other, as with netem's jitter). TCP sees real loss (retransmissions) and real delay. Seeded: the
same loss pattern for the same packet sequence. Run as root; ``bench/twohost.sh`` starts it when
``NETEM`` is set (``NETEM="--loss 0.01 --delay-ms 20 --jitter-ms 10"``) and stops it at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import random
import select
import struct
import subprocess
import time
from pathlib import Path

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
MTU = 65000  # large packets: fewer of them for this process to carry


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def setup(ns_a: str, ns_b: str, tun_a: str, tun_b: str) -> tuple[int, int]:
    fds = []
    for ns, tun, mine, peer in ((ns_a, tun_a, "198.18.0.1", "198.18.0.2"), (ns_b, tun_b, "198.18.0.2", "198.18.0.1")):
        fds.append(_tun(tun))  # made here, moved into the namespace: this process keeps its end
        _ip("link", "set", tun, "netns", ns)
        _ip("-n", ns, "addr", "add", mine, "peer", peer, "dev", tun)
        _ip("-n", ns, "link", "set", tun, "mtu", str(MTU))
        _ip("-n", ns, "link", "set", tun, "up")
    return fds[0], fds[1]


def relay(fd_a: int, fd_b: int, loss: float, delay_s: float, jitter_s: float, seed: int) -> None:
    rng, other = random.Random(seed), {fd_a: fd_b, fd_b: fd_a}
    due: list[tuple[float, int, int, bytes]] = []
    n = 0
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 1.0
        ready, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, MTU + 64)
                except OSError:  # nothing left (EAGAIN), or the device is down (EIO)
                    break
                if rng.random() < loss:
                    continue
                at = time.monotonic() + max(0.0, delay_s + rng.uniform(-jitter_s, jitter_s))
                heapq.heappush(due, (at, n, other[fd], packet))
                n += 1
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, packet = heapq.heappop(due)
            try:
                os.write(out, packet)
            except OSError:
                pass  # the receiving side is full or down: the packet is lost, as on a wire


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", nargs=2, required=True, metavar=("NS_A", "NS_B"))
    p.add_argument("--tun", nargs=2, required=True, metavar=("TUN_A", "TUN_B"))
    p.add_argument("--loss", type=float, default=0.0, help="probability a packet is dropped")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready", help="a file to create once the link is up")
    args = p.parse_args()
    fd_a, fd_b = setup(*args.ns, *args.tun)
    if args.ready:
        Path(args.ready).touch()
    relay(fd_a, fd_b, args.loss, args.delay_ms / 1e3, args.jitter_ms / 1e3, args.seed)


if __name__ == "__main__":
    main()
