"""extract-features --views: extra random-resized training views, recorded in the cache,
never scored, never of a holdout or validation image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.errors import FeatreconError
from featrecon.evaluate.config import ScoreConfig
from featrecon.evaluate.scoring import score, split_indices
from featrecon.extract.backbone import load_backbone
from featrecon.extract.images import load_image
from featrecon.extract.views import AUTO_MAX, AUTO_TARGET, auto_views, plan, random_box
from featrecon.train.config import TrainConfig
from featrecon.train.loop import fit
from featrecon.train.samples import train_indices, validation_split
from tests.helpers import SIZE, build_cache, direct_forward

K = 3


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory, photos24):
    return build_cache(tmp_path_factory.mktemp("views") / "v.zarr", photos24, views=K, layers="layer1",
                       holdout_fraction=0.25)


def test_a_view_depends_only_on_its_id_and_index():
    ids = ["a.jpg", "b/c.png", "d.jpg"]
    sample_ids, v = plan(ids, 4, 256, 224)
    assert sample_ids == [i for i in ids for _ in range(5)]
    assert v.view.tolist() == list(range(5)) * 3
    _, again = plan(list(reversed(ids)), 4, 256, 224)  # another order, the same boxes per (id, view)
    assert np.array_equal(v.box[5:10], again.box[5:10]) and np.array_equal(v.flip[5:10], again.flip[5:10])
    assert np.allclose(v.box[v.view == 0], [0.0625, 0.0625, 0.9375, 0.9375])
    extra = v.box[v.view > 0]
    assert (extra >= 0).all() and (extra <= 1).all() and (extra[:, 2:] > extra[:, :2]).all()
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in (random_box(f"x{i}", 1)[0] for i in range(300))]
    assert 0.2 < min(areas) and max(areas) <= 1.0 and np.std(areas) > 0.1  # spread over the documented range
    assert 0.3 < np.mean([random_box(f"x{i}", 1)[1] for i in range(300)]) < 0.7


def test_auto_views_fill_small_sets_only():
    assert auto_views(22) == AUTO_MAX and auto_views(AUTO_TARGET) == 0 and auto_views(5000) == 0
    assert (auto_views(100) + 1) * 100 >= AUTO_TARGET


def test_views_are_recorded_and_their_pixels_follow_the_schema(views_cache, photos24):
    store = open_cache(views_cache)
    meta, ids = store.meta, store.ids()
    assert meta.views == K and meta.n == 24 * (K + 1) and meta.schema_version == S.SCHEMA_VERSION
    view, box, flip = (store.read_all(n) for n in (S.VIEW, S.VIEW_BOX, S.VIEW_FLIP))
    split, labels = store.read_all(S.SPLIT), store.read_all(S.LABELS)
    for s in range(24):  # an image's views are neighbours and share its id, split and label
        rows = slice(s * (K + 1), (s + 1) * (K + 1))
        assert len(set(ids[rows])) == 1 and len(set(split[rows])) == 1 and len(set(labels[rows])) == 1
    images = store.read(S.IMAGES, 0, meta.n)
    for i in (0, 1, 2, 3, 9):  # centre crops as ever; views resampled over the recorded box (schema page)
        path = photos24 / ids[i]
        if view[i] == 0:
            expect = load_image(path, meta.preprocessing)
        else:
            im = Image.open(path).convert("RGB")
            w, h = im.size
            side = min(w, h)
            l, t, r, b = (float(c) * side for c in box[i])
            px = ((w - side) / 2 + l, (h - side) / 2 + t, (w - side) / 2 + r, (h - side) / 2 + b)
            out = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=px)
            expect = np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip[i] else out).transpose(2, 0, 1)
        assert np.array_equal(images[i], expect), f"sample {i} (view {view[i]})"
    model, _ = load_backbone("resnet50", "random:0")  # the features are the backbone's on each view
    ref = direct_forward(model.eval(), images[: K + 1], ["layer1"])["layer1"]
    np.testing.assert_allclose(store.read("features/layer1", 0, K + 1).astype(np.float32), ref, rtol=2e-2, atol=2e-2)
    store.close()


def test_only_centre_crops_are_scored_or_validated_and_no_view_of_them_is_trained(views_cache, tmp_path):
    store = open_cache(views_cache)
    ids, view = store.ids(), store.read_all(S.VIEW)
    holdout = split_indices(store, "holdout")
    assert len(holdout) and (view[holdout] == 0).all()
    held_ids = {ids[i] for i in holdout}
    train, val = validation_split(store, train_indices(store, False), 0.2)
    assert len(val) and (view[val] == 0).all()
    val_ids = {ids[i] for i in val}
    trained_ids = {ids[i] for i in train}
    assert not trained_ids & val_ids and not trained_ids & held_ids
    assert set(view[train].tolist()) == set(range(K + 1))  # every view of a trained image is trained on
    store.close()
    run = tmp_path / "runs" / "layer1"
    fit(TrainConfig(cache=views_cache, layers=("layer1",), out=run, epochs=1, width=16, progress=False,
                    arch="espcn", crop=32))
    rep = score(ScoreConfig(cache=views_cache, runs=tmp_path / "runs", out=tmp_path / "report", progress=False, save=2))
    assert rep["n"] == len(holdout) and rep["views"] == K and rep["originals"]["equal"] == len(holdout)
    assert "extra random-resized views" in (tmp_path / "report" / "report.md").read_text()


def test_a_rerun_with_other_views_is_refused(views_cache, photos24, tmp_path):
    with pytest.raises(FeatreconError, match="views"):
        build_cache(views_cache, photos24, views=K + 1, layers="layer1", holdout_fraction=0.25)


def test_bad_views_are_refused_in_one_line():
    from featrecon.extract.config import ExtractConfig
    from featrecon.extract.run import _check_config

    with pytest.raises(FeatreconError, match="--views -1"):
        _check_config(ExtractConfig(out="x.zarr", views=-1, weights="random:0"))
