"""The byte ledger: every collective a worker issues writes one entry here.

Bytes are counted at the level of the algorithm, not the wire: an all-gather of a part of
``p`` bytes costs its owner ``(K-1)·p`` sent (one copy to each peer), whatever ring or tree
the backend uses underneath. The same entries are written by the emulated and the
torch.distributed communicators, because both go through :class:`~hybridpar.comm.base.Communicator`.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Entry:
    kind: str  # "all_gather", "reduce_scatter", "all_to_all", "all_reduce", "agree"
    tag: str  # what moved, e.g. "features", "trunk_grads"
    sent: int  # bytes this worker sends to its peers
    received: int  # bytes this worker receives from its peers


@dataclass
class ByteLedger:
    entries: list[Entry] = field(default_factory=list)
    host_s: float = 0.0  # host time spent waiting in collectives since the last reset
    # (start, end) CUDA events around collectives on the GPU, resolved when ``seconds`` is read.
    spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    # The collective a worker's main thread is blocked in right now, if any (named by the peer
    # watch when a peer goes silent: comm/peerwatch.py).
    waiting: str | None = None

    def record(self, kind: str, tag: str, sent: int, received: int) -> None:
        self.entries.append(Entry(kind, tag, int(sent), int(received)))

    def reset(self) -> None:
        self.entries.clear()
        self.spans.clear()
        self.host_s = 0.0

    @property
    def seconds(self) -> float:
        """Time spent waiting in collectives since the last reset. On the GPU the host only
        launches them (NCCL returns at once), so there it is what CUDA events recorded on the
        compute stream around each wait measure — the time the stream stood still; reading it
        waits for the last of them."""
        if self.spans:
            self.spans[-1][1].synchronize()
            self.host_s += sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
            self.spans.clear()
        return self.host_s

    def begin(self, device: torch.device | None):
        """Start timing a wait on ``device`` (a CUDA device: events; else the host clock)."""
        if device is not None and device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def end(self, start) -> None:
        if isinstance(start, float):
            self.host_s += time.perf_counter() - start
            return
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self.spans.append((start, stop))

    @contextlib.contextmanager
    def timing(self, device: torch.device | None):
        start = self.begin(device)
        try:
            yield
        finally:
            self.end(start)

    @property
    def sent(self) -> int:
        return sum(e.sent for e in self.entries)

    @property
    def received(self) -> int:
        return sum(e.received for e in self.entries)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (sent, received)}`` summed over the entries."""
        return self._totals("kind")

    def by_tag(self) -> dict[str, tuple[int, int]]:
        """``{tag: (sent, received)}`` summed over the entries."""
        return self._totals("tag")

    def _totals(self, field_name: str) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for e in self.entries:
            key = getattr(e, field_name)
            out[key][0] += e.sent
            out[key][1] += e.received
        return {k: (s, r) for k, (s, r) in out.items()}
