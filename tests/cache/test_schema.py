"""Storage: exact round trips in both formats and every codec; the schema page's snippets work."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache

SCHEMA_MD = Path(__file__).resolve().parents[2] / "storage_schema.md"


def snippets() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", SCHEMA_MD.read_text(), re.S)
    return {"zarr": next(b for b in blocks if "zarr.open_group" in b), "hdf5": next(b for b in blocks if "h5py.File" in b)}


def test_schema_page_snippets_read_the_cache(small_cache):
    """The plain zarr / h5py code in storage_schema.md reads what featrecon wrote."""
    code = snippets()["hdf5" if small_cache.suffix == ".h5" else "zarr"]
    ns = {"path": str(small_cache)}
    exec(code, ns)  # noqa: S102 - the documented snippet itself
    with open_cache(small_cache) as store:
        np.testing.assert_array_equal(ns["features"], store.read(S.feature_path("layer3"), 0, 1)[0])
        np.testing.assert_array_equal(ns["image"], store.read(S.IMAGES, 0, 1)[0])
        assert ns["image_id"] == store.ids()[0] and ns["label"] == int(store.read_all(S.LABELS)[0])
        assert ns["split"] == ("holdout" if store.read_all(S.SPLIT)[0] else "train") and ns["done"]
        assert ns["meta"] == store.meta.to_dict() | {"preprocessing": ns["meta"]["preprocessing"]}
