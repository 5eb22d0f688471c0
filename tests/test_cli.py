"""Every bad argument of every command: one line on stderr, exit 2, before any slow work."""

from __future__ import annotations

import pytest

from featrecon import cli


@pytest.fixture
def no_slow_work(monkeypatch):
    """Weights, images, caches and checkpoints must not be touched before the arguments are checked."""
    import featrecon.evaluate.scoring as E
    import featrecon.extract.run as X
    import featrecon.train.loop as T

    def touched(*a, **k):
        raise AssertionError("slow work started before the arguments were checked")

    for module, name in ((X, "load_backbone"), (X, "discover_images"), (X, "open_or_create"),
                         (T, "CacheLoader"), (T, "Decoder"), (E, "find_checkpoints"), (E, "open_cache")):
        monkeypatch.setattr(module, name, touched)


EXTRACT = [
    (["--images", "{tmp}/nope"], "--images {tmp}/nope: folder does not exist"),
    (["--layers", "layer9"], "--layers: unknown layer 'layer9'"),
    (["--layers", ","], "--layers is empty"),
    (["--out", "{tmp}/file/c.zarr"], "--out {tmp}/file/c.zarr: cannot be created"),
    (["--format", "parquet"], "argument --format: invalid choice: 'parquet'"),
    (["--weights", "IMAGENET_V9"], "--weights 'IMAGENET_V9': not a known name nor an existing file"),
    (["--weights", "random:x"], "the seed after 'random:' must be a non-negative integer"),
    (["--size", "16"], "--size 16: must be at least 32"),
    (["--size", "big"], "argument --size: invalid int value: 'big'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--codec", "gzip"], "--codec 'gzip': unknown codec"),
    (["--codec", "zstd:99"], "level must be between -131072 and 22"),
    (["--batch-size", "0"], "--batch-size and --shard-size must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be 0"),
    (["--autocast", "fp8"], "argument --autocast: invalid choice: 'fp8'"),
    (["--compile", "maybe"], "argument --compile: invalid choice: 'maybe'"),
    (["--holdout-fraction", "1.5"], "--holdout-fraction 1.5: must be in [0, 1)"),
    (["--labels", "{tmp}/none.csv"], "--labels {tmp}/none.csv: file not found"),
    (["--class-map", "{tmp}/none.txt"], "--class-map {tmp}/none.txt: file not found"),
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--shard-size", "0"], "--batch-size and --shard-size must be at least 1"),
    (["--device", "tpu"], "--device 'tpu': not a device"),
]
TRAIN = [
    (["--cache", "{tmp}/none.zarr", "--layer", "layer3"], "{tmp}/none.zarr: no cache here"),
    (["--layer", ","], "--layer is empty"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be 0 or more"),
    (["--warmup", "1.5"], "--warmup 1.5: must be in [0, 1)"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be auto, 0 (off) or a positive number"),
    (["--width", "4"], "--width 4: must be auto or at least 8"),
    (["--res-scale", "0"], "--res-scale 0.0: must be auto or in (0, 1]"),
    (["--depth", "-1"], "--depth -1: must be 0 or more"),
    (["--loss", "huber"], "argument --loss: invalid choice: 'huber'"),
    (["--eval-samples", "0"], "--eval-samples 0: must be at least 1"),
    (["--prefetch", "0"], "--prefetch 0: must be at least 1"),
    (["--read-threads", "0"], "--read-threads 0: must be at least 1"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--compile", "maybe"], "argument --compile: invalid choice: 'maybe'"),
    (["--in-memory", "maybe"], "argument --in-memory: invalid choice: 'maybe'"),
    (["--device", "tpu"], "--device 'tpu': not a device"),
]
SCORE = [
    (["--split", "test"], "argument --split: invalid choice: 'test'"),
    (["--which", "first"], "argument --which: invalid choice: 'first'"),
    (["--save", "-1"], "--save -1: must be 0 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--images", "{tmp}/nope"], "--images {tmp}/nope: folder not found"),
    (["--device", "tpu"], "--device 'tpu': not a device"),
]
VERIFY = [
    (["{tmp}/none.zarr"], "{tmp}/none.zarr: no cache here"),
    (["{tmp}/file", "--threads", "0"], "--threads 0: must be at least 1"),
]


@pytest.mark.parametrize("command,argv,message", [("extract", a, m) for a, m in EXTRACT]
                         + [("train", a, m) for a, m in TRAIN] + [("score", a, m) for a, m in SCORE]
                         + [("verify", a, m) for a, m in VERIFY])
def test_every_bad_argument_is_one_line_before_any_work(command, argv, message, zarr_cache, tmp_path, capsys,
                                                         no_slow_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if command == "train":
        argv = (["--layer", "layer3"] if "--layer" not in argv else []) + argv
        main = cli.train_main
    else:
        main = {"extract": cli.extract_main, "score": cli.score_main, "verify": cli.verify_main}[command]
    if command == "train" and "--cache" not in argv:
        argv += ["--cache", str(zarr_cache)]  # a real cache, so each check is reached with everything else valid
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "\n" not in err, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err

