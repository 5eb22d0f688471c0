"""featrecon: how much of an image survives at each depth of a ResNet-50?

Three stages, each a module: `extract` (one backbone pass into a feature cache),
`train` (decoders from the cache alone) and `evaluate` (metrics and pictures).
From Python: `open_cache`, `load_decoder`, `reconstruct`, and the commands as
`extract_features`, `train_decoder` and `score` (see `featrecon.api`).
"""

__version__ = "0.2.0"


class FeatreconError(ValueError):
    """A problem with the user's input: the CLI prints its message on one line."""


_API = ("Cache", "open_cache", "load_decoder", "reconstruct", "extract_features", "train_decoder", "score")
__all__ = ["FeatreconError", "__version__", *_API]


def __getattr__(name: str):
    # The API is imported on first use, so `import featrecon` (and every command's --help) stays instant.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'featrecon' has no attribute {name!r}")
