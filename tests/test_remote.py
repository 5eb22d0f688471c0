"""Caches on an S3-compatible object store: a moto server started here on 127.0.0.1 holds
what extract-features writes (one process or two), and train-decoder and score read it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from conftest import SIZE
from featrecon import FeatreconError, remote
from featrecon.cli import extract_main, score_main, train_main
from featrecon.storage import open_cache
from test_distributed import assert_same_cache, free_port, one_process_run, torchrun

BUCKET = "caches"
EXTRACT = ["--weights", "random:0", "--layers", "layer1,layer3", "--size", str(SIZE), "--shard-size", "4",
           "--batch-size", "4", "--workers", "0", "--views", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def s3():
    """The endpoint of a fresh S3 server with one bucket; the AWS_* variables point at it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        remote.set_options({})
        server.stop()


def _objects(url: str) -> dict[str, bytes]:
    fs, root = remote.filesystem(url)
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root))}


def test_a_cache_on_s3_is_written_trained_on_and_scored(s3, photo_dir, tmp_path):
    url = f"s3://{BUCKET}/one/c.zarr"
    local = tmp_path / "local.zarr"
    assert extract_main(["--images", str(photo_dir), "--out", url, *EXTRACT]) == 0
    assert extract_main(["--images", str(photo_dir), "--out", str(local), *EXTRACT]) == 0
    objects = _objects(url)
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}
    assert sorted(objects) == sorted(files)  # the same objects, byte for byte (but the creation time)
    assert [k for k in files if k != "zarr.json" and files[k] != objects[k]] == []
    with open_cache(url) as store, open_cache(local) as ref:
        assert store.ids() == ref.ids()
        reader = store.row_reader("features/layer3")  # the fast reader, one GET per shard
        out = [np.empty(store.meta.layers["layer3"], np.float16) for _ in range(2)]
        reader.read(1, [1, 0], out)
        np.testing.assert_array_equal(np.stack(out), ref.read("features/layer3", 4, 6)[[1, 0]])
    os.chdir(tmp_path)
    assert train_main(["--cache", url, "--layer", "layer3", "--epochs", "1", "--width", "16", "--arch", "espcn",
                       "--no-progress", "--device", "cpu"]) == 0
    fs, _ = remote.filesystem(url)  # the originals from a URL prefix too
    for p in photo_dir.iterdir():
        fs.put_file(str(p), f"{BUCKET}/photos/{p.name}")
    assert score_main(["--cache", url, "--images", f"s3://{BUCKET}/photos", "--out", "report", "--no-progress",
                       "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["originals"]["equal"] == report["n"] >= 1


def test_two_ranks_write_one_s3_cache_equal_to_one_process(s3, photo_dir, tmp_path):
    url = f"s3://{BUCKET}/two/c.zarr"
    done = torchrun(2, "extract-features", "--images", str(photo_dir), "--out", url, *EXTRACT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = tmp_path / "ref.zarr"
    done = one_process_run("extract-features", "--images", str(photo_dir), "--out", str(ref), *EXTRACT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    mirror = tmp_path / "mirror.zarr"
    for key, data in _objects(url).items():
        (mirror / key).parent.mkdir(parents=True, exist_ok=True)
        (mirror / key).write_bytes(data)
    assert_same_cache(mirror, ref, skipped=False)


def test_storage_options_and_bad_urls(s3, photo_dir):
    assert remote.parse_options(["endpoint_url=http://127.0.0.1:1", "anon=true", "client_kwargs.region_name=x"]) == {
        "endpoint_url": "http://127.0.0.1:1", "anon": True, "client_kwargs": {"region_name": "x"}}
    with pytest.raises(FeatreconError, match="KEY=VALUE"):
        remote.parse_options(["endpoint_url"])
    with pytest.raises(FeatreconError, match="HDF5 caches are local files"):
        from featrecon.storage import format_for

        format_for(f"s3://{BUCKET}/c.h5")
    with pytest.raises(FeatreconError, match="no cache here"):
        open_cache(f"s3://{BUCKET}/nothing.zarr")
    assert remote.location("s3://b/x.zarr/") == "s3://b/x.zarr" and remote.location("~/x") == Path("~/x").expanduser()
