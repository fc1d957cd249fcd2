"""Two nodes, one lost and back: how long from a node freezing to training again on the other.

Two network namespaces joined by a veth (two "hosts"), one elastic torchrun node in each
(``--nnodes=1:2 --max-restarts=3``, c10d rendezvous hosted by node A at 198.18.0.1), one run
directory both see (the run's checkpoints). After step ``--fault-step`` node B freezes (its
torchrun and its worker SIGSTOPped: a hung host that keeps its connections open and says
nothing). Then:

1. node A's worker notices within ``parallel.peer_timeout_s`` (comm/peerwatch.py) and exits;
2. node A's agent re-rendezvouses: node B's agent, silent, drops out of the rendezvous after
   ``keep_alive_interval × keep_alive_max_attempt`` and node A completes the round alone after
   ``last_call_timeout``;
3. node A trains alone from the last checkpoint, re-sharded: the same global batch on one worker;
4. the frozen node is killed and a fresh one started (a replaced host); node A's agent sees it
   waiting, stops its worker with SIGTERM (a checkpoint of the step in flight, hybridpar/preemption.py)
   and the next round has two nodes again: both resume from that checkpoint.

Run as root:
    sudo .venv/bin/python bench/elastic.py [--peer-timeout 30] [--rdzv-conf ...] [--out T.json] -- OVERRIDES...
It prints the timeline (seconds from the freeze) and writes it as JSON; OVERRIDES go to
``hybridpar.train`` on both nodes (``hydra.run.dir`` is set by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

A, B = "198.18.0.1", "198.18.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


class Hosts:
    """Two namespaces and a veth between them; removed on exit."""

    def __init__(self):
        tag = os.getpid()
        self.ns, self.ifc = (f"hpA{tag}", f"hpB{tag}"), (f"vA{tag}", f"vB{tag}")

    def __enter__(self):
        (na, nb), (ia, ib) = self.ns, self.ifc
        _ip("netns", "add", na)
        _ip("netns", "add", nb)
        _ip("link", "add", ia, "type", "veth", "peer", "name", ib)
        for ns, ifc, addr in ((na, ia, A), (nb, ib, B)):
            _ip("link", "set", ifc, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifc)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", ifc, "up")
        return self

    def __exit__(self, *exc):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


class Node:
    """One torchrun node in a namespace; its output lines, time-stamped, in ``lines``."""

    def __init__(self, name, hosts, index, args, run_dir, env_extra, t0):
        ns, ifc, addr = hosts.ns[index], hosts.ifc[index], (A, B)[index]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": ifc, "OMP_NUM_THREADS": "1", **env_extra}
        # torchrun's agents share one store per node across rendezvous rounds and keep the first
        # round's address of it: after worker 0's node changes (a node lost, another back) the
        # nodes look for each other in different stores and the round never starts (torch 2.14).
        # Without sharing, each round's worker 0 serves a fresh one (docs/reliability.md).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run"]
        cmd += ["--nnodes=1:2", "--nproc_per_node=1", f"--max-restarts={args.max_restarts}"]
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={A}:29400", f"--rdzv-id=elastic{os.getpid()}"]
        conf = f"is_host={'true' if index == 0 else 'false'}" + (f",{args.rdzv_conf}" if args.rdzv_conf else "")
        cmd += [f"--local-addr={addr}", f"--rdzv-conf={conf}", "--monitor-interval=0.5"]
        cmd += ["-m", "hybridpar.train", *args.overrides, f"hydra.run.dir={run_dir}"]
        self.name, self.t0, self.lines = name, t0, []
        self.log = (run_dir.parent / f"{run_dir.name}.{name}.log").open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            t = time.monotonic() - self.t0
            self.lines.append((t, line.rstrip()))
            self.log.write(f"{t:8.2f} {line}")
            self.log.flush()

    def first(self, text: str, after: float = -1.0) -> float | None:
        return next((t for t, line in list(self.lines) if text in line and t > after), None)

    def kill(self):
        """The whole host gone: torchrun, its workers (own sessions) and everything below."""
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _metrics_after(path: Path, t0: float, deadline: float) -> float | None:
    """The time (from t0) the next training record is appended to ``path`` (metrics.jsonl)."""
    seen = len(path.read_text().splitlines()) if path.exists() else 0
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if any("train/loss" in line for line in lines[seen:]):
                return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _wait_for(pred, deadline: float, every: float = 0.05):
    while time.monotonic() < deadline:
        got = pred()
        if got is not None:
            return got
        time.sleep(every)
    return None


def run(args) -> dict:
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + args.limit_s
    out: dict = {"peer_timeout_s": args.peer_timeout, "rdzv_conf": args.rdzv_conf, "events": {}}
    ev = out["events"]
    with Hosts() as hosts:
        slow = f"slow@{args.slow_ms}" if args.slow_ms else ""
        a = Node("A", hosts, 0, args, run_dir, {"HYBRIDPAR_FAULT": slow}, t0)
        time.sleep(0.5)  # node A hosts the rendezvous store
        b = Node("B", hosts, 1, args, run_dir, {"HYBRIDPAR_FAULT": f"freeze@{args.fault_step},{slow}"}, t0)
        nodes = [a, b]
        try:
            ev["freeze"] = _wait_for(lambda: b.first("this host freezes"), deadline)
            if ev["freeze"] is None:
                raise RuntimeError("node B never froze")
            ev["noticed"] = _wait_for(lambda: a.first("silent for", ev["freeze"]), deadline)
            ev["alone"] = _wait_for(lambda: a.first("world size 1 ", ev["freeze"]), deadline)
            _wait_for(lambda: _resumed(a, ev["freeze"]), deadline)
            ev["training_alone"] = _metrics_after(run_dir / "metrics.jsonl", t0, deadline)
            b.kill()  # the frozen host is replaced
            ev["replacement_started"] = time.monotonic() - t0
            b2 = Node("B2", hosts, 1, args, run_dir, {"HYBRIDPAR_FAULT": slow}, t0)
            nodes.append(b2)
            ev["two_again"] = _wait_for(
                lambda: (
                    a.first("world size 2 ", ev["replacement_started"])
                    or b2.first("world size 2 ", ev["replacement_started"])
                ),
                deadline,
            )
            _wait_for(lambda: _resumed(a, ev["replacement_started"]) or _resumed(b2, 0), deadline)
            ev["training_two"] = _metrics_after(run_dir / "metrics.jsonl", t0, deadline)
            for n in (a, b2):
                n.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out["returncodes"] = {"A": a.proc.returncode, "B2": b2.proc.returncode}
        finally:
            for n in nodes:
                if n.proc.poll() is None:
                    n.kill()
    out["lines"] = {n.name: [line for _, line in n.lines if "hybridpar" in line] for n in nodes}
    f = ev.get("freeze") or 0.0
    out["seconds_from_freeze"] = {k: round(v - f, 2) for k, v in ev.items() if v is not None and k != "freeze"}
    summary = run_dir / "summary.json"
    out["summary"] = json.loads(summary.read_text()) if summary.exists() else None
    return out


def _resumed(node: Node, after: float) -> int | None:
    for t, line in list(node.lines):
        if t > after and "resuming from" in line and "(step " in line:
            return int(line.split("(step ")[1].split(",")[0])
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-timeout", type=float, default=30.0, help="parallel.peer_timeout_s")
    p.add_argument("--rdzv-conf", default="", help="extra --rdzv-conf, e.g. keep_alive_interval=1,last_call_timeout=2")
    p.add_argument("--fault-step", type=int, default=6)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--slow-ms", type=int, default=0, help="every step this much longer (time to act mid-run)")
    p.add_argument("--run-dir", default="runs/elastic")
    p.add_argument("--limit-s", type=float, default=600.0)
    p.add_argument("--out", help="write the timeline here (JSON)")
    p.add_argument("overrides", nargs="*", help="hybridpar.train overrides, after --")
    args = p.parse_args(argv)
    args.overrides = [*args.overrides, f"parallel.peer_timeout_s={args.peer_timeout}"]
    if os.geteuid() != 0:
        sys.exit("bench/elastic.py: run as root (it makes network namespaces)")
    result = run(args)
    for k, v in result["seconds_from_freeze"].items():
        print(f"{k:>22}: {v:7.2f} s after the freeze")
    print("return codes:", result.get("returncodes"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
