"""Stage 2: decoders trained from the cache alone.

- `config`: the settings and the rules of their auto values (no torch); `decoders`: the
  models; `samples`: which samples train and validate; `step`: one optimisation step and
  how batches reach the device; `validate`: the reconstruct-and-measure loop (shared with
  scoring); `checkpoint`: last.pt and best.pt; `guard`: the divergence guard; `resume`: which
  run a call continues and with what settings; `loop`: `fit(TrainConfig)`, a visible loop.
"""

from ..lazy import exports

__all__ = ['TrainConfig', 'fit', 'fit_each']
_WHERE = {'TrainConfig': 'config', 'fit': 'loop', 'fit_each': 'loop'}
__getattr__ = exports(__name__, _WHERE)
