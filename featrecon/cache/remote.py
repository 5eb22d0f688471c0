"""Caches and image folders on object stores: `s3://bucket/path/cache.zarr`, `gs://...`,
`az://...`, or any other fsspec URL.

Zarr caches go through zarr-python's own `FsspecStore` (the same objects a local cache
has, one per shard and array); featrecon's fast shard reader fetches each shard object
whole through the same fsspec filesystem. Credentials and endpoints come from the
usual places of each filesystem: for S3 (s3fs) the AWS_* environment variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...) and
~/.aws, or `--storage-option KEY=VALUE` (`endpoint_url=...`, `anon=true`, or a dotted
key such as `client_kwargs.region_name=eu-west-1` for a nested setting). Reading S3
needs `pip install "featrecon[s3]"`; gs:// needs gcsfs, az:// adlfs.

HDF5 files stay local: h5py reads a file, not an object store.
"""

from __future__ import annotations

import json

from ..errors import FeatreconError

_options: dict = {}


def is_url(path) -> bool:
    """A remote location (scheme://...), as opposed to a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def parse_options(pairs: list[str] | None) -> dict:
    """--storage-option KEY=VALUE pairs: values parsed as JSON where they are JSON (true,
    3, "x"), else kept as text; a dotted key sets a nested value."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise FeatreconError(f"--storage-option {pair!r}: write KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def set_options(options: dict) -> None:
    """The storage options of every remote location this process opens."""
    _options.clear()
    _options.update(options)


def options() -> dict:
    return dict(_options)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of `url`, or a one-line error naming what to install."""
    try:
        import fsspec.core
    except ImportError:
        raise FeatreconError(f"{url}: remote caches need fsspec; pip install 'featrecon[s3]'") from None
    try:
        return fsspec.core.url_to_fs(url, **_options)
    except ImportError as e:
        raise FeatreconError(f"{url}: {e}") from None
    except ValueError as e:  # an unknown protocol
        raise FeatreconError(f"{url}: {e}") from None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes | None:
    """The object's bytes, or None if there is none."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]
