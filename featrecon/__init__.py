"""featrecon: how much of an image survives at each depth of a ResNet-50?

Three stages, each a module: `extract` (one backbone pass into a feature cache),
`train` (decoders from the cache alone) and `evaluate` (metrics and pictures).
"""

__version__ = "0.1.0"


class FeatreconError(ValueError):
    """A problem with the user's input: the CLI prints its message on one line."""
