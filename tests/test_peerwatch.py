"""A silent peer (host frozen, link down) is noticed within parallel.peer_timeout_s, not after the
collectives' long timeout; a peer that finished, or one that is merely slow, is not taken for one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from hybridpar.comm.peerwatch import DONE, KEY, PeerWatch

TIMEOUT = 0.6


class Verdict:
    def __init__(self):
        self.got, self.at = threading.Event(), None
        self.message, self.speak = None, None

    def __call__(self, message, speak):
        self.message, self.speak, self.at = message, speak, time.monotonic()
        self.got.set()


def _peers(port, beats, stop):
    """Workers 1..: bump their counters while ``beats[r]`` says 'alive'; 'done' marks a clean exit."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    while not stop.is_set():
        for r, state in beats.items():
            if state == "alive":
                store.add(KEY.format(r), 1)
            elif state == "done":
                store.add(KEY.format(r), DONE)
                beats[r] = "gone"
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_a_peer_that_stops_beating_is_named_within_the_peer_timeout_and_a_finished_one_is_not():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    beats, stop = {1: "alive", 2: "alive", 3: "alive"}, threading.Event()
    threading.Thread(target=_peers, args=(master.port, beats, stop), daemon=True).start()
    verdict = Verdict()
    watch = PeerWatch("127.0.0.1", master.port, 0, 4, TIMEOUT, lambda: "all_reduce 'trunk_grads'", verdict)
    watch.start()
    try:
        time.sleep(3 * TIMEOUT)
        assert not verdict.got.is_set(), verdict.message  # everyone beating: nothing to say
        beats[1] = "done"  # finished cleanly: gone, not silent
        time.sleep(3 * TIMEOUT)
        assert not verdict.got.is_set(), verdict.message
        beats[3], silent_at = "frozen", time.monotonic()
        assert verdict.got.wait(5 * TIMEOUT)
    finally:
        stop.set()
        watch.stop()
    assert TIMEOUT <= verdict.at - silent_at <= TIMEOUT + 3 * watch.interval_s + 0.3
    assert verdict.message.startswith(
        "worker 3 silent for 1 s (parallel.peer_timeout_s=0.6) while worker 0 waits in all_reduce 'trunk_grads'"
    ), verdict.message
    assert verdict.speak  # worker 0 is the lowest live worker: it prints the line


_STORE_HOST = textwrap.dedent(
    """
    import time, torch.distributed as d
    m = d.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    print(m.port, flush=True)
    while True:
        m.add("hybridpar/alive/0", 1)
        time.sleep(0.05)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_worker_0_frozen_is_noticed_through_its_store_and_worker_0_killed_is_left_to_the_collectives(fault):
    """Worker 0's process serves the store: frozen (SIGSTOP), the store stops answering and the
    others' prober hangs — the judge still speaks within the timeout; killed, its connections are
    reset at once and the collectives report it (PeerLostError), so the watch stays quiet."""
    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST], stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        verdict = Verdict()
        watch = PeerWatch("127.0.0.1", port, 1, 2, TIMEOUT, lambda: None, verdict).start()
        time.sleep(3 * TIMEOUT)
        assert not verdict.got.is_set(), verdict.message
        t0 = time.monotonic()
        os.kill(host.pid, signal.SIGSTOP if fault == "frozen" else signal.SIGKILL)
        if fault == "frozen":
            assert verdict.got.wait(6 * TIMEOUT)
            assert verdict.at - t0 <= TIMEOUT + 3 * watch.interval_s + 0.3
            assert (
                verdict.message.startswith("worker 0 silent for 1 s") and "runs between collectives" in verdict.message
            )
            assert verdict.speak  # worker 1 is the lowest live worker
        else:
            assert not verdict.got.wait(4 * TIMEOUT), verdict.message
        watch.stop()
    finally:
        host.kill()
        host.wait()


_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time, torch
    from hybridpar import runtime

    def fn(comm, device):
        for i in range(1000):
            if i == 3 and comm.rank == 1:
                os.kill(os.getpid(), signal.SIGSTOP)  # a frozen host
            comm.all_reduce(torch.ones(1000), tag="trunk_grads")
            time.sleep(0.01)

    runtime.run_workers(fn, emulate=1, timeout_s=300, peer_timeout_s=float(sys.argv[1]))
    """
)


@pytest.mark.timeout(90)
def test_a_frozen_peer_ends_the_collective_it_blocks_in_seconds_with_one_line():
    """Two real gloo workers (torchrun's environment, no agent): worker 1 freezes before an
    all-reduce; worker 0, blocked in it with a 300 s process-group timeout, exits with one line
    naming worker 1 and the collective within parallel.peer_timeout_s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    env.update(OMP_NUM_THREADS="1", TORCHELASTIC_RUN_ID="peerwatch-test")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, "2"],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - t0
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("hybridpar: error: worker 1 silent for 2 s "), err
    assert "while worker 0 waits in all_reduce 'trunk_grads'" in lines[0], err
    assert elapsed < 30, elapsed  # start-up, a few steps, then 2 s of silence: not the 300 s timeout
