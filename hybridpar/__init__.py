"""hybridpar: Krizhevsky's "one weird trick" — data-parallel conv trunk, model-parallel FC head."""

__version__ = "0.1.0"


def hybridize(model, comm, **kwargs):
    """The hybrid of ``model`` for this worker: its conv trunk replicated (data parallel), its FC
    head sharded (model parallel). Any ``nn.Module`` whose forward is "top-level modules in order ->
    flatten -> head" (torchvision AlexNet, VGG, ResNet's fc, your own); ``head=`` names the module
    where the head starts (default: the last one). Other keywords: :class:`HybridModel`'s."""
    from hybridpar.parallel import HybridModel

    return HybridModel(model, comm, **kwargs)
