"""What the tests share besides fixtures: small real images, a cache built the way the
command builds it, a reference forward without featrecon, and processes under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from featrecon.extract.images import sample_images_root

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")


SIZE = 64  # crop size used by the tests: every layer still has a spatial extent (layer4 2x2)


def make_image_folder(root: Path, copies: int = 1) -> Path:
    """Real photos in several modes and formats, `copies` times each under distinct names."""
    src = sample_images_root()
    root.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for name in PHOTOS:
            shutil.copy(src / name, root / f"{c:02d}_{name}")
    return root


def direct_forward(model, images_uint8: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """Reference features straight from torchvision's modules, fp32, no featrecon code."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images_uint8).float() / 255 - mean) / std
    out = {}
    with torch.no_grad():
        x = model.relu(model.bn1(model.conv1(x)))
        out["stem"] = x.clone()
        x = model.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(x)
            out[name] = x.clone()
    return {k: out[k].numpy() for k in layers}


def build_cache(out: Path, images: Path, **kw) -> Path:
    from featrecon.extract.config import ExtractConfig
    from featrecon.extract.run import extract

    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=8, shard_size=4, progress=False, layers="all",
                views=0)
    base.update(kw)
    extract(ExtractConfig(out=out, images=images, **base))
    return out


# ----------------------------------------------------------------------------- several processes


LAUNCH_TIMEOUT = 300  # seconds for one torchrun job; a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(nproc: int, args, env: dict | None = None) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "featrecon", *args]
    return cmd, _env(env)


def _env(extra: dict | None = None) -> dict:
    """One thread per process, gloo on the loopback device, a short wait limit."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "FEATRECON_DIST_TIMEOUT": "60",
            **(extra or {})}


def torchrun(nproc: int, *args: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT, env: dict | None = None):
    """`torchrun --nproc-per-node=N -m featrecon ARGS` on 127.0.0.1; the completed process."""
    cmd, run_env = _command(nproc, args, env)
    return subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout)


def torchrun_background(nproc: int, *args: str, cwd: Path) -> subprocess.Popen:
    cmd, env = _command(nproc, args)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def one_process_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m featrecon ARGS` with one thread, as each torchrun rank has here: oneDNN's
    float32 sums depend on how a convolution is split between threads, so byte equality
    holds between runs with the same threads per process."""
    return subprocess.run([sys.executable, "-m", "featrecon", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_cache(a: Path, b: Path, skipped: bool = True) -> None:
    """Every array, record and status chunk byte for byte; the root attributes but the creation time."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    different = [name for name in fa if name != "zarr.json" and fa[name] != fb[name]]
    assert not different, different[:10]
    ra, rb = (json.loads(f["zarr.json"])["attributes"] for f in (fa, fb))
    for r in (ra, rb):
        r["featrecon"].pop("created")
    assert ra == rb
    if skipped:
        assert ra["skipped"] and list(ra["skipped"]) == ["zz_broken.jpg"]
