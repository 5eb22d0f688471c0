"""extract-features: features equal a direct torchvision forward, resume after a real
kill, bad input handled, settings never mixed."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.errors import FeatreconError
from featrecon.extract.config import ExtractConfig
from featrecon.extract.run import extract
from tests.helpers import SIZE, make_image_folder


def cfg(out: Path, images: Path, **kw) -> ExtractConfig:
    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=4, shard_size=4, progress=False, views=0)
    base.update(kw)
    return ExtractConfig(out=out, images=images, **base)


def test_bad_files_are_skipped_and_odd_images_become_rgb(tmp_path, awkward_dir):
    out = tmp_path / "c.zarr"
    result = extract(cfg(out, awkward_dir, layers="layer1"))
    assert set(result.skipped) == {"bad_empty.png", "bad_text.jpg", "bad_truncated.jpg"}
    assert all(result.skipped.values())
    with open_cache(out) as store:
        ids, status = store.ids(), store.status()
        assert "notes.txt" not in ids and "sub dir/ok_gray.JPG" in ids and "ok_it's_quoted.webp" in ids
        for i, image_id in enumerate(ids):
            expected = S.STATUS_SKIPPED if image_id.startswith("bad_") else S.STATUS_DONE
            assert status[i] == expected, image_id
        images = store.read(S.IMAGES, 0, len(ids))
        feats = store.read(S.feature_path("layer1"), 0, len(ids))
    by_id = dict(zip(ids, images))
    gray = by_id["sub dir/ok_gray.JPG"]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])  # gray -> 3 equal channels
    for i, image_id in enumerate(ids):
        if image_id.startswith("bad_"):
            assert not images[i].any() and not feats[i].any()
    # EXIF orientation 6 is applied: the stored image equals the upright, rotated photo.
    src = Image.open(awkward_dir / "ok_exif_rotated.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    tf = T.Compose([T.Resize(round(SIZE * 256 / 224)), T.CenterCrop(SIZE), T.PILToTensor()])
    np.testing.assert_array_equal(by_id["ok_exif_rotated.jpg"], tf(src).numpy())


def test_rerun_resumes_only_missing_and_refuses_other_settings(tmp_path, photo_dir):
    out = tmp_path / "c.zarr"
    first = extract(cfg(out, photo_dir, layers="layer1"))
    again = extract(cfg(out, photo_dir, layers="layer1"))
    assert first.processed == first.n and again.processed == 0
    for change in (dict(layers="layer2"), dict(size=96), dict(dtype="float32"), dict(weights="random:1")):
        with pytest.raises(FeatreconError, match="other settings.*--overwrite"):
            extract(cfg(out, photo_dir, **{"layers": "layer1", **change}))
    replaced = extract(cfg(out, photo_dir, layers="layer2", overwrite=True))
    assert replaced.processed == replaced.n
    with open_cache(out) as store:
        assert list(store.meta.layers) == ["layer2"]


def test_input_errors_are_one_clear_line(tmp_path, photo_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatreconError, match="no images found"):
        extract(cfg(tmp_path / "c.zarr", empty))
    with pytest.raises(FeatreconError, match="does not exist"):
        extract(cfg(tmp_path / "c.zarr", tmp_path / "nope"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FeatreconError, match="--out"):
        extract(cfg(blocker / "c.zarr", photo_dir))
    for bad, match in ((dict(dtype="int8"), "--dtype"), (dict(codec="gzip"), "--codec"),
                       (dict(codec="zstd:23"), "level must be between -131072 and 22"),
                       (dict(codec="lz4:12"), "level must be between 0 and 9"),
                       (dict(compile="maybe"), "--compile 'maybe': choose one of auto, yes, no"),
                       (dict(weights="IMAGENET_V9"), "not a known name nor an existing file")):
        with pytest.raises(FeatreconError, match=match):
            extract(cfg(tmp_path / "c.zarr", photo_dir, **bad))


def test_disk_full_is_a_clear_error_and_keeps_finished_shards(tmp_path, photo_dir, monkeypatch):
    from featrecon.cache.zarr_store import ZarrCacheStore

    out = tmp_path / "c.zarr"
    real = ZarrCacheStore._write_arrays
    calls = {"n": 0}

    def fill_up(self, start, stop, arrays):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, start, stop, arrays)

    monkeypatch.setattr(ZarrCacheStore, "_write_arrays", fill_up)
    with pytest.raises(FeatreconError, match="disk full.*rerun"):
        extract(cfg(out, photo_dir, layers="layer1"))
    monkeypatch.undo()
    with open_cache(out) as store:
        assert (store.status() == S.STATUS_DONE).sum() == 4  # the first shard survived
    assert extract(cfg(out, photo_dir, layers="layer1")).processed == 2


def _status_count(out: Path) -> int:
    import zarr

    try:
        return int((zarr.open_group(str(out), mode="r")[S.STATUS][:] > 0).sum())
    except Exception:
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    images = make_image_folder(tmp_path / "imgs", copies=8)  # 48 images
    args = ["--images", str(images), "--layers", "stem,layer3", "--weights", "random:0", "--size", str(SIZE),
            "--workers", "0", "--batch-size", "2", "--shard-size", "4", "--no-progress"]
    cmd = [sys.executable, "-m", "featrecon", "extract-features"]
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*cmd, *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _status_count(killed) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _status_count(killed)
    assert 0 < done_at_kill < 48, f"kill landed at {done_at_kill} of 48 samples; the test needs a run in progress"
    subprocess.run([*cmd, *args, "--out", str(killed)], check=True, capture_output=True)
    whole = tmp_path / "whole.zarr"
    subprocess.run([*cmd, *args, "--out", str(whole)], check=True, capture_output=True)
    with open_cache(killed) as a, open_cache(whole) as b:
        assert a.ids() == b.ids()
        for name in (S.IMAGES, S.feature_path("stem"), S.feature_path("layer3")):
            np.testing.assert_array_equal(a.read(name, 0, 48), b.read(name, 0, 48), err_msg=name)
        for name in (S.STATUS, S.LABELS, S.SPLIT):
            np.testing.assert_array_equal(a.read_all(name), b.read_all(name), err_msg=name)
    assert not list(killed.rglob("*.partial"))
