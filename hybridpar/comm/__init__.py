"""Communication: one interface, a torch.distributed and an in-process backend, the byte ledger,
and the differentiable activation moves built on them."""

from hybridpar.comm.base import Agreement, Communicator, Handle, even_split
from hybridpar.comm.emulated import EmulatedCommunicator, EmulatedWorld, run_emulated
from hybridpar.comm.ledger import ByteLedger, Entry
from hybridpar.comm.torchdist import DistCommunicator

__all__ = [
    "Agreement",
    "ByteLedger",
    "Communicator",
    "DistCommunicator",
    "EmulatedCommunicator",
    "EmulatedWorld",
    "Entry",
    "Handle",
    "even_split",
    "run_emulated",
]
