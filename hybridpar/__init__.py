"""hybridpar: Krizhevsky's "one weird trick" — data-parallel conv trunk, model-parallel FC head."""

__version__ = "0.1.0"


def hybridize(model, comm, **kwargs):
    """The hybrid of ``model`` for this worker: its conv trunk replicated (data parallel), its FC
    head sharded (model parallel). Any ``nn.Module`` whose forward ends in Linear layers (torchvision's
    classification CNNs, your own): the split is read from its torch.fx graph (``models/split.py``);
    ``head=`` names a module where the head starts instead. Other keywords: :class:`HybridModel`'s."""
    from hybridpar.parallel import HybridModel

    return HybridModel(model, comm, **kwargs)
