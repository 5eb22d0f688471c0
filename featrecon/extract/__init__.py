"""Stage 1: one pass of the backbone over an image set into a feature cache.

- `config`: the settings (no torch); `backbone`: weights, preprocessing, fingerprint and
  layer capture; `forward`: the forward engines (eager, compiled on a CPU, CUDA graphs);
  `images`: discovery, labels and decoding of the source images; `views`: extra training
  views; `run`: the stage itself, `extract(ExtractConfig)`.
"""

from ..lazy import exports

__all__ = ['ExtractConfig', 'ExtractResult', 'extract']
_WHERE = {'ExtractConfig': 'config', 'ExtractResult': 'run', 'extract': 'run'}
__getattr__ = exports(__name__, _WHERE)
