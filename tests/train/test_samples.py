"""train-decoder: loader coverage, loss goes down, resume equals uninterrupted, refusals."""

from __future__ import annotations

import numpy as np

from featrecon.cache.factory import open_cache
from featrecon.train.samples import MIN_VALIDATION, train_indices, validation_split


def test_too_few_validation_images_are_not_kept_out(zarr_cache):
    with open_cache(zarr_cache) as store:
        idx = train_indices(store, False)
        sources = len(set(store.ids()[i] for i in idx))
        assert sources * 0.05 < MIN_VALIDATION  # about one image: best.pt would be chosen by chance
        train, val = validation_split(store, idx, 0.05)
        assert len(val) == 0 and np.array_equal(train, idx)
        assert len(validation_split(store, idx, 0.3)[1]) >= 1
