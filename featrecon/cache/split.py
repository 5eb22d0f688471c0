"""The fixed train/holdout split: a rule on each sample's id alone, so the same image is held
out in every cache, run and machine (storage_schema.md, `split`)."""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import FeatreconError
from .schema import SPLIT_HOLDOUT, SPLIT_TRAIN


def holdout_score(image_id: str) -> float:
    """A fixed number in [0, 1) per id: sha1 of the id, first 4 bytes, / 2**32."""
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:4], "big") / 2**32


def assign_split(ids: list[str], holdout_fraction: float) -> np.ndarray:
    """(N,) uint8: SPLIT_HOLDOUT where holdout_score(id) < holdout_fraction. Depends only on the id."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise FeatreconError(f"--holdout-fraction {holdout_fraction}: must be in [0, 1)")
    return np.array([SPLIT_HOLDOUT if holdout_score(i) < holdout_fraction else SPLIT_TRAIN for i in ids], dtype=np.uint8)
