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

from featrecon.cache import remote
from featrecon.cache.factory import open_cache
from featrecon.cli import extract_main, score_main, train_main
from featrecon.errors import FeatreconError
from tests.helpers import SIZE, assert_same_cache, free_port, one_process_run, torchrun

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
        from featrecon.cache.factory import format_for

        format_for(f"s3://{BUCKET}/c.h5")
    with pytest.raises(FeatreconError, match="no cache here"):
        open_cache(f"s3://{BUCKET}/nothing.zarr")
    from featrecon.settings import location

    assert location("s3://b/x.zarr/") == "s3://b/x.zarr" and location("~/x") == Path("~/x").expanduser()


def _record(url: str, pid: int) -> str:
    """A writer record beside the cache at `url`, as a run of this host with process `pid` leaves it."""
    import socket

    from featrecon.cache.lock import WriterLock

    record = WriterLock(url).record_path
    fs, path = remote.filesystem(record)
    fs.pipe_file(path, json.dumps({"host": socket.gethostname(), "pid": pid, "since": "2026-12-01T00:00:00+00:00"}).encode())
    return record


def test_one_writer_at_a_time_on_an_object_store(s3, photo_dir, capsys, caplog):
    import subprocess
    import sys

    from featrecon.cache.lock import WriterLock

    url = f"s3://{BUCKET}/locked/c.zarr"
    with WriterLock(url):  # the record is created only if absent: a second holder is refused
        with pytest.raises(FeatreconError, match="being written by another run"):
            WriterLock(url).acquire()
    record = _record(url, os.getpid())  # a live writer
    assert extract_main(["--images", str(photo_dir), "--out", url, *EXTRACT]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and f"delete {record}" in err and len(err.strip().splitlines()) == 1
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    _record(url, int(dead.stdout))  # a writer of this host that has died
    assert extract_main(["--images", str(photo_dir), "--out", url, *EXTRACT]) == 0
    assert "taking over the writer record of a run that died" in caplog.text
    fs, path = remote.filesystem(record)
    assert not fs.exists(path)  # released at the end


def test_an_s3_cache_with_a_lost_shard_object_or_an_unfinished_creation(s3, photo_dir, tmp_path, capsys):
    from featrecon.cache.zarr_store import creating_root

    url = f"s3://{BUCKET}/lost/c.zarr"
    assert extract_main(["--images", str(photo_dir), "--out", url, *EXTRACT]) == 0
    fs, root = remote.filesystem(url)
    fs.rm_file(f"{root}/features/layer3/c/0/0/0/0")
    os.chdir(tmp_path)
    assert train_main(["--cache", url, "--layer", "layer3", "--epochs", "1", "--width", "16", "--no-progress",
                       "--device", "cpu", "--skip-corrupt"]) == 0  # left out, counted ...
    assert train_main(["--cache", url, "--layer", "layer3", "--epochs", "1", "--width", "16", "--no-progress",
                       "--device", "cpu", "--out", "r2"]) == 2  # ... or a stop naming it
    err = capsys.readouterr().err
    assert "missing: its shard object features/layer3/c/0/0/0/0" in err.strip().splitlines()[-1]
    # A creation killed after its first object: the rerun recognises the prefix as its own.
    url = f"s3://{BUCKET}/unfinished/c.zarr"
    fs.pipe_file(f"{BUCKET}/unfinished/c.zarr/zarr.json", creating_root())
    fs.pipe_file(f"{BUCKET}/unfinished/c.zarr/images/zarr.json", b"{}")
    with pytest.raises(FeatreconError, match="creation never finished"):
        open_cache(url)
    assert extract_main(["--images", str(photo_dir), "--out", url, *EXTRACT]) == 0
    # Objects featrecon did not write are never deleted, not even with --overwrite.
    fs.pipe_file(f"{BUCKET}/theirs/c.zarr/data.bin", b"someone's")
    assert extract_main(["--images", str(photo_dir), "--out", f"s3://{BUCKET}/theirs/c.zarr", *EXTRACT,
                         "--overwrite"]) == 2
    assert "featrecon writes and replaces only its own caches" in capsys.readouterr().err
    assert fs.cat_file(f"{BUCKET}/theirs/c.zarr/data.bin") == b"someone's"
