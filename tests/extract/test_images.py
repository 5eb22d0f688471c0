"""Labels joined right (devkit order is not torchvision's), split stable, discovery."""

from __future__ import annotations

import pytest

from featrecon.errors import FeatreconError
from featrecon.extract.images import discover_images, imagenet_wnids, labels_for
from tests.helpers import SHARED

ILSVRC = SHARED / "ilsvrc2012"


@pytest.mark.skipif(not ILSVRC.is_dir(), reason="../shared/data/ilsvrc2012 not present")
def test_devkit_ground_truth_joins_to_torchvision_indices():
    ids = ["val/ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000003.JPEG",
           "ILSVRC2012_val_00050000.JPEG", "other.jpg"]
    labels, source = labels_for(ids, ILSVRC / "ILSVRC2012_validation_ground_truth.txt")
    # Known: image 1 is a sea snake (65), 2 an alp (970), 3 a Shetland sheepdog (230);
    # their devkit ids are 490, 361, 171, which are NOT torchvision indices.
    assert labels[:3].tolist() == [65, 970, 230]
    assert 0 <= labels[3] < 1000 and labels[4] == -1 and source == "ilsvrc2012-devkit"
    with pytest.raises(FeatreconError, match="--class-map"):
        labels_for(ids, ILSVRC / "ILSVRC2012_validation_ground_truth.txt", ILSVRC / "nope.txt")


def test_wnid_folder_filename_and_csv_labels(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids == sorted(wnids)
    ids = ["n01440764/a.jpg", "n01443537_goldfish.JPEG", "x/plain.png"]
    labels, source = labels_for(ids)
    assert labels.tolist() == [0, 1, -1] and source == "wnid-filename+wnid-folder"
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nn01440764/a.jpg,7\nplain.png,n01443537\n")
    labels, source = labels_for(ids, csv)
    assert labels.tolist() == [7, -1, 1] and source == "csv"


@pytest.mark.skipif(not (SHARED / "imagenet-sample").is_dir(), reason="../shared/data/imagenet-sample not present")
def test_imagenet_sample_file_names_label_themselves():
    ids = discover_images(SHARED / "imagenet-sample", limit=20)
    labels, _ = labels_for(ids)
    wnids = imagenet_wnids()
    assert all(labels[i] == wnids.index(ids[i][:9]) for i in range(len(ids)))


def test_discovery_is_recursive_sorted_and_case_insensitive(tmp_path):
    for p in ["b/x.JPEG", "a.png", "c/d/e.WebP", "skip.txt", "z.TIF"]:
        f = tmp_path / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    assert discover_images(tmp_path) == ["a.png", "b/x.JPEG", "c/d/e.WebP", "z.TIF"]
    assert discover_images(tmp_path, limit=2) == ["a.png", "b/x.JPEG"]
