"""The one place that picks a cache's backend (Zarr v3 or HDF5) and decides what may be
replaced where a cache is to be written.

Nothing a user has is replaced by accident: `inspect_target` tells a featrecon cache from
an empty folder and from anything else, and `create_cache` replaces only the first two.
A local cache is created beside its place (`.NAME.creating`) and renamed into it, so a
kill or a full disk during creation leaves no half-made cache.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import FeatreconError
from . import remote
from . import schema as S
from .base import ABSENT, CACHE, DAMAGED, EMPTY, FOREIGN, HDF5_SIGNATURE, UNFINISHED, CacheStore
from .h5_store import H5CacheStore, h5_state
from .schema import FORMATS, CacheMeta, Views
from .zarr_store import ZarrCacheStore, creating_root

_BACKENDS: dict[str, type[CacheStore]] = {"zarr": ZarrCacheStore, "hdf5": H5CacheStore}
_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
# featrecon creates these beside a local cache (and the lock, see `lock`): a creation under way, a cache being replaced.
_CREATING, _REPLACED = ".{}.creating", ".{}.replaced"


def format_for(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The backend for a path: `fmt` if given, else HDF5 for .h5/.hdf5, else Zarr."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise FeatreconError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    fmt = "hdf5" if Path(str(path)).suffix.lower() in _H5_SUFFIXES else "zarr"
    if fmt == "hdf5" and remote.is_url(path):
        raise FeatreconError(f"{path}: HDF5 caches are local files (h5py cannot write or read an object store); "
                             "use a .zarr URL, or a local .h5 path")
    return fmt


def open_cache(path: str | os.PathLike, mode: str = "r", fmt: str | None = None) -> CacheStore:
    """Open an existing cache for reading ("r") or resuming ("r+"); `path` may be a URL (see `remote`)."""
    if remote.is_url(path):
        if not remote.exists(remote.join(path, "zarr.json")):
            raise FeatreconError(f"{path}: no cache here; run extract-features --out {path} first")
        return _BACKENDS[format_for(path, fmt)](path, mode)
    path = Path(path)
    if not path.exists():
        raise FeatreconError(f"{path}: no cache here; run extract-features --out {path} first")
    if fmt is None:
        fmt = "zarr" if path.is_dir() else "hdf5"
    return _BACKENDS[format_for(path, fmt)](path, mode)


def _root_state(raw: bytes, where: str) -> tuple[str, str]:
    """The state of a Zarr folder or prefix from the bytes of its root zarr.json."""
    try:
        attrs = json.loads(raw).get("attributes", {})
    except (ValueError, AttributeError) as e:
        return DAMAGED, f"{where} is not valid Zarr metadata ({e})"
    if not isinstance(attrs, dict):
        return DAMAGED, f"{where}: its attributes are not a JSON object"
    if isinstance(attrs.get(S.META_ATTR), dict) and attrs[S.META_ATTR].get("format") == S.FORMAT_NAME:
        return CACHE, ""
    if S.CREATING_ATTR in attrs:
        return UNFINISHED, "a cache whose creation never finished"
    return FOREIGN, "a Zarr group that featrecon did not write"


def inspect_target(path) -> tuple[str, str]:
    """(state, detail) of what is at a cache's place: ABSENT, EMPTY (an empty folder), CACHE (a
    featrecon cache: its metadata says so), UNFINISHED (a creation of ours that never finished:
    object stores only), DAMAGED (featrecon's name on metadata that cannot be read) or FOREIGN
    (anything else: never replaced)."""
    if remote.is_url(path):
        raw = remote.read_bytes(remote.join(path, "zarr.json"))
        if raw is not None:
            return _root_state(raw, remote.join(path, "zarr.json"))
        fs, root = remote.filesystem(path)
        return (FOREIGN, "objects that are not a Zarr cache") if fs.exists(root) and fs.ls(root) else (ABSENT, "")
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return ABSENT, ""
    if path.is_dir():
        if not any(path.iterdir()):
            return EMPTY, ""
        root = path / "zarr.json"
        if not root.is_file():
            return FOREIGN, "a folder that is not a Zarr cache"
        try:
            return _root_state(root.read_bytes(), str(root))
        except OSError as e:
            return DAMAGED, f"{root} cannot be read ({e.strerror or e})"
    if not path.is_file():
        return FOREIGN, "not a file or folder"
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError as e:
        return FOREIGN, f"a file that cannot be read ({e.strerror or e})"
    if head != HDF5_SIGNATURE:
        return FOREIGN, "a file that is not HDF5"
    return h5_state(path)


def check_replaceable(path, overwrite: bool) -> str:
    """The state at `path` if extract-features may write there (create, resume, or with
    `overwrite` replace); else a one-line refusal that names what is there."""
    state, detail = inspect_target(path)
    if state == FOREIGN:
        raise FeatreconError(f"--out {path} holds {detail}; featrecon writes and replaces only its own caches "
                             "(never other files): choose another --out")
    if state == DAMAGED:
        raise FeatreconError(f"--out {path}: {detail}, so featrecon cannot tell that it wrote it and will not replace "
                             f"it; if it is an old cache you no longer need, delete {path} yourself, or choose "
                             "another --out")
    return state


def create_cache(path: str | os.PathLike, meta: CacheMeta, ids: list[str], labels: np.ndarray,
                 split: np.ndarray, fmt: str | None = None, views: Views | None = None) -> CacheStore:
    """Create a fresh cache at `path`, replacing an empty folder, a featrecon cache or an unfinished
    creation there, never anything else (see `check_replaceable`). `views`: the per-sample view
    records (default: every sample a centre crop). The caller holds the writer lock (`lock`)."""
    path = path if remote.is_url(path) else Path(path)
    if views is None:
        views = Views.centre_crops(meta.n, meta.preprocessing)
    if len(views) != meta.n or len(ids) != meta.n:
        raise ValueError(f"{len(ids)} ids and {len(views)} views for a cache of {meta.n} samples")
    check_replaceable(path, overwrite=True)
    backend = _BACKENDS[format_for(path, fmt)]
    if remote.is_url(path):  # no rename on object stores: a marker first, the metadata last (see _root_state)
        _clear_prefix(path)
        try:
            return backend.create(path, meta, ids, labels, split, views)
        except OSError as e:
            raise _creation_error(path, e) from None
    # Locally the cache is made beside its place and renamed into it: a kill or a full disk
    # leaves at most a hidden leftover, which the next run (holding the lock) removes.
    temp, old = path.with_name(_CREATING.format(path.name)), path.with_name(_REPLACED.format(path.name))
    for leftover in (temp, old):
        _remove(leftover)
    try:
        backend.create(temp, meta, ids, labels, split, views).close()
    except OSError as e:
        _remove(temp)
        raise _creation_error(path, e) from None
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty folder: nothing to keep
    elif path.exists():
        os.replace(path, old)  # the cache replaced (--overwrite), deleted once the new one is in place
    os.replace(temp, path)
    _remove(old)
    return backend(path, "r+")


def _creation_error(path, e: OSError) -> FeatreconError:
    why = "disk full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else f"write failed ({e.strerror or e})"
    return FeatreconError(f"--out {path}: {why} while creating the cache; nothing was left behind: free space and "
                          "rerun the same command")


def _clear_prefix(url: str) -> None:
    """An object-store prefix made ready for a new cache: first its root marked unfinished (so a
    kill now leaves something the next run recognises as its own), then every other object
    deleted."""
    fs, root = remote.filesystem(url)
    fs.pipe_file(f"{root}/zarr.json", creating_root())
    for entry in fs.ls(root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != "zarr.json":
            fs.rm(entry, recursive=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


