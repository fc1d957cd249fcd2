"""Each communicator primitive against its definition, emulated and over gloo, uneven splits included."""

import os
import threading

import pytest
import torch

from hybridpar.comm import run_emulated
from tests.helpers import results, run_gloo


def _data(rank, shape):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(*shape, generator=g)


def _primitives(comm):
    k, r = comm.world_size, comm.rank
    sizes = [3 + i for i in range(k)]  # uneven on purpose
    even = [2] * k
    out = {}
    out["ag0"] = comm.all_gather(_data(r, (sizes[r], 4)), 0, sizes)
    out["ag1"] = comm.all_gather(_data(r, (4, sizes[r])), 1, sizes)
    out["ag0_even"] = comm.all_gather(_data(r, (2, 5)), 0, even)
    out["rs0"] = comm.reduce_scatter(_data(r, (sum(sizes), 2)), 0, sizes)
    out["rs1"] = comm.reduce_scatter(_data(r, (2, sum(sizes))), 1, sizes)
    out["rs1_even"] = comm.reduce_scatter(_data(r, (3, 2 * k)), 1, even)
    out["ar"] = comm.all_reduce(_data(r, (7,)))
    chunks = [torch.full((j + 1, r + 1), float(10 * r + j)) for j in range(k)]
    out["a2a"] = comm.all_to_all(chunks, [torch.Size((r + 1, i + 1)) for i in range(k)])
    return out


def _expected(k, r):
    sizes = [3 + i for i in range(k)]
    lo = sum(sizes[:r])
    total = lambda shape: sum(_data(i, shape) for i in range(k))
    return {
        "ag0": torch.cat([_data(i, (sizes[i], 4)) for i in range(k)], 0),
        "ag1": torch.cat([_data(i, (4, sizes[i])) for i in range(k)], 1),
        "ag0_even": torch.cat([_data(i, (2, 5)) for i in range(k)], 0),
        "rs0": total((sum(sizes), 2))[lo : lo + sizes[r]],
        "rs1": total((2, sum(sizes)))[:, lo : lo + sizes[r]],
        "rs1_even": total((3, 2 * k))[:, 2 * r : 2 * r + 2],
        "ar": total((7,)),
        "a2a": [torch.full((r + 1, i + 1), float(10 * i + r)) for i in range(k)],
    }


def _check(outs):
    k = len(outs)
    for r, got in enumerate(outs):
        exp = _expected(k, r)
        for name in exp:
            if name == "a2a":
                assert [t.shape for t in got[name]] == [t.shape for t in exp[name]]
                for a, b in zip(got[name], exp[name]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                torch.testing.assert_close(
                    got[name], exp[name], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
                )


@pytest.mark.parametrize("K", [1, 2, 3])
def test_emulated_primitives(K):
    _check(run_emulated(K, _primitives))


@pytest.mark.timeout(120)
def test_gloo_primitives():
    _check(results(run_gloo(3, _primitives)))


def _pieced(comm, piece_bytes):
    """The primitives with moves cut into pieces of ``piece_bytes``, an async all-to-all among them,
    and what the ledger counted."""
    import torch.distributed as dist

    comm.piece_bytes = piece_bytes
    out = _primitives(comm)
    k, r = comm.world_size, comm.rank
    chunks = [_data(10 * r + j, (3, 5)) for j in range(k)]
    handle = comm.all_to_all_async(chunks, [torch.Size((3, 5))] * k)
    dist.barrier()  # every piece issued everywhere before anyone waits
    out["a2a_async"] = handle.wait()
    # A piece boundary inside a row of a 3-d tensor gathered along its last dimension.
    out["ag2"] = comm.all_gather(_data(r, (2, 3, 4)), 2, [4] * k)
    return out, comm.ledger.sent


@pytest.mark.timeout(120)
@pytest.mark.parametrize("K", [2, 3])
def test_gloo_moves_in_pieces_equal_whole_moves_bit_for_bit(K):
    """parallel.move_piece_mb: even moves above the piece size go as several collectives issued
    together; the results and the ledger must not change (uneven ones go whole on every worker)."""
    pieced = results(run_gloo(K, _pieced, 12))  # 3 floats a piece: ragged last pieces everywhere
    whole = results(run_gloo(K, _pieced, None))
    _check([out for out, _ in pieced])
    for r, ((got, sent), (want, sent_whole)) in enumerate(zip(pieced, whole, strict=True)):
        assert sent == sent_whole
        for j in range(K):
            assert torch.equal(got["a2a_async"][j], _data(10 * j + r, (3, 5)))
        assert torch.equal(got["ag2"], torch.cat([_data(i, (2, 3, 4)) for i in range(K)], 2))
        for name, t in want.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(got[name], t), name
            else:
                assert all(torch.equal(a, b) for a, b in zip(got[name], t, strict=True)), name


def test_a_failing_emulated_worker_releases_its_peers():
    def work(comm):
        if comm.rank == 1:
            raise RuntimeError("worker 1 broke")
        comm.all_reduce(torch.ones(3))  # would wait forever for worker 1 without the abort

    with pytest.raises(RuntimeError, match="worker 1 broke"):
        run_emulated(3, work, timeout_s=30)


def _wire_bytes(comm):
    """Loopback tx bytes (both workers) around each even collective, and what the ledger counts."""
    import torch.distributed as dist

    def lo() -> int:
        with open("/sys/class/net/lo/statistics/tx_bytes") as f:
            return int(f.read())

    n, K = 2 << 20, comm.world_size
    x, out = torch.ones(n), {}
    for name, op in (
        ("reduce_scatter", lambda tag: comm.reduce_scatter(x, 0, [n // K] * K, tag)),
        ("all_gather", lambda tag: comm.all_gather(x[: n // K], 0, [n // K] * K, tag)),
        ("all_reduce", lambda tag: comm.all_reduce(x.clone(), tag)),
    ):
        # lo's counter is the machine's: anything else on loopback meanwhile only adds bytes, so
        # the least of three tries is the collective's own (a 2× route still shows in each try).
        tries = []
        for _ in range(3):
            comm.ledger.reset()
            dist.barrier()
            before = lo()
            op(name)
            dist.barrier()
            tries.append((lo() - before, comm.ledger.sent))
        out[name] = min(tries)
    return out


@pytest.mark.skipif(
    not os.path.exists("/sys/class/net/lo/statistics/tx_bytes"), reason="needs Linux interface counters"
)
def test_gloo_puts_on_the_wire_what_the_ledger_counts(monkeypatch):
    """The ledger is only worth its name if the link carries what it records (gloo's own
    reduce-scatter sends a full all-reduce's bytes: 2× — hence the all-to-all route)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    for name, (wire, sent) in results(run_gloo(2, _wire_bytes))[0].items():
        # Both workers' bytes cross lo; headers and the barriers add a little.
        assert 0.99 <= wire / (2 * sent) <= 1.08, (name, wire, sent)


class _FakeCudaEvent:
    """Stands in for ``torch.cuda.Event`` on a machine without a GPU: each thread (emulated
    worker) has its own clock, which a ``record()`` advances by one second."""

    local = threading.local()

    def __init__(self, enable_timing: bool = False):
        assert enable_timing, "events that time must be created with enable_timing=True"
        self.t = None

    def record(self, stream=None):
        self.local.clock = getattr(self.local, "clock", 0.0) + 1.0
        self.t = self.local.clock

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3  # milliseconds, as torch's

    def synchronize(self):
        assert self.t is not None, "synchronize() on an event never recorded"


def test_on_the_gpu_collectives_are_timed_by_cuda_events(monkeypatch):
    """NCCL returns from a collective at once: the ledger's time there comes from CUDA events
    around each wait (one span per collective, read when ``seconds`` is read), not the host clock."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeCudaEvent)

    def worker(comm):
        comm.timing_device = torch.device("cuda", 0)  # what DistCommunicator sets under NCCL
        comm.all_gather(torch.ones(2, 3), 0, [2] * comm.world_size, tag="x")
        comm.all_reduce(torch.ones(4), tag="y")
        handle = comm.all_reduce_async(torch.ones(4), "z")
        handle.wait()
        first = comm.ledger.seconds  # resolves the three spans
        again = comm.ledger.seconds  # nothing new: the same
        comm.ledger.reset()
        return first, again, comm.ledger.seconds

    for first, again, after_reset in run_emulated(2, worker):
        assert first == again == 3.0  # one second per event pair, three collectives
        assert after_reset == 0.0


def _host_timed(comm):
    import time

    t0 = time.perf_counter()
    comm.all_reduce(torch.ones(1000), tag="y")
    return comm.timing_device, comm.ledger.seconds, time.perf_counter() - t0


def test_gloo_collectives_are_timed_on_the_host():
    for device, seconds, wall in results(run_gloo(2, _host_timed)):
        assert device is None
        assert 0.0 < seconds <= wall
