"""Fixtures shared by test files: runs that several tests compare against, made once per session.

Each is launched in the background when a test first asks for it (``tests.helpers.in_background``):
its ``result()`` waits for it, so the first test can launch its own independent run meanwhile; a
test that times anything waits for the result first."""

from __future__ import annotations

import ctypes
import functools
import gc
import os

import pytest

from tests.helpers import in_background


def pytest_sessionstart(session):
    """On CI (``CI=true``), as root: the page cache written back and dropped before the first test.
    A fresh CI machine starts the suite right after pip wrote a ~7 GB virtual environment, and on
    this kind of VM memory taken back from a full cache comes slowly: with ~10 GB of cache the
    float64 VGG-11-BN check took 33 s, after dropping it 14 s (alone, same machine). Nothing else
    changes; a failure to drop (not root, no /proc) is ignored."""
    if os.environ.get("CI") == "true" and hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("1\n")
        except OSError:
            pass


def pytest_collection_modifyitems(config, items):
    """Tests marked ``big_memory`` first, the rest in their usual order. They hold several GB at
    once, and on this kind of VM memory given back and taken again comes slowly: at the end of the
    suite the float64 VGG-11-BN check took 27-32 s, alone 7-8 s."""
    items.sort(key=lambda item: item.get_closest_marker("big_memory") is None)


# Growth in one test past which this test process collects reference cycles and hands freed heap
# memory back to the system before the next.
_COLLECT_AFTER_GROWTH = 256 << 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (returns free heap pages to the system), or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@pytest.fixture(autouse=True)
def _release_memory():
    """This process's memory back to what it holds for good after any test that grew it.

    Tensors freed by the emulated workers' threads stay in those threads' malloc arenas, and what a
    test leaves in reference cycles goes only at a cyclic collection (which counts Python objects,
    not bytes). Left alone the suite's process grew to ~6 GB, and memory past ~10 GB in use on this
    24 GB machine took seconds per gigabyte to get: the float64 VGG and wide ResNet checks ran up
    to three times slower in the suite than alone. One collection and trim costs ~0.1 s, so only
    after a test that grew the process."""
    if os.name != "posix":
        yield
        return
    before = _resident_bytes()
    yield
    if _resident_bytes() > before + _COLLECT_AFTER_GROWTH:
        gc.collect()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory):
    """The final weights of the uninterrupted two-worker torchrun run (``TORCH_EXACT_10``) that
    the restart and preemption tests must end bit-identical to: one launch for both."""
    from tests.test_checkpoint import TORCH_EXACT_10, TORCHRUN, _final, _run

    tmp = tmp_path_factory.mktemp("torchrun_reference")

    def run():
        ref = _run([*TORCHRUN, "-m", "hybridpar.train", *TORCH_EXACT_10, f"hydra.run.dir={tmp / 'ref'}"], tmp, 280)
        assert ref.returncode == 0, ref.stderr[-3000:]
        return _final(tmp / "ref")

    return in_background(run)


@pytest.fixture(scope="session")
def emulated_reference(tmp_path_factory):
    """The run directory of the uninterrupted two-emulated-worker run (``EXACT``: 8 steps, a checkpoint
    every 3) that the kill, preemption and full-disk tests compare against: one launch for all three.
    Read only."""
    from tests.test_checkpoint import EXACT, _train

    ref = tmp_path_factory.mktemp("emulated_reference") / "ref"

    def run():
        proc = _train(ref, *EXACT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return ref

    return in_background(run)
