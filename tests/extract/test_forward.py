"""extract-features: features equal a direct torchvision forward, resume after a real
kill, bad input handled, settings never mixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.extract.backbone import FeatureExtractor, load_backbone, preprocessing_for, resolve_layers
from featrecon.extract.config import ExtractConfig
from featrecon.extract.forward import to_storage
from featrecon.extract.run import extract
from tests.helpers import SIZE


def cfg(out: Path, images: Path, **kw) -> ExtractConfig:
    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=4, shard_size=4, progress=False, views=0)
    base.update(kw)
    return ExtractConfig(out=out, images=images, **base)


def test_float16_overflow_is_counted(tmp_path, photo_dir):
    model, _ = load_backbone("resnet50", "random:0")
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
    model, _ = load_backbone("resnet50", "random:0")
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
    import featrecon.extract.config as E

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_copy_path_equals_the_cpu_path_and_counts_overflow():
    """On a GPU the cast, the overflow count and the copy to pinned host memory run without
    waiting; what lands must equal the CPU path's arrays and counts, bit for bit."""
    from featrecon.extract.forward import to_host_async, to_storage

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
    from featrecon.extract.forward import GpuForward, to_storage

    model, _ = load_backbone("resnet50", "random:0")
    fx = FeatureExtractor(model, resolve_layers("layer1,layer3", model), preprocessing_for("random:0", 64)).cuda()
    forward = GpuForward(fx, "float16", 4, 64, torch.device("cuda"))
    assert len(forward.slots) == 2
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8).pin_memory()
               for n in (4, 4, 4, 4, 4, 3)]
    results = [forward(b) for b in batches]  # all queued before any is read
    for k, (b, (arrays, counts, ready)) in enumerate(zip(batches, results)):
        ready.synchronize()
        expected, _ = to_storage({name: v.cpu() for name, v in fx(b.cuda()).items()}, "float16")
        for name, value in expected.items():
            scale = float(np.abs(value.astype(np.float32)).max())
            np.testing.assert_allclose(arrays[name].astype(np.float32), value.astype(np.float32),
                                       rtol=2e-3, atol=2e-3 * scale, err_msg=f"batch {k} {name}")
        assert not any(c.any() for c in counts.values())
