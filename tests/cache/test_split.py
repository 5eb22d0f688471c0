"""Labels joined right (devkit order is not torchvision's), split stable, discovery."""

from __future__ import annotations

import pytest

from featrecon.cache.split import assign_split
from featrecon.errors import FeatreconError


def test_split_depends_only_on_the_id():
    ids = [f"img_{i}.jpg" for i in range(4000)]
    split = assign_split(ids, 0.1)
    assert 0.08 < split.mean() < 0.12
    sub = ids[1000:1500][::-1]
    assert assign_split(sub, 0.1).tolist() == split[1000:1500][::-1].tolist()
    assert (assign_split(ids, 0.2) >= split).all()  # a larger fraction only adds holdout ids
    with pytest.raises(FeatreconError, match="holdout-fraction"):
        assign_split(ids, 1.0)
