"""The benchmark's smoke mode runs end to end; it asserts nothing about speed."""

import json

import pytest


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_every_section(tmp_path, photo_dir):
    from benchmarks.run import main

    main(["--images", str(photo_dir), "--out", str(tmp_path / "res"), "--quick", "--device", "cpu",
              "--workers", "0", "--work", str(tmp_path)])
    saved = json.loads((tmp_path / "res" / "latest.json").read_text())
    assert saved["extraction"].keys() == {"all", "layer3"}
    assert {row["codec"] for row in saved["storage"]} == {"none", "zstd:1", "zstd:3", "zstd:-3", "lz4:5", "blosc-zstd:5"}
    assert {row["format"] for row in saved["storage"]} == {"zarr", "hdf5"}
    for v in saved["extraction"].values():
        assert v["ratio"] > 0 and v["images"] == 6
    for layer in ("layer1", "layer3"):
        assert saved["loader"][layer]["codec_limit"] > 0 and saved["loader"][layer]["loader_1_thread"] > 0
    codecs = {"zstd:3", "zstd:1", "zstd:-1", "zstd:-3", "zstd:-7", "lz4:5", "none"}
    assert {row["codec"] for row in saved["codecs"]} == codecs
    assert all(row["write_MB_s"] > 0 for row in saved["codecs"])
    for layer in ("layer1", "layer3"):
        v = saved["loader"][layer]
        assert v["npy_dataloader"] > 0 and v["ratio_to_npy"] > 0
        assert set(v["shuffle_to_uniform"]) == {"global", "window", "npy"}
    assert [row["model"] for row in saved["models"]] == ["resnet18", "vit_b_16"]
    assert all(r["ratio"] > 0 for r in saved["models"])
    assert saved["training"]["speedup"] > 0 and saved["training"]["ratio_to_limit"] > 0
    assert (tmp_path / "res" / "latest.png").is_file() and "## 5." in (tmp_path / "res" / "latest.md").read_text()


def test_the_quality_benchmark_costs_every_loss_as_fit_trains_it(zarr_cache, tmp_path):
    """mse+feat needs the frozen backbone in its step: the budget's timing builds it as fit does."""
    from benchmarks.quality import epoch_cost
    from featrecon.train.config import TrainConfig

    for loss in ("mse", "mse+feat"):
        cfg = TrainConfig(cache=zarr_cache, out=tmp_path / loss, layers=("layer3",), loss=loss, width=16, batch_size=4,
                          progress=False, eval_samples=4)
        rate, val_seconds, n = epoch_cost(cfg, batches=2)
        assert rate > 0 and val_seconds >= 0 and n > 0


def test_the_precision_benchmark_times_both_precisions_on_the_training_loop(zarr_cache, tmp_path, capsys):
    from benchmarks.precision import main

    main(["--cache", str(zarr_cache), "--layers", "layer3", "--rounds", "2", "--json", str(tmp_path / "p.json")])
    (res,) = json.loads((tmp_path / "p.json").read_text())
    assert res["layer"] == "layer3" and [len(res["runs"][p]) for p in ("fp32", "bf16")] == [2, 2]
    assert all(r["samples_s"] > 0 and r["validation_s"] >= 0 for p in ("fp32", "bf16") for r in res["runs"][p])
    assert res["train_speedup"] > 0 and "| layer3 |" in capsys.readouterr().out
