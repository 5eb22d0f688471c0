"""The feature cache's on-disk format, in one place.

Both backends (Zarr v3 and HDF5, see `factory`) obey what is declared here, and
`storage_schema.md` describes the same layout for people reading a cache with
plain zarr or h5py. Change the layout only together with `SCHEMA_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from ..errors import FeatreconError

FORMATS = ("zarr", "hdf5")
SCHEMA_VERSION = 4
# 1: ids as variable-length strings, no per-chunk checksums; 2: no views (every sample a centre crop);
# 3: no strides or layouts (every cache a ResNet-50's, every layer an NCHW map)
READABLE_VERSIONS = (1, 2, 3, 4)
FORMAT_NAME = "featrecon-cache"

# Array names (paths inside the Zarr group or HDF5 file).
FEATURES = "features"  # group: one array per layer, features/<layer>, (N, C, H, W)
IMAGES = "images"  # (N, 3, H, W) uint8: the preprocessed input, the decoders' target
IDS = "ids"  # (N, L) uint8: UTF-8 path relative to the source root, posix separators, zero-padded to L bytes
LABELS = "labels"  # (N,) int32: torchvision ImageNet class index, -1 if unknown
SPLIT = "split"  # (N,) uint8: SPLIT_TRAIN or SPLIT_HOLDOUT
STATUS = "status"  # (N,) uint8: the done mask, STATUS_* below
RECORDS = "records"  # group of per-shard groups records/<k>: that shard's skipped files and overflow (Zarr)
VIEW = "view"  # (N,) uint16: 0 for the centre crop, 1..K for the extra views (see `views`); from schema 3
VIEW_BOX = "view_box"  # (N, 4) float32: the view's box in fractions of the image's centred square
VIEW_FLIP = "view_flip"  # (N,) uint8: 1 where the view is mirrored

# Attribute keys on the root (Zarr: JSON values; HDF5: JSON-encoded strings).
META_ATTR = "featrecon"  # CacheMeta.to_dict()
SKIPPED_ATTR = "skipped"  # {id: reason} for files that could not be read
OVERFLOW_ATTR = "overflow"  # {shard index: {layer: n values that overflowed the dtype}}
# In CacheMeta.extra: every chunk of the small arrays was stored, zeros included (set by extract-features
# from featrecon 0.3 on; both backends store every chunk); in older Zarr caches a chunk of zeros (all
# train, no views) may be absent by design.
EVERY_SMALL_CHUNK = "every_small_chunk"
PRESENT_SMALL_ARRAYS = ("ids", "view_box")  # never all zeros: a missing chunk is damage in every cache
CREATING_ATTR = "featrecon_creating"  # on a root whose creation is under way (object stores); gone once META_ATTR is set

STATUS_PENDING, STATUS_DONE, STATUS_SKIPPED = 0, 1, 2
CENTRE = 0  # VIEW of the centre crop, the only view ever scored or validated
SPLIT_TRAIN, SPLIT_HOLDOUT = 0, 1
SPLIT_NAMES = {"train": SPLIT_TRAIN, "holdout": SPLIT_HOLDOUT}


def dimension_names(name: str) -> tuple[str, ...]:
    """Zarr v3 `dimension_names` of an array: one name per axis, shared where sizes agree
    (every array's first axis is `sample`), per layer where they differ, so xarray opens
    the root group and the features group as labelled Datasets."""
    if name == IMAGES:
        return ("sample", "rgb", "y", "x")
    if name.startswith(FEATURES + "/"):
        layer = name.split("/", 1)[1]
        return ("sample", f"{layer}_channel", f"{layer}_y", f"{layer}_x")
    if name == IDS:
        return ("sample", "id_byte")
    if name == VIEW_BOX:
        return ("sample", "box_edge")
    return ("sample",)


def encode_ids(ids: list[str]) -> np.ndarray:
    """(N, L) uint8: each id's UTF-8 bytes, zero-padded to the longest (L >= 1)."""
    raw = [i.encode("utf-8") for i in ids]
    out = np.zeros((len(raw), max([1, *map(len, raw)])), np.uint8)
    for row, b in zip(out, raw):
        row[: len(b)] = np.frombuffer(b, np.uint8)
    return out


def decode_ids(stored: np.ndarray) -> list[str]:
    """The ids from `encode_ids`' matrix, or from a schema-1 array of strings."""
    if stored.dtype == np.uint8 and stored.ndim == 2:
        return [row.tobytes().rstrip(b"\0").decode("utf-8") for row in stored]
    return [str(x) for x in stored]

# float16 by default (half the bytes; overflow past 65504 is counted, see OVERFLOW_ATTR).
# No bfloat16: neither zarr v3 nor HDF5 has a portable type for it.
FEATURE_DTYPES = ("float16", "float32")
CODEC_CHOICES = ("zstd", "zstd:<level>", "lz4", "blosc-zstd", "none")
DEFAULT_SHARD_SIZE = 32  # samples per shard (Zarr) and per write (both backends)


@dataclass(frozen=True)
class Codec:
    """A compression choice that both backends can express."""

    name: str  # "zstd", "lz4" (blosc, bit-shuffle), "blosc-zstd" (blosc, bit-shuffle), "none"
    level: int = 1

    @classmethod
    def parse(cls, text: str) -> Codec:
        name, _, level = text.partition(":")
        if name not in ("zstd", "lz4", "blosc-zstd", "none"):
            raise FeatreconError(f"--codec {text!r}: unknown codec; choose one of {', '.join(CODEC_CHOICES)}")
        try:
            lvl = int(level) if level else (1 if name == "zstd" else 5)
        except ValueError:
            raise FeatreconError(f"--codec {text!r}: the level after ':' must be an integer") from None
        low, high = {"zstd": (-131072, 22), "none": (lvl, lvl)}.get(name, (0, 9))  # zstd: negative = fast modes
        if not low <= lvl <= high:
            raise FeatreconError(f"--codec {text!r}: level must be between {low} and {high} for {name}")
        return cls(name, lvl)

    def __str__(self) -> str:
        return "none" if self.name == "none" else f"{self.name}:{self.level}"


@dataclass(frozen=True)
class Preprocessing:
    """How a source image becomes the network input (recorded in the cache)."""

    resize: int  # shorter side resized to this (bilinear, antialiased)
    crop: int  # then centre-cropped to crop x crop
    mean: tuple[float, float, float]  # normalisation applied on the device, after /255
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class CacheMeta:
    """Everything a later stage needs to know about a cache, stored in its root attributes."""

    n: int  # number of samples (files found), including skipped ones
    layers: dict[str, list[int]]  # layer name -> [C, H, W]
    nodes: dict[str, str]  # layer name -> torchvision graph node it was taken from
    weights: str  # torchvision weights name, state-dict path or "random:<seed>"
    weights_fingerprint: str  # sha256 of the state dict (see backbone.fingerprint)
    preprocessing: Preprocessing
    dtype: str  # feature dtype, one of FEATURE_DTYPES
    codec: str  # str(Codec)
    autocast: str  # "none", "bf16" or "fp16": the compute precision of the forward
    source_root: str  # absolute folder the ids are relative to
    holdout_fraction: float  # split rule: sha1(id) as a fraction of 2**32 < this -> holdout
    ids_sha256: str  # hash of the sorted id list: a rerun must see the same files
    shard_size: int = DEFAULT_SHARD_SIZE
    backbone: str = "resnet50"  # torchvision's name of the model (resnet50 before schema 4)
    strides: dict = field(default_factory=dict)  # layer -> image pixels per cell (from schema 4; else from the shapes)
    layouts: dict = field(default_factory=dict)  # layer -> how it was turned into a (C, H, W) grid, where it had to be
    label_source: str = "none"
    views: int = 0  # extra views per source image (samples = images * (views + 1)); 0 before schema 3
    tool_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME
    extra: dict = field(default_factory=dict)

    @property
    def checksummed(self) -> bool:
        """Every stored chunk carries a checksum (crc32c in Zarr, Fletcher-32 in HDF5): from schema 2."""
        return self.schema_version >= 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.preprocessing.crop, self.preprocessing.crop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CacheMeta:
        """The metadata of a stored cache; a FeatreconError that says what is wrong with it
        (the caller names the file)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FeatreconError("not a featrecon cache (no featrecon metadata); was it written by extract-features?")
        if d.get("schema_version") not in READABLE_VERSIONS:
            raise FeatreconError(
                f"cache has schema version {d.get('schema_version')}, this featrecon reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-extract it with this version "
                "(extract-features ... --overwrite)"
            )
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(f.name for f in fields(cls)
                                                          if f.name not in d and f.default is MISSING
                                                          and f.default_factory is MISSING)
        if unknown or missing:
            what = "; ".join(x for x in (f"unknown field(s) {', '.join(unknown)}" if unknown else "",
                                        f"missing field(s) {', '.join(missing)}" if missing else "") if x)
            raise FeatreconError(f"damaged featrecon metadata ({what}); a newer featrecon may have written it")
        try:
            p = d["preprocessing"]
            pre = Preprocessing(int(p["resize"]), int(p["crop"]), tuple(float(v) for v in p["mean"]),
                                tuple(float(v) for v in p["std"]), str(p.get("interpolation", "bilinear")))
            meta = cls(**{**d, "preprocessing": pre})
            ok = (isinstance(meta.n, int) and meta.n >= 0 and isinstance(meta.shard_size, int) and meta.shard_size >= 1
                  and isinstance(meta.layers, dict) and isinstance(meta.nodes, dict) and meta.dtype in FEATURE_DTYPES
                  and isinstance(meta.strides, dict) and isinstance(meta.layouts, dict) and isinstance(meta.backbone, str)
                  and all(isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and v > 0 for v in s)
                          for s in meta.layers.values()))
        except (KeyError, TypeError, ValueError) as e:
            raise FeatreconError(f"damaged featrecon metadata (preprocessing: {type(e).__name__}: {e})") from None
        if not ok:
            raise FeatreconError("damaged featrecon metadata (a field has the wrong type: n, shard_size, layers, "
                                 "nodes or dtype)")
        return meta

    def identity(self) -> dict:
        """The fields a resumed run must agree on; anything else may differ."""
        keys = ("n", "layers", "nodes", "weights_fingerprint", "dtype", "codec", "autocast",
                "holdout_fraction", "ids_sha256", "shard_size", "schema_version", "views", "backbone", "layouts")
        d = {k: getattr(self, k) for k in keys}
        d["preprocessing"] = asdict(self.preprocessing)
        return json.loads(json.dumps(d))  # tuples -> lists, so stored and fresh compare equal

    def resumable_by(self, new: CacheMeta) -> list[str]:
        """The identity fields in which this stored cache differs from what a run would write now
        (none: the run resumes it). A schema-3 cache of a ResNet-50 is what schema 4 writes for it."""
        old, fresh = self.identity(), new.identity()
        if self.schema_version == 3 and new.schema_version == 4 and self.backbone == new.backbone == "resnet50":
            old["schema_version"], old["layouts"] = fresh["schema_version"], fresh["layouts"]
        return [k for k in fresh if old.get(k) != fresh[k]]

    def stride(self, layer: str) -> int:
        """Image pixels per feature cell of a layer."""
        return int(self.strides.get(layer) or self.image_shape[1] // self.layers[layer][1])

    def shards(self) -> range:
        return range((self.n + self.shard_size - 1) // self.shard_size)

    def shard_bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.n, (k + 1) * self.shard_size)

    def sample_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (per-sample shape, dtype) of every per-sample array: the images, then each layer."""
        out = {IMAGES: (self.image_shape, np.dtype(np.uint8))}
        for layer, shape in self.layers.items():
            out[feature_path(layer)] = (tuple(shape), np.dtype(self.dtype))
        return out


def feature_fingerprint(meta: CacheMeta, layers: list[str]) -> str:
    """What a decoder depends on: the weights, the preprocessing, the compute precision
    and the shapes of the layers it reads. Two caches with equal fingerprints for a
    layer give the same features for the same image, whatever their paths."""
    missing = [l for l in layers if l not in meta.layers]
    if missing:
        raise FeatreconError(f"layer(s) {', '.join(missing)} not in the cache; cached layers: {', '.join(meta.layers)}")
    payload = {
        "weights": meta.weights_fingerprint,
        "preprocessing": asdict(meta.preprocessing),
        "autocast": meta.autocast,
        "layers": {l: list(meta.layers[l]) for l in layers},
    }
    if meta.backbone != "resnet50":  # ResNet-50 fingerprints stay those of the caches written before schema 4
        payload["backbone"] = meta.backbone
        payload["layouts"] = {l: meta.layouts[l] for l in layers if l in meta.layouts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def feature_path(layer: str) -> str:
    return f"{FEATURES}/{layer}"


@dataclass(frozen=True)
class Views:
    """Per-sample view records of a cache (`VIEW`, `VIEW_BOX`, `VIEW_FLIP`): (N,) view index, (N, 4) box
    (left, top, right, bottom) in fractions of the image's largest centred square, (N,) flip."""

    view: np.ndarray  # uint16, CENTRE for the centre crop
    box: np.ndarray  # float32
    flip: np.ndarray  # uint8, 1 = mirrored left-right

    def __len__(self) -> int:
        return len(self.view)

    @classmethod
    def centre_crops(cls, n: int, pre: Preprocessing) -> Views:
        """Every sample the centre crop of its own image (a cache without views)."""
        return cls(np.zeros(n, np.uint16), np.tile(np.float32(centre_box(pre.resize, pre.crop)), (n, 1)),
                   np.zeros(n, np.uint8))


def centre_box(resize: int, crop: int) -> tuple[float, float, float, float]:
    """The centre crop's box: the centred square's central crop/resize share (0.875 for 224 of 256)."""
    m = (1 - crop / resize) / 2
    return (m, m, 1 - m, 1 - m)
