"""Errors hybridpar raises on bad input: one clear line, raised before any collective can hang."""


class HybridparError(Exception):
    """Base of every error hybridpar raises on purpose."""


class ShardingError(HybridparError):
    """A model or layer that cannot be split the way the hybrid needs."""


class BatchMismatchError(HybridparError):
    """Workers disagree about a shape that every worker must share (e.g. the local batch)."""


class PeerAbortedError(HybridparError):
    """Another emulated worker failed, so this one stopped waiting for it."""


class ConfigError(HybridparError):
    """A configuration value that cannot work."""


class PeerLostError(HybridparError):
    """A real peer stopped responding within the process group's timeout, or left, mid-collective."""
