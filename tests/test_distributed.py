"""Several processes under torchrun (gloo on this CPU, 127.0.0.1 only, bounded by timeouts):
data-parallel training equals one process with the same global batch."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featrecon.cache.factory import open_cache
from featrecon.train.config import TrainConfig
from featrecon.train.loop import fit
from featrecon.train.samples import train_indices, validation_split
from tests.helpers import (
    LAUNCH_TIMEOUT,
    assert_same_cache,
    make_image_folder,
    one_process_run,
    torchrun,
    torchrun_background,
)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_ddp_training_equals_one_process_with_the_same_global_batch(zarr_cache, tmp_path):
    with open_cache(zarr_cache) as store:
        train, _ = validation_split(store, train_indices(store, False), 0.2)
    per_rank = max(b for b in (1, 2, 3, 4) if len(train) % (2 * b) == 0)  # whole global batches: same steps
    common = ["--cache", str(zarr_cache), "--layer", "layer2", "--arch", "espcn", "--width", "16", "--epochs", "2",
              "--crop", "32", "--val-fraction", "0.2", "--no-progress", "--device", "cpu",
              "--precision", "fp32"]  # in bf16 a half batch rounds its weight gradients otherwise: not comparable at 1e-4
    done = torchrun(2, "train-decoder", *common, "--batch-size", str(per_rank), "--out", "ddp", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights identical on all 2 ranks" in done.stderr
    fit(TrainConfig(cache=zarr_cache, layers=("layer2",), out=tmp_path / "one", epochs=2, batch_size=2 * per_rank,
                        arch="espcn", width=16, crop=32, val_fraction=0.2, progress=False, device="cpu", precision="fp32"))
    ddp, one = _state(tmp_path / "ddp" / "last.pt"), _state(tmp_path / "one" / "last.pt")
    assert ddp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=2e-5, msg=k)
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    steps = [int(l.split('"epoch": ')[1].split(",")[0]) for l in rows]
    assert steps == [1, 2]  # rank 0 alone wrote the metrics, once per epoch


def test_a_killed_ddp_run_resumes_in_one_process_at_the_same_point_of_the_schedule(zarr_cache, tmp_path):
    common = ["--cache", str(zarr_cache), "--layer", "layer1", "--arch", "espcn", "--width", "16", "--epochs", "30",
              "--batch-size", "1", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]
    job = torchrun_background(2, "train-decoder", *common, cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.2)
    finally:
        job.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun stops both ranks, mid-run
        job.communicate(timeout=60)
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 1 <= first["epoch"] < 30
    from featrecon.cli import train_main

    assert train_main([*common, "--resume"]) == 0
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epoch"] == 30 and last["history"][: first["epoch"]] == first["history"]
    assert last["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine schedule ran to its end
    assert np.isfinite(last["history"][-1]["psnr"])


# ----------------------------------------------------------------------------- extraction

EXTRACT = ["--weights", "random:0", "--layers", "all", "--shard-size", "4", "--batch-size", "1", "--workers", "0",
           "--views", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def thirty_one(tmp_path_factory) -> Path:
    """30 real photos and one unreadable file: 8 shards of 4, the last one short, one record."""
    root = make_image_folder(tmp_path_factory.mktemp("x31"), copies=5)
    (root / "zz_broken.jpg").write_text("not an image\n")
    return root




@pytest.fixture(scope="module")
def one_process(thirty_one, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "c.zarr"
    done = one_process_run("extract-features", "--images", str(thirty_one), "--out", str(out), *EXTRACT, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return out






def test_torchrun_extraction_writes_one_cache_equal_to_one_process(thirty_one, one_process, tmp_path):
    done = torchrun(2, "extract-features", "--images", str(thirty_one), "--out", "c.zarr", "--stats", "stats.json",
                    *EXTRACT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_cache(tmp_path / "c.zarr", one_process)
    ranks = json.loads((tmp_path / "stats.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert sorted(ranks[0]["shards"] + ranks[1]["shards"]) == list(range(8))  # each shard written by one rank
    assert ranks[0]["processed"] + ranks[1]["processed"] == 31 and min(r["processed"] for r in ranks) >= 12


def test_a_killed_torchrun_extraction_rerun_with_another_world_size_gives_the_same_bytes(thirty_one, one_process,
                                                                                          tmp_path):
    args = ["extract-features", "--images", str(thirty_one), "--out", str(tmp_path / "c.zarr"), *EXTRACT]
    job = torchrun_background(2, *args, cwd=tmp_path)
    status = tmp_path / "c.zarr" / "status" / "c"
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (status.is_dir() and any(status.iterdir())):  # a first shard is done
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.02)
    finally:
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=60)
    with open_cache(tmp_path / "c.zarr") as store:
        left = int((store.status() == 0).sum())
    assert left > 0, "the job finished before it was stopped"
    done = one_process_run(*args, cwd=tmp_path)  # one process finishes what two began
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_cache(tmp_path / "c.zarr", one_process)


def test_several_processes_refuse_an_hdf5_cache(thirty_one, tmp_path):
    done = torchrun(2, "extract-features", "--images", str(thirty_one), "--out", "c.h5", *EXTRACT, cwd=tmp_path)
    assert done.returncode != 0 and "several processes write only Zarr caches" in done.stderr
