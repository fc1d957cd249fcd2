"""A silent peer noticed in seconds, not after the collectives' long timeout.

A peer that crashes closes its connections, and whatever waits on it fails at once. A peer that
goes silent — its host frozen or powered off, its link cut — closes nothing: TCP keeps waiting,
and so does the collective, until ``parallel.timeout_s`` (600 s by default). That timeout must
stay long, because a genuinely slow collective (a huge all-reduce on a slow link, a peer busy
writing a checkpoint) is not a failure. What tells the two apart is whether the peer's *process*
is alive and reachable, which a tiny side channel can ask without touching the collectives: every
worker bumps a counter of its own in this attempt's store from a thread every
``peer_timeout_s / 6`` and reads everyone's (one ``multi_get``); a counter that has not moved for
``peer_timeout_s`` is a worker that is not running (host frozen) or cannot reach the store (link
down). The store lives in worker 0's process, so a store that does not answer within
``peer_timeout_s`` is worker 0 gone silent.

Then this worker ends its process: the lowest-numbered worker that still runs prints one line
naming the silent peer(s) and the collective it waits in, and every worker that sees it exits,
so that torchrun restarts the group without the lost node (``--max-restarts``; with
``--nnodes=MIN:MAX`` the rendezvous goes on without it, docs/reliability.md). The exit is
``os._exit``: the main thread is blocked inside a C++ collective that Python cannot interrupt,
and gloo has no abort for a pending one. Nothing is lost by it that a checkpoint keeps: those are
written to a temporary directory and renamed when complete.

Why not a torch piece: NCCL's watchdog times each collective against the process group's one
timeout (the same long one) and gloo has none; torchrun's agents watch each other, not the
workers inside a collective, and only between rendezvous rounds.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

KEY = "hybridpar/alive/{}"
# A worker that finished cleanly adds this to its counter: it is gone, not silent.
DONE = 1 << 40
EXIT_PEER_LOST = 2


class PeerWatch:
    """Within ``timeout_s`` of a peer going silent, call ``on_lost(message, speak)`` (by default:
    print the message if ``speak`` — this is the lowest-numbered live worker — and ``os._exit(2)``).
    Runs from ``start()`` to ``stop()``; ``waiting_on()`` names the collective the main thread
    waits in, if any.

    Two threads: one talks to the store, one judges. A store call to a frozen host does not
    return (the client's timeout bounds waiting for a key, not a host that stopped answering),
    so the judge must not be the thread that is stuck: the prober's last answer growing older
    than ``timeout_s`` is itself the sign — of worker 0, whose process serves the store."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        timeout_s: float,
        waiting_on: Callable[[], str | None] = lambda: None,
        on_lost: Callable[[str, bool], None] | None = None,
    ):
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.timeout_s = float(timeout_s)
        self.interval_s = max(0.02, self.timeout_s / 6)
        self.waiting_on = waiting_on
        self.on_lost = on_lost or _exit_process
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._answered_at = time.monotonic()  # everyone was alive when the group formed
        self._values: list[int] | None = None
        self._store_left = False  # the store refused or reset a call: worker 0's process is gone
        self._prober = threading.Thread(target=self._probe, name="hybridpar-peer-probe", daemon=True)
        self._judge = threading.Thread(target=self._watch, name="hybridpar-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._prober.start()
        self._judge.start()
        return self

    def stop(self) -> None:
        """This worker is done: say so (peers must not take its quiet for silence) and stop."""
        self._stop.set()
        self._judge.join()
        self._prober.join(timeout=self.interval_s + 1)

    def _probe(self) -> None:
        keys = [KEY.format(r) for r in range(self.world_size)]
        t0 = time.monotonic()
        try:
            # A connection of its own: the main thread's store calls may be long (a barrier).
            store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout_s))
            while True:
                t0 = time.monotonic()
                store.add(keys[self.rank], DONE if self._stop.is_set() else 1)
                if self._stop.is_set():
                    return
                values = _read(store, keys)
                with self._lock:
                    self._values, self._answered_at = values, time.monotonic()
                self._stop.wait(self.interval_s)
        except RuntimeError:
            # Refused or reset at once: worker 0's process is gone, its connections closed, and
            # the collectives fail on their own with a clear line (PeerLostError). A call that
            # failed only after a long wait leaves the answer old: the judge sees to it.
            if time.monotonic() - t0 < 0.5 * self.timeout_s:
                self._store_left = True

    def _watch(self) -> None:
        seen = [-1] * self.world_size
        moved = [time.monotonic()] * self.world_size
        while not self._stop.wait(self.interval_s):
            if self._store_left:
                return
            with self._lock:
                values, answered_at = self._values, self._answered_at
            now = time.monotonic()
            if now - answered_at > self.timeout_s and self.rank != 0:
                return self._lost([0], now - answered_at)
            for r, v in enumerate(values or []):
                if v != seen[r]:
                    seen[r], moved[r] = v, answered_at
            silent = [
                r
                for r in range(self.world_size)
                if r != self.rank and seen[r] < DONE and now - moved[r] > self.timeout_s
            ]
            if silent:
                return self._lost(silent, now - max(moved[r] for r in silent))

    def _lost(self, silent: list[int], age_s: float) -> None:
        if self._stop.is_set():
            return
        names = ", ".join(f"worker {r}" for r in silent)
        what = self.waiting_on()
        message = (
            f"{names} silent for {age_s:.0f} s (parallel.peer_timeout_s={self.timeout_s:g}) while worker "
            f"{self.rank} {'waits in ' + what if what else 'runs between collectives'}: its host is down, "
            f"frozen or cut off; this run stops so that torchrun can restart it without the lost node "
            f"(--max-restarts) from the last checkpoint"
        )
        speaker = min(r for r in range(self.world_size) if r not in silent)
        self.on_lost(message, self.rank == speaker)


def _read(store: dist.Store, keys: list[str]) -> list[int]:
    """Every worker's counter; a worker that has not written one yet reads as 0 (``add(k, 0)``
    never blocks, ``multi_get`` waits for missing keys)."""
    if store.check(keys):
        return [int(v) for v in store.multi_get(keys)]
    return [store.add(k, 0) for k in keys]


def _exit_process(message: str, speak: bool) -> None:
    if speak:
        print(f"hybridpar: error: {message}", file=sys.stderr, flush=True)
    logging.shutdown()  # flush the run's log file
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)
