"""score: end to end through the CLI, numbers checked independently, originals joined, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.cache.split import holdout_score
from featrecon.cli import extract_main, score_main, train_main
from featrecon.errors import FeatreconError
from featrecon.evaluate.config import ScoreConfig
from featrecon.evaluate.scoring import score
from tests.helpers import SIZE, make_image_folder


@pytest.mark.slow
def test_pipeline_end_to_end_through_the_cli(tmp_path, monkeypatch, capsys):
    images = make_image_folder(tmp_path / "imgs", copies=3)  # 18 real photos
    monkeypatch.chdir(tmp_path)
    common = ["--no-progress", "--device", "cpu"]
    assert extract_main(["--images", str(images), "--layers", "all", "--out", "cache.zarr", "--weights", "random:0",
                         "--views", "0", "--size", str(SIZE), "--workers", "0", "--holdout-fraction", "0.3", *common]) == 0
    for layer in ("layer1", "layer4", "layer2,layer3"):
        assert train_main(["--cache", "cache.zarr", "--layer", layer, "--epochs", "2", "--width", "32", *common]) == 0
    assert (tmp_path / "runs" / "layer2+layer3" / "best.pt").is_file()
    assert score_main(["--split", "holdout", "--save", "3", *common]) == 0
    out = capsys.readouterr().out
    assert "| layer1 |" in out and "mean train image" in out
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [r["layers"] for r in report["runs"]] == ["layer1", "layer2+layer3", "layer4"]  # shallow to deep
    with open_cache(tmp_path / "cache.zarr") as store:
        ids, split = store.ids(), store.read_all(S.SPLIT)
        holdout = np.flatnonzero(split == S.SPLIT_HOLDOUT)
        train = np.flatnonzero(split == S.SPLIT_TRAIN)
        images_u8 = store.read(S.IMAGES, 0, store.meta.n)
    # Holdout ids never appear in the train split; the split follows the id hash.
    assert not set(holdout) & set(train)
    assert all((holdout_score(ids[i]) < 0.3) == (i in set(holdout)) for i in range(len(ids)))
    for run in report["runs"]:
        assert run["n"] == len(holdout) and run["per_image"]["index"] == holdout.tolist()
    assert report["originals"]["equal"] == len(holdout)
    # The baseline row, recomputed with numpy and scikit-image from the cached images.
    mean_img = images_u8[train].astype(np.float64).mean(0) / 255
    targets = images_u8[holdout].astype(np.float64) / 255
    ref_mse = ((targets - mean_img) ** 2).reshape(len(holdout), -1).mean(1)
    ref_ssim = [structural_similarity(mean_img.transpose(1, 2, 0), t.transpose(1, 2, 0), gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2) for t in targets]
    assert report["baseline"]["mse"]["mean"] == pytest.approx(ref_mse.mean(), rel=1e-4)
    assert report["baseline"]["ssim"]["mean"] == pytest.approx(np.mean(ref_ssim), abs=1e-3)
    # Saved pictures: original_X.png is the cached target; reconstructions have its size.
    folder = tmp_path / "report" / "layer1"
    first = holdout[0]
    assert np.array_equal(np.asarray(Image.open(folder / f"original_{first}.png")).transpose(2, 0, 1), images_u8[first])
    assert Image.open(folder / f"reconstruction_{first}.png").size == (SIZE, SIZE)
    for name in ("grid.png", "metrics_by_layer.png", "report.md"):
        assert (tmp_path / "report" / name).is_file()
    # The papers' metrics: top-1 and feature fidelity from the rebuilt random:0 backbone, at the decoded layer
    # and every deeper one; LPIPS left out offline (no AlexNet weights here), and the report says why.
    layer1 = report["runs"][0]
    assert {f"cosine/{l}" for l in ("layer1", "layer2", "layer3", "layer4")} <= set(layer1)
    assert "cosine/layer3" not in report["runs"][2] and "cosine/layer4" in report["runs"][2]
    assert 0 <= layer1["top1_agreement"]["mean"] <= 1 and layer1["top1_correct"]["n"] == 0  # no labels known
    assert "cosine/stem" in report["baseline"] and "top1_agreement" in report["baseline"]
    md = (tmp_path / "report" / "report.md").read_text()
    if "lpips" not in layer1:
        assert "LPIPS" in report["left_out"] and "**LPIPS left out**" in md and "--lpips-weights" in md
    assert "## How each run was trained" in md and "espcn decoder" in md and "no extra views" in md
    # Per-image SSIM of the scored run equals scikit-image on the same reconstruction.
    from featrecon.train.checkpoint import decoder_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(tmp_path / "runs" / "layer1" / "best.pt")
    with open_cache(tmp_path / "cache.zarr") as store:
        feats = torch.from_numpy(store.read(S.feature_path("layer1"), first, first + 1)).float()
    with torch.no_grad():
        recon = decoder_from_checkpoint(ckpt)([feats])[0].double().numpy()
    ref = structural_similarity(recon.transpose(1, 2, 0), images_u8[first].transpose(1, 2, 0) / 255, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2)
    assert report["runs"][0]["per_image"]["ssim"][0] == pytest.approx(ref, abs=1e-3)


def _train_one(cache, runs):
    from featrecon.train.config import TrainConfig
    from featrecon.train.loop import fit

    fit(TrainConfig(cache=cache, layers=("layer1",), out=runs / "layer1", epochs=1, batch_size=8, width=32,
                    progress=False, eval_samples=4))


def test_originals_moved_edited_or_missing_are_counted(tmp_path, photos24):
    from tests.helpers import build_cache

    src = tmp_path / "src"
    shutil.copytree(photos24, src)
    cache = build_cache(tmp_path / "c.zarr", src, layers="layer1", holdout_fraction=0.5)
    _train_one(cache, tmp_path / "runs")
    with open_cache(cache) as store:
        ids, split = store.ids(), store.read_all(S.SPLIT)
    hold = [ids[i] for i in np.flatnonzero(split == S.SPLIT_HOLDOUT)]
    assert len(hold) >= 3
    (src / hold[0]).unlink()
    Image.open(photos24 / hold[1]).convert("RGB").rotate(90).save(src / hold[1])
    rep = score(ScoreConfig(cache=cache, runs=tmp_path / "runs", out=tmp_path / "rep", progress=False))
    o = rep["originals"]
    assert (o["missing"], o["changed"], o["equal"]) == (1, 1, len(hold) - 2)
    moved = tmp_path / "moved"
    shutil.copytree(photos24, moved)
    rep = score(ScoreConfig(cache=cache, runs=tmp_path / "runs", out=tmp_path / "rep2", images=moved, progress=False))
    assert rep["originals"]["equal"] == len(hold)


def test_score_refusals(tmp_path, zarr_cache, photos24):
    from tests.helpers import build_cache

    with pytest.raises(FeatreconError, match="no checkpoints found"):
        (tmp_path / "empty").mkdir()
        score(ScoreConfig(cache=zarr_cache, runs=tmp_path / "empty", out=tmp_path / "r", progress=False))
    _train_one(zarr_cache, tmp_path / "runs")
    with pytest.raises(FeatreconError, match="--split 'test'"):
        score(ScoreConfig(cache=zarr_cache, runs=tmp_path / "runs", split="test", out=tmp_path / "r", progress=False))
    other = build_cache(tmp_path / "o.zarr", photos24, weights="random:5", layers="layer1")
    with pytest.raises(FeatreconError, match="fingerprint"):
        score(ScoreConfig(cache=other, runs=tmp_path / "runs", out=tmp_path / "r", progress=False))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatreconError, match="unreadable checkpoint"):
        score(ScoreConfig(cache=zarr_cache, checkpoints=(bad,), out=tmp_path / "r", progress=False))
    tiny = build_cache(tmp_path / "t.zarr", photos24, layers="layer1", limit=1, holdout_fraction=0.0)
    with pytest.raises(FeatreconError, match="no done samples"):
        score(ScoreConfig(cache=tiny, runs=tmp_path / "runs", out=tmp_path / "r", progress=False))


@pytest.mark.slow
def test_readme_python_section_runs_and_agrees_with_score(tmp_path, monkeypatch, capsys):
    """The README's "From Python" code, verbatim, in a folder of photos; its PSNR equals score's."""
    import re
    from pathlib import Path

    from tests.helpers import make_image_folder

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    make_image_folder(tmp_path / "photos", copies=3)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(code, ns)  # noqa: S102 - the documented snippet itself
    assert len(ns["holdout"]) > 0 and ns["recon"].shape == (len(ns["holdout"]), 3, 224, 224)
    row = next(r for r in ns["report"]["runs"] if r["layers"] == "layer3")
    assert row["per_image"]["index"] == ns["holdout"].tolist()
    np.testing.assert_allclose(ns["psnr"], row["per_image"]["psnr"], atol=1e-3)
    assert f"layer3 on {len(ns['holdout'])} holdout images" in capsys.readouterr().out
