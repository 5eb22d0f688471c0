"""featrecon: how much of an image survives at each depth of a ResNet-50?

Three stages, each a subpackage: `extract` (one backbone pass into a feature cache),
`train` (decoders from the cache alone) and `evaluate` (metrics and pictures), with the
cache's format and readers in `cache`. From Python: `open_cache`, `load_decoder`,
`reconstruct`, and the commands as `extract_features`, `train_decoder` and `score` (see
`featrecon.api`).
"""

from .errors import FeatreconError
from .lazy import exports
from .version import __version__

_API = ("Cache", "open_cache", "load_decoder", "reconstruct", "extract_features", "train_decoder", "score")
__all__ = ["FeatreconError", "__version__", *_API]
__getattr__ = exports(__name__, {name: "api" for name in _API})
