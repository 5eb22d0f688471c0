"""Damaged caches are caught, named and repaired; every array opens in other Zarr readers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache

SCHEMA_MD = Path(__file__).resolve().parents[2] / "storage_schema.md"


def test_every_array_opens_in_tensorstore_as_the_schema_page_says(zarr_cache):
    ts = pytest.importorskip("tensorstore")
    block = next(b for b in re.findall(r"```python\n(.*?)```", SCHEMA_MD.read_text(), re.S) if "tensorstore" in b)
    ns = {"path": str(zarr_cache)}
    exec(block, ns)  # noqa: S102 - the documented snippet itself
    with open_cache(zarr_cache) as store:
        assert ns["image_id"] == store.ids()[0]
        np.testing.assert_array_equal(ns["features"], store.read(S.feature_path("layer3"), 0, 1)[0])
        np.testing.assert_array_equal(ns["image"], store.read(S.IMAGES, 0, 1)[0])
        names = [S.IMAGES, S.IDS, S.LABELS, S.SPLIT, S.STATUS, *(S.feature_path(l) for l in store.meta.layers)]
        for name in names:
            a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(zarr_cache / name)}}).result()
            np.testing.assert_array_equal(a.read().result(), store.read_all(name), err_msg=name)
            assert list(a.domain.labels) == list(S.dimension_names(name))


def test_xarray_opens_the_cache_as_labelled_datasets(zarr_cache):
    pytest.importorskip("xarray")
    block = next(b for b in re.findall(r"```python\n(.*?)```", SCHEMA_MD.read_text(), re.S) if "xarray" in b)
    ns = {"path": str(zarr_cache)}
    exec(block, ns)  # noqa: S102 - the documented snippet itself
    root, feats = ns["root"], ns["feats"]
    with open_cache(zarr_cache) as store:
        split = store.read_all(S.SPLIT)
        assert root.sizes["sample"] == store.meta.n and root["images"].dims == ("sample", "rgb", "y", "x")
        assert set(feats.data_vars) == set(store.meta.layers)
        np.testing.assert_array_equal(feats["layer3"].values, store.read_all(S.feature_path("layer3")))
        np.testing.assert_array_equal(ns["holdout"].values, store.read_all(S.feature_path("layer3"))[split == 1])
