"""The feature cache: its on-disk contract (`schema`, described for people in
storage_schema.md) and everything that reads or writes it.

- `schema`: names, dtypes, shapes, the metadata and the version; `split`: the train/holdout rule.
- `base`: the store interface, which imports no backend; `factory`: the one place that picks
  the backend (`zarr_store`, `h5_store`) once, and the rules for what may be replaced.
- `shards`: featrecon's Zarr shard layout, whole shards encoded; `shard_reader`: read at the
  codec's speed, straight into the caller's buffers; `remote`: object stores; `lock`: one
  writer at a time; `writer`: the extraction's shard writer.
- `plan`: which sample goes to which batch slot, per (seed, epoch); `loader`: the training
  reader that fills those slots; `verify`: checking and repairing a cache.
"""

from ..lazy import exports

__all__ = ["CacheLoader", "CacheMeta", "CacheStore", "create_cache", "open_cache"]
_WHERE = {"CacheLoader": "loader", "CacheMeta": "schema", "CacheStore": "base", "create_cache": "factory",
          "open_cache": "factory"}
__getattr__ = exports(__name__, _WHERE)
