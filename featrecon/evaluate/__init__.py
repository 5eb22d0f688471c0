"""Stage 3: decoders scored on a split of the cache, with pictures.

- `config`: the settings (no torch); `scoring`: `score(ScoreConfig)`, checkpoints joined with
  the cache and the original files; `report`: report.md, metrics.json and the figures.
"""

from ..lazy import exports

__all__ = ['ScoreConfig', 'score']
_WHERE = {'ScoreConfig': 'config', 'score': 'scoring'}
__getattr__ = exports(__name__, _WHERE)
