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
import torch
import torchvision.transforms as T
from PIL import Image

from featrecon import FeatreconError
from featrecon import schema as S
from featrecon.backbone import FeatureExtractor, load_resnet50, preprocessing_for, resolve_layers
from featrecon.extract import ExtractConfig, extract, to_storage
from featrecon.storage import open_cache

from conftest import SIZE, direct_forward, make_image_folder


def cfg(out: Path, images: Path, **kw) -> ExtractConfig:
    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=4, shard_size=4, progress=False)
    base.update(kw)
    return ExtractConfig(out=out, images=images, **base)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_features_equal_direct_torchvision_forward(tmp_path, photo_dir, suffix):
    out = tmp_path / f"cache{suffix}"
    result = extract(cfg(out, photo_dir, layers="all"))
    assert result.done == len(list(photo_dir.iterdir())) and not result.skipped
    model, _ = load_resnet50("random:0")
    with open_cache(out) as store:
        images = store.read(S.IMAGES, 0, store.meta.n)
        ids = store.ids()
        # The cached images are torchvision's own resize + centre crop of the files.
        ref_tf = T.Compose([T.Resize(round(SIZE * 256 / 224)), T.CenterCrop(SIZE), T.PILToTensor()])
        for i, image_id in enumerate(ids):
            expected = ref_tf(Image.open(photo_dir / image_id).convert("RGB")).numpy()
            np.testing.assert_array_equal(images[i], expected, err_msg=image_id)
        ref = direct_forward(model, images, list(S_LAYERS))
        for layer in S_LAYERS:
            got = store.read(S.feature_path(layer), 0, store.meta.n)
            assert got.dtype == np.float16
            assert list(got.shape[1:]) == store.meta.layers[layer]
            scale = np.abs(ref[layer]).max()
            np.testing.assert_allclose(got.astype(np.float32), ref[layer], rtol=1e-2, atol=2e-3 * scale, err_msg=layer)


S_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")


def test_shapes_follow_the_strides_and_forward_stops_at_deepest(tmp_path, photo_dir):
    out = tmp_path / "c.zarr"
    extract(cfg(out, photo_dir, layers="layer2,stem", size=96, limit=2))
    with open_cache(out) as store:
        assert list(store.meta.layers) == ["stem", "layer2"]  # shallow to deep, whatever the order asked
        assert store.meta.layers == {"stem": [64, 48, 48], "layer2": [512, 12, 12]}
        assert store.meta.nodes == {"stem": "relu", "layer2": "layer2"}
        assert store.read(S.IMAGES, 0, 2).shape == (2, 3, 96, 96)

    model, _ = load_resnet50("random:0")
    fx = FeatureExtractor(model, resolve_layers("layer2", model), preprocessing_for("random:0"))
    assert not hasattr(fx.body, "layer3") and not hasattr(fx.body, "fc")


def test_graph_rewrites_never_change_a_captured_value():
    """For speed, BatchNorms are folded into convolutions and ReLUs stay in place, except where
    that would change a returned tensor: a captured convolution keeps its BatchNorm after it,
    and a ReLU that would overwrite a captured tensor works on a copy."""
    import copy

    model, _ = load_resnet50("random:0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nodes = ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.add", "layer1.0.relu", "layer1.0.relu_2", "layer1.1.bn3", "layer2"]
    fx = FeatureExtractor(model, resolve_layers(",".join(nodes), model), preprocessing_for("random:0"), channels_last=False)
    inplace = [n for n in fx.body.graph.nodes if n.op == "call_module" and getattr(fx.body.get_submodule(n.target), "inplace", False)]
    assert len(inplace) > 10  # most ReLUs are still in place
    assert fx.folded == 24 - 1  # the 24 BatchNorms up to layer2, but the captured conv's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got = fx(images)
    # Reference: forward hooks on an out-of-place copy of the model, tensors cloned.
    ref, want = copy.deepcopy(model), {}
    for m in ref.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    relu_calls = []

    def keep(name):  # a hook that returns None, so the module's own output goes on
        return lambda m, i, o: want.__setitem__(name, o.clone())

    ref.layer1[0].conv1.register_forward_hook(keep("layer1.0.conv1"))
    ref.layer1[0].bn1.register_forward_hook(keep("layer1.0.bn1"))
    ref.layer1[0].relu.register_forward_hook(lambda m, i, o: relu_calls.append((i[0].clone(), o.clone())))
    ref.layer1[1].bn3.register_forward_hook(keep("layer1.1.bn3"))  # eager then adds the identity in place
    ref.layer2.register_forward_hook(keep("layer2"))
    x = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref(x)
    want["layer1.0.relu"], want["layer1.0.add"], want["layer1.0.relu_2"] = relu_calls[0][1], relu_calls[2][0], relu_calls[2][1]
    assert (want["layer1.0.bn1"] < 0).any() and (want["layer1.0.add"] < 0).any()
    for name in nodes:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)


def test_any_node_name_and_unknown_layer_lists_choices(tmp_path, photo_dir):
    out = tmp_path / "c.zarr"
    extract(cfg(out, photo_dir, layers="layer1.0.bn1", limit=2))
    with open_cache(out) as store:
        got = store.read(S.feature_path("layer1.0.bn1"), 0, 2).astype(np.float32)
    model, _ = load_resnet50("random:0")
    with open_cache(out) as store:
        x = store.read(S.IMAGES, 0, 2)
    t = (torch.from_numpy(x).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        y = model.layer1[0].bn1(model.layer1[0].conv1(model.maxpool(model.relu(model.bn1(model.conv1(t))))))
    # Before its ReLU: negative values must survive (the in-place ReLU trap).
    assert (got < 0).any()
    np.testing.assert_allclose(got, y.numpy(), rtol=1e-2, atol=2e-3 * float(y.abs().max()))
    with pytest.raises(FeatreconError, match="unknown layer 'layer9'.*stem, layer1"):
        extract(cfg(tmp_path / "d.zarr", photo_dir, layers="layer9"))


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
                       (dict(compile="maybe"), "--compile 'maybe': choose auto, yes or no"),
                       (dict(weights="IMAGENET_V9"), "not a known name nor an existing file")):
        with pytest.raises(FeatreconError, match=match):
            extract(cfg(tmp_path / "c.zarr", photo_dir, **bad))


def test_download_failure_names_the_alternatives(monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(FeatreconError, match="could not download.*--weights PATH.*--weights random"):
        load_resnet50("IMAGENET1K_V2")
    model, name = load_resnet50("auto")  # falls back, and says what it used
    assert name == "random:0"


def test_disk_full_is_a_clear_error_and_keeps_finished_shards(tmp_path, photo_dir, monkeypatch):
    from featrecon.storage import ZarrCacheStore

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


def test_float16_overflow_is_counted(tmp_path, photo_dir):
    model, _ = load_resnet50("random:0")
    sd = model.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"] * 1e5  # pushes the stem past 65504
    wfile = tmp_path / "big.pt"
    torch.save(sd, wfile)
    result = extract(cfg(tmp_path / "c.zarr", photo_dir, layers="stem", weights=str(wfile), limit=2))
    assert result.overflow.get("stem", 0) > 0
    with open_cache(tmp_path / "c.zarr") as store:
        stem = store.read(S.feature_path("stem"), 0, 2)
        assert int(np.isinf(stem).sum()) == result.overflow["stem"]
        assert store.meta.weights == str(wfile.resolve())


def test_to_storage_counts_exactly_the_values_float16_turns_into_inf():
    """65510 rounds to 65504 (kept), 70000 and -70000 overflow; an inf already in the float32
    activations is out of range too; a NaN is not counted, even in a sample that overflows."""
    v = torch.zeros(3, 2, 4, 4).contiguous(memory_format=torch.channels_last)
    v[0, 0, 0, 0] = 65510.0
    v[1, 0, 0, 0], v[1, 1, 2, 3] = 70000.0, -70000.0
    v[2, 0, 0, 0], v[2, 0, 1, 1], v[2, 1, 0, 0] = float("nan"), float("inf"), 1e6
    arrays, overflow = to_storage({"x": v}, "float16")
    h = arrays[S.feature_path("x")]
    assert h.dtype == np.float16 and h.shape == (3, 2, 4, 4) and h.flags.c_contiguous
    assert h[0, 0, 0, 0] == 65504 and overflow["x"].tolist() == [0, 2, 2]
    np.testing.assert_array_equal(h, v.numpy().astype(np.float16))
    _, none = to_storage({"x": v[:1]}, "float16")
    assert none == {}  # nothing turned into inf: no per-sample count at all
    _, f32 = to_storage({"x": v}, "float32")
    assert f32 == {}


@pytest.mark.slow
def test_compiled_cpu_forward_writes_what_the_eager_forward_writes(tmp_path, photo_dir):
    """torch.compile'd forward + cast + overflow count (one compile; a short last batch is
    padded to the compiled size) against the eager path, with weights that overflow the stem."""
    model, _ = load_resnet50("random:0")
    sd = model.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"] * 3e4  # some stem values pass 65504, not all
    wfile = tmp_path / "big.pt"
    torch.save(sd, wfile)
    n = len(list(photo_dir.iterdir()))
    assert n % 4, "the last batch must be a short one"
    runs = {c: extract(cfg(tmp_path / f"{c}.zarr", photo_dir, layers="stem,layer2", weights=str(wfile), compile=c))
            for c in ("no", "yes")}
    assert runs["yes"].stats["compile_seconds"] > 0 and runs["no"].stats["compile_seconds"] == 0
    assert runs["no"].overflow.get("stem", 0) > 0 and runs["yes"].overflow == runs["no"].overflow
    with open_cache(tmp_path / "no.zarr") as eager, open_cache(tmp_path / "yes.zarr") as compiled:
        for name in (S.IMAGES, S.feature_path("stem"), S.feature_path("layer2")):
            a, b = eager.read(name, 0, n), compiled.read(name, 0, n)
            np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=name)
            fin = np.isfinite(a)
            np.testing.assert_allclose(b[fin].astype(np.float32), a[fin].astype(np.float32), rtol=2e-3, atol=1e-3,
                                       err_msg=name)


def test_failed_compile_falls_back_to_the_eager_forward(tmp_path, photo_dir, monkeypatch, caplog):
    """--compile auto compiles from COMPILE_AUTO_MIN images on; a compile that fails warns and
    the run goes on eagerly, with the eager run's bytes."""
    import featrecon.extract as E

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    n = len(list(photo_dir.iterdir()))
    monkeypatch.setattr(E, "COMPILE_AUTO_MIN", n + 1)
    extract(cfg(tmp_path / "small.zarr", photo_dir, layers="layer1"))
    assert "torch.compile failed" not in caplog.text  # below the threshold: never tried
    monkeypatch.setattr(E, "COMPILE_AUTO_MIN", n)
    extract(cfg(tmp_path / "a.zarr", photo_dir, layers="layer1"))
    assert "torch.compile failed (RuntimeError: no C++ compiler here); the forward runs eagerly" in caplog.text
    extract(cfg(tmp_path / "b.zarr", photo_dir, layers="layer1", compile="no"))
    with open_cache(tmp_path / "a.zarr") as a, open_cache(tmp_path / "b.zarr") as b:
        name = S.feature_path("layer1")
        np.testing.assert_array_equal(a.read(name, 0, a.meta.n), b.read(name, 0, b.meta.n))


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_copy_path_equals_the_cpu_path_and_counts_overflow():
    """On a GPU the cast, the overflow count and the copy to pinned host memory run without
    waiting; what lands must equal the CPU path's arrays and counts, bit for bit."""
    from featrecon.extract import to_host_async, to_storage

    g = torch.Generator().manual_seed(0)
    feats = {"layer1": (torch.randn(4, 8, 5, 5, generator=g) * 3e4).to(memory_format=torch.channels_last),
             "layer3": torch.randn(4, 16, 3, 3, generator=g)}
    expected, over_cpu = to_storage(feats, "float16")
    assert over_cpu["layer1"].sum() > 0 and "layer3" not in over_cpu
    arrays, counts, ready = to_host_async({k: v.cuda() for k, v in feats.items()}, "float16", torch.cuda.Stream())
    ready.synchronize()
    for name, value in expected.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    np.testing.assert_array_equal(counts["layer1"], over_cpu["layer1"])
    assert not counts["layer3"].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graph_replays_equal_the_eager_forward_for_every_batch():
    """Full batches replay a captured CUDA graph, two graphs taking turns; each batch's host
    arrays must hold that batch's features even after later batches have run."""
    from featrecon.extract import GpuForward, to_storage

    model, _ = load_resnet50("random:0")
    fx = FeatureExtractor(model, resolve_layers("layer1,layer3", model), preprocessing_for("random:0", 64)).cuda()
    forward = GpuForward(fx, "float16", 4, 64, torch.device("cuda"))
    assert len(forward.slots) == 2
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8).pin_memory() for n in (4, 4, 4, 4, 4, 3)]
    results = [forward(b) for b in batches]  # all queued before any is read
    for k, (b, (arrays, counts, ready)) in enumerate(zip(batches, results)):
        ready.synchronize()
        expected, _ = to_storage({name: v.cpu() for name, v in fx(b.cuda()).items()}, "float16")
        for name, value in expected.items():
            scale = float(np.abs(value.astype(np.float32)).max())
            np.testing.assert_allclose(arrays[name].astype(np.float32), value.astype(np.float32),
                                       rtol=2e-3, atol=2e-3 * scale, err_msg=f"batch {k} {name}")
        assert not any(c.any() for c in counts.values())
