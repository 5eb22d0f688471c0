"""Faults an unlucky user meets: each ends in one line naming the file and what to do, and
nothing already written is lost or silently wrong. One test per way of losing data."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featrecon.api import open_cache as api_open
from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.cli import extract_main, score_main, train_main, verify_main
from featrecon.errors import CorruptChunk, FeatreconError
from featrecon.evaluate.config import ScoreConfig
from featrecon.evaluate.scoring import score
from featrecon.extract.config import ExtractConfig
from featrecon.extract.run import extract
from featrecon.train import loop
from featrecon.train.checkpoint import atomic_save
from featrecon.train.config import TrainConfig
from featrecon.train.loop import fit
from tests.helpers import SIZE, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds any child process may take: a hang fails the test


def cfg(out: Path, images: Path, **kw) -> ExtractConfig:
    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=4, shard_size=4, progress=False, layers="layer1")
    base.update(kw)
    return ExtractConfig(out=out, images=images, **base)


def cli_args(out: Path, images: Path, *extra: str) -> list[str]:
    return ["--images", str(images), "--out", str(out), "--weights", "random:0", "--size", str(SIZE), "--workers", "0",
            "--batch-size", "1", "--shard-size", "4", "--layers", "layer1", "--views", "0", "--no-progress", *extra]


def child(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, **kw)


def assert_same_cache(a: Path, b: Path) -> None:
    """Every array of two caches equal (the one that went through a fault and a clean one)."""
    with open_cache(a) as x, open_cache(b) as y:
        assert x.ids() == y.ids()
        for name in [S.IMAGES, S.STATUS, S.LABELS, S.SPLIT, *(S.feature_path(l) for l in x.meta.layers)]:
            np.testing.assert_array_equal(x.read_all(name), y.read_all(name), err_msg=name)


def one_line(stderr: str, *words: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.startswith(("extract-features:", "train-decoder:", "score:",
                                                                       "featrecon verify:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("faults"), copies=2)  # 12 photos


@pytest.fixture(scope="module")
def clean(tmp_path_factory, images) -> dict[str, Path]:
    """Uninterrupted caches to compare with, made by the command line as the faults' reruns are."""
    out = {}
    for suffix in (".zarr", ".h5"):
        path = tmp_path_factory.mktemp("clean") / f"c{suffix}"
        assert extract_main(cli_args(path, images)) == 0
        out[suffix] = path
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clean) -> Path:
    """A decoder trained on the clean Zarr cache, for the commands that need one."""
    folder = tmp_path_factory.mktemp("runs")
    fit(TrainConfig(cache=clean[".zarr"], out=folder / "layer1", layers=("layer1",), epochs=1, batch_size=4,
                        width=32, progress=False, eval_samples=4))
    return folder


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_never_deletes_the_images_or_anything_featrecon_did_not_write(tmp_path, images, capsys):
    src = tmp_path / "photos"
    shutil.copytree(images, src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):  # --out is the --images folder, or holds it
        assert extract_main(cli_args(out, src, "--overwrite")) == 2
        one_line(capsys.readouterr().err, "--images folder", "elsewhere")
    assert sorted(p.name for p in src.iterdir()) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("three years of work")
    plain = tmp_path / "results.h5"
    plain.write_text("not even HDF5")
    group = tmp_path / "other.zarr"
    import zarr

    zarr.open_group(str(group), mode="w").create_array("x", shape=(2,), dtype="int8")
    for out in (foreign, plain, group):
        for extra in ((), ("--overwrite",)):
            assert extract_main(cli_args(out, src, *extra)) == 2
            err = one_line(capsys.readouterr().err, str(out), "choose another --out")
            assert "--overwrite" not in err  # never offered where it would delete someone else's files
    assert (foreign / "thesis.tex").read_text() == "three years of work" and plain.read_text() == "not even HDF5"
    assert (group / "x" / "zarr.json").is_file()
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert extract_main(cli_args(empty, src)) == 0  # an empty folder is fine
    assert extract_main(cli_args(empty, src, "--weights", "random:1", "--overwrite")) == 0  # ours: replaced
    with open_cache(empty) as store:
        assert store.meta.weights == "random:1" and (store.status() == S.STATUS_DONE).all()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".empty.zarr.") and not p.name.endswith(".lock")]


# ----------------------------------------------------------------------------- absence is damage


def _shard_file(cache: Path, layer: str, k: int) -> Path:
    return cache / S.feature_path(layer) / "c" / str(k) / "0" / "0" / "0"


def test_a_deleted_shard_is_damage_on_every_read_path_and_repair_restores_it(tmp_path, images, clean, capsys):
    cache = tmp_path / "c.zarr"
    shutil.copytree(clean[".zarr"], cache)
    _shard_file(cache, "layer1", 1).unlink()  # samples 4-7, all done
    with open_cache(cache) as store:
        with pytest.raises(CorruptChunk, match=r"features/layer1: sample 5: missing: its shard object"):
            store.read_rows(S.feature_path("layer1"), [5])
        with pytest.raises(CorruptChunk, match="missing"):
            store.read_all(S.feature_path("layer1"))
        np.testing.assert_array_equal(store.read_with_library(S.feature_path("layer1"), 4, 5), 0)  # zarr's own: zeros
    with api_open(cache) as c, pytest.raises(FeatreconError, match=r"sample 5 \(.+\).*missing.*verify .* --repair"):
        c.features("layer1", [5])
    assert train_main(["--cache", str(cache), "--layer", "layer1", "--epochs", "1", "--width", "32", "--out",
                       str(tmp_path / "run"), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "missing", "--repair")
    assert verify_main([str(cache), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert all(f"features/layer1: sample {i}" in out for i in range(4, 8)) and "shard object" in out, out
    assert verify_main([str(cache), "--no-progress", "--repair"]) == 0
    assert "marked 1 shard(s) pending (1)" in capsys.readouterr().out
    assert extract_main(cli_args(cache, images)) == 0  # the command that made it
    assert verify_main([str(cache), "--no-progress"]) == 0
    files = sorted(p.relative_to(clean[".zarr"]) for p in clean[".zarr"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert all((clean[".zarr"] / f).read_bytes() == (cache / f).read_bytes() for f in files)  # byte for byte


def test_a_deleted_chunk_of_a_small_array_stops_every_command_in_one_line(tmp_path, clean, runs, capsys):
    cache = tmp_path / "c.zarr"
    shutil.copytree(clean[".zarr"], cache)
    (cache / S.SPLIT / "c" / "0").unlink()  # zarr would read every sample back as train, without a word
    assert score_main(["--cache", str(cache), "--runs", str(runs), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "split/c/0 is missing", "extract-features", "--overwrite")
    assert verify_main([str(cache), "--no-progress", "--repair"]) == 1
    out = capsys.readouterr().out
    assert "split: array" in out and "write the cache again: extract-features" in out and "--repair, then" not in out


# ----------------------------------------------------------------------------- one writer


WRITER = """
    import sys, time
    from pathlib import Path
    from featrecon.cache.lock import WriterLock
    with WriterLock(sys.argv[1]):
        Path(sys.argv[2]).write_text("held")
        time.sleep(float(sys.argv[3]))
"""


def _hold(target: Path, flag: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(target), str(flag), str(seconds)],
                            env=env)
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), "the holder never took the lock"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, images, clean,
                                                                                       capsys, caplog):
    cache = tmp_path / "c.zarr"
    shutil.copytree(clean[".zarr"], cache)
    with open_cache(cache, "r+") as store:
        store.mark_pending(0, 4)
    holder = _hold(cache, tmp_path / "flag", 60)
    try:
        for argv in (cli_args(cache, images), cli_args(cache, images, "--weights", "random:1", "--overwrite")):
            assert extract_main(argv) == 2
            one_line(capsys.readouterr().err, "being written by another run", f"pid {holder.pid}", "since")
        assert verify_main([str(cache), "--repair", "--no-progress"]) == 2
        one_line(capsys.readouterr().err, "being written by another run")
        assert verify_main([str(cache), "--no-progress"]) == 0  # reading needs no lock
        capsys.readouterr()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(TIMEOUT)
    # The holder died holding the lock: the kernel released it, its record is left, and the next run takes over.
    assert extract_main(cli_args(cache, images)) == 0
    assert "taking over the writer lock of a run that ended without releasing it" in caplog.text
    assert_same_cache(cache, clean[".zarr"])


def test_two_extractions_started_together_give_one_good_cache(tmp_path, images, clean):
    out = tmp_path / "c.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "featrecon", "extract-features", *cli_args(out, images)]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(TIMEOUT), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 2]), results  # one after the other, or one refused
    for rc, err in results:
        if rc == 2:
            one_line(err, "being written by another run")
    assert_same_cache(out, clean[".zarr"])


# ----------------------------------------------------------------------------- HDF5 kills and full disks


KILL_AT = """
    import os, sys
    from featrecon.cache.h5_store import H5CacheStore
    from featrecon.cli import extract_main
    moment, after = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}
    real = getattr(H5CacheStore, moment)

    def killing(self, *a):
        real(self, *a)
        calls["n"] += 1
        if calls["n"] == after:
            os.kill(os.getpid(), 9)  # SIGKILL: no cleanup of any kind

    setattr(H5CacheStore, moment, killing)
    extract_main(sys.argv[3:])
"""


@pytest.mark.parametrize("moment", ["_write_arrays", "_write_status"])  # data written, or its shard marked done
def test_an_hdf5_cache_killed_mid_run_resumes_to_an_uninterrupted_cache(tmp_path, images, clean, moment):
    out = tmp_path / "c.h5"
    r = child(KILL_AT, moment, "2", *cli_args(out, images))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert extract_main(cli_args(out, images)) == 0
    assert_same_cache(out, clean[".h5"])


def test_an_old_hdf5_cache_left_open_for_writing_by_a_kill_is_cleared_and_resumes(tmp_path, images, clean, caplog):
    """Caches written with HDF5's newest format (featrecon up to 0.2) kept a flag a kill left set."""
    import h5py

    from featrecon.cache.h5_store import lookup3

    out = tmp_path / "old.h5"
    with h5py.File(clean[".h5"], "r") as src, h5py.File(out, "w", libver="latest") as dst:
        for name in src:
            src.copy(src[name], dst, name)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst[S.STATUS][8:] = S.STATUS_PENDING
    code = """
        import sys, os, h5py
        f = h5py.File(sys.argv[1], "r+", locking=False)
        f.flush()
        os.kill(os.getpid(), 9)
    """
    child(code, str(out))
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(out, "r", locking=False)
    head = out.read_bytes()[:48]
    assert lookup3(head[:44]) == int.from_bytes(head[44:], "little")  # our checksum is HDF5's
    assert extract_main(cli_args(out, images)) == 0
    assert "cleared the 'open for writing' mark" in caplog.text
    assert_same_cache(out, clean[".h5"])


def _done(path: Path) -> int:
    with open_cache(path) as store:
        return int((store.status() == S.STATUS_DONE).sum())


FULL_DISK = """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    from featrecon.cli import extract_main
    sys.exit(extract_main(sys.argv[2:]))
"""


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_a_full_disk_ends_in_one_line_and_the_rerun_equals_a_clean_cache(tmp_path, images, clean, suffix):
    from featrecon.cache.h5_store import RESERVE_MARGIN

    out = tmp_path / f"c{suffix}"
    shard = 4 * (3 * SIZE * SIZE + 64 * (SIZE // 4) ** 2 * 2)  # a shard's images and layer1, uncompressed
    # HDF5: room for about half the file, so it fills up mid-run; Zarr: a limit below one shard file's size
    size = RESERVE_MARGIN + shard + clean[".h5"].stat().st_size // 2 if suffix == ".h5" else 20_000
    r = child(FULL_DISK, str(size), *cli_args(out, images))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])  # never a segfault (139)
    one_line(r.stderr, str(out), "disk full", "rerun the same command")
    if suffix == ".h5":
        assert 0 < _done(out) < 12  # it stopped mid-run, with the finished shards kept
    assert extract_main(cli_args(out, images)) == 0
    assert_same_cache(out, clean[suffix])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_full_disk_or_a_kill_while_the_cache_is_created_leaves_nothing_half_made(tmp_path, images, clean, suffix,
                                                                                    monkeypatch):
    from featrecon.cache import factory as storage

    out = tmp_path / f"c{suffix}"
    real = storage._BACKENDS[suffix.strip(".").replace("h5", "hdf5")].create

    def failing(exc):
        def create(path, *a, **k):
            store = real(path, *a, **k)  # the files are all there ... and then the disk fills up, or a kill
            store.close()
            raise exc
        return create

    for exc in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        monkeypatch.setattr(storage._BACKENDS[suffix.strip(".").replace("h5", "hdf5")], "create", failing(exc))
        with pytest.raises((FeatreconError, KeyboardInterrupt)) as e:
            extract(cfg(out, images, views=0))
        if isinstance(exc, OSError):
            assert "disk full while creating the cache" in str(e.value)
        assert not out.exists()  # no half-made cache where the user looks
        monkeypatch.undo()
    extract(cfg(out, images, batch_size=1, views=0))
    assert_same_cache(out, clean[suffix])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".creating", ".replaced"))]


# ----------------------------------------------------------------------------- images


def test_high_bit_depth_images_are_scaled_not_clipped_and_link_loops_are_recorded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ramp = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * (65535 // (SIZE * SIZE - 1))).astype(np.uint16)
    Image.fromarray(ramp).save(src / "ramp16.png")  # PIL opens it as I;16
    Image.fromarray(np.full((SIZE, SIZE), 2.5, np.float32)).save(src / "float_out_of_range.tif")
    Image.fromarray(np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)).save(src / "float01.tif")
    os.symlink(src / "loop_b.jpg", src / "loop_a.jpg")
    os.symlink(src / "loop_a.jpg", src / "loop_b.jpg")
    os.symlink(src / "gone.jpg", src / "broken.jpg")
    res = extract(cfg(tmp_path / "c.zarr", src, size=SIZE, views=0))
    assert set(res.skipped) == {"loop_a.jpg", "loop_b.jpg", "broken.jpg", "float_out_of_range.tif"}
    assert "symbolic link loop" in res.skipped["loop_a.jpg"]
    assert "no known white level" in res.skipped["float_out_of_range.tif"]
    with open_cache(tmp_path / "c.zarr") as store:
        ids = store.ids()
        stored = store.read_rows(S.IMAGES, [ids.index("ramp16.png"), ids.index("float01.tif")])
    # The reference: the ramp rescaled to 8 bits by numpy, then torchvision's own resize and crop.
    import torchvision.transforms.functional as TF

    with open_cache(tmp_path / "c.zarr") as store:
        pre = store.meta.preprocessing
    grey = Image.fromarray(np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)).convert("RGB")
    expect = np.asarray(TF.center_crop(TF.resize(grey, pre.resize, antialias=True), [pre.crop, pre.crop]))
    np.testing.assert_array_equal(stored[0], expect.transpose(2, 0, 1))
    assert abs(float(stored[0].mean()) - 127.5) < 3  # not 254 (clipped to white)
    assert abs(float(stored[1].mean()) - 127.5) < 3  # a float image in [0, 1]


# ----------------------------------------------------------------------------- damaged metadata


@pytest.mark.parametrize("damage", ["not json", "unknown key"])
def test_damaged_root_metadata_is_one_line_in_every_command(tmp_path, images, clean, runs, damage, capsys):
    cache = tmp_path / "c.zarr"
    shutil.copytree(clean[".zarr"], cache)
    root = cache / "zarr.json"
    if damage == "not json":
        root.write_text(root.read_text()[:-40])
    else:
        doc = json.loads(root.read_text())
        doc["attributes"][S.META_ATTR]["colour"] = "blue"
        root.write_text(json.dumps(doc))
    commands = [(extract_main, cli_args(cache, images)),
                (train_main, ["--cache", str(cache), "--layer", "layer1", "--out", str(tmp_path / "r")]),
                (score_main, ["--cache", str(cache), "--runs", str(runs), "--out", str(tmp_path / "rep")]),
                (verify_main, [str(cache)])]
    if damage == "not json":  # featrecon cannot tell it wrote this folder: not even --overwrite deletes it
        commands.append((extract_main, cli_args(cache, images, "--overwrite")))
    for main, argv in commands:
        assert main([*argv, "--no-progress"]) == 2
        err = one_line(capsys.readouterr().err, str(root))
        assert ("not valid" in err or "is damaged" in err) if damage == "not json" else "unknown field(s) colour" in err, err
    assert root.exists()
    if damage == "unknown key":  # its metadata says it is a featrecon cache: --overwrite may replace it
        assert extract_main(cli_args(cache, images, "--overwrite")) == 0
        assert_same_cache(cache, clean[".zarr"])


# ----------------------------------------------------------------------------- checkpoints


def _train_cfg(cache, out, **kw):
    base = dict(layers=("layer1",), epochs=4, batch_size=4, width=32, lr=3e-3, progress=False, eval_samples=8)
    return TrainConfig(cache=cache, out=out, **{**base, **kw})


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_kill_between_checkpoint_writes_leaves_no_stale_best(tmp_path, clean, monkeypatch, caplog):
    cache = clean[".zarr"]
    whole = tmp_path / "whole"
    fit(_train_cfg(cache, whole))
    best = _weights(whole / "best.pt")
    e = best["epoch"]
    # The same run, killed right after best.pt of the best epoch was written (before last.pt) ...
    killed = tmp_path / "killed"
    real = atomic_save

    def save(obj, path):
        real(obj, path)
        if path.name == "best.pt" and obj["epoch"] == e:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "atomic_save", save)
    with pytest.raises(KeyboardInterrupt):
        fit(_train_cfg(cache, killed))
    monkeypatch.undo()
    fit(_train_cfg(cache, killed, resume=True))
    # ... and, the other way round, a best.pt left behind by a kill: lost, or an older epoch's.
    behind = whole
    (behind / "best.pt").unlink()
    for run in (killed, behind):
        got = score(ScoreConfig(cache=cache, runs=run.parent, checkpoints=(), out=tmp_path / f"rep-{run.name}",
                                progress=False))["runs"]
        mine = next(r for r in got if r["run"] == run.name)
        assert mine["epochs"] == e
    assert "using the best weights recorded in last.pt" in caplog.text
    fit(_train_cfg(cache, behind, resume=True, epochs=4))
    for run in (killed, behind):
        rebuilt = _weights(run / "best.pt")
        assert rebuilt["epoch"] == e
        assert [(r["epoch"], r["loss"], r["psnr"]) for r in rebuilt["history"]] == \
            [(r["epoch"], r["loss"], r["psnr"]) for r in best["history"]]
        for k, v in best["model"].items():
            assert torch.equal(rebuilt["model"][k], v), k


def test_an_old_run_with_a_stale_best_is_refused_not_scored(tmp_path, clean, capsys):
    cache = clean[".zarr"]
    run = tmp_path / "runs" / "layer1"
    fit(_train_cfg(cache, run, epochs=2))
    last = _weights(run / "last.pt")
    for key in ("best_epoch", "best_model"):  # as featrecon 0.2 wrote it
        last.pop(key)
    last["history"][0]["psnr"], last["history"][1]["psnr"] = 10.0, 20.0  # the best is epoch 2
    torch.save(last, run / "last.pt")
    best = _weights(run / "best.pt")
    best["epoch"] = 1
    torch.save(best, run / "best.pt")
    assert score_main(["--cache", str(cache), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                       "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "best.pt holds epoch 1", "--which last")


# ----------------------------------------------------------------------------- score's reads and writes


def test_score_writes_only_under_out_and_reads_only_inside_the_images_folder(tmp_path, images, clean, monkeypatch):
    from featrecon.evaluate.scoring import safe_name

    assert safe_name("..") == "run" and "/" not in safe_name("../../etc/x") and not safe_name("../x").startswith(".")
    cache = tmp_path / "c.zarr"
    shutil.copytree(clean[".zarr"], cache)
    fit(_train_cfg(cache, tmp_path / "run", epochs=1))
    (tmp_path / "run" / "inside").mkdir()
    monkeypatch.chdir(tmp_path / "run" / "inside")  # score --checkpoint ../last.pt --out report, from in there
    before = set(tmp_path.rglob("*"))
    assert score_main(["--cache", str(cache), "--checkpoint", "../last.pt", "--out", "report", "--split", "all",
                       "--no-progress"]) == 0
    out = tmp_path / "run" / "inside" / "report"
    made = set(tmp_path.rglob("*")) - before
    assert made and all(p == out or out in p.parents for p in made), sorted(map(str, made))
    assert (out / "run" / "original_0.png").is_file()
    # A cache whose ids leave the images folder (damaged, or made by someone else).
    secret = tmp_path / "secret.png"
    shutil.copy(images / sorted(os.listdir(images))[0], secret)
    import zarr

    g = zarr.open_group(str(cache), mode="r+")
    ids = S.decode_ids(g[S.IDS][:])
    ids[0], ids[1] = str(secret), "../secret.png"
    raw = S.encode_ids(ids)
    old = g[S.IDS]
    g.create_array(S.IDS, shape=raw.shape, dtype="uint8", chunks=raw.shape, compressors=old.compressors,
                   fill_value=0, dimension_names=old.metadata.dimension_names, overwrite=True)[:] = raw
    rep = score(ScoreConfig(cache=cache, checkpoints=(tmp_path / "run" / "last.pt",), out=tmp_path / "rep2",
                            images=images, split="all", progress=False))
    o = rep["originals"]
    assert o["refused"] == 2 and o["problems"][ids[0]].startswith("refused")
    assert o["equal"] == o["checked"] - 2
