"""hybridpar: Krizhevsky's "one weird trick" — data-parallel conv trunk, model-parallel FC head."""

__version__ = "0.1.0"
