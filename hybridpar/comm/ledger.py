"""The byte ledger: every collective a worker issues writes one entry here.

Bytes are counted at the level of the algorithm, not the wire: an all-gather of a part of
``p`` bytes costs its owner ``(K-1)·p`` sent (one copy to each peer), whatever ring or tree
the backend uses underneath. The same entries are written by the emulated and the
torch.distributed communicators, because both go through :class:`~hybridpar.comm.base.Communicator`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    kind: str  # "all_gather", "reduce_scatter", "all_to_all", "all_reduce", "agree"
    tag: str  # what moved, e.g. "features", "trunk_grads"
    sent: int  # bytes this worker sends to its peers
    received: int  # bytes this worker receives from its peers


@dataclass
class ByteLedger:
    entries: list[Entry] = field(default_factory=list)
    seconds: float = 0.0  # wall time spent waiting in collectives since the last reset

    def record(self, kind: str, tag: str, sent: int, received: int) -> None:
        self.entries.append(Entry(kind, tag, int(sent), int(received)))

    def reset(self) -> None:
        self.entries.clear()
        self.seconds = 0.0

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
