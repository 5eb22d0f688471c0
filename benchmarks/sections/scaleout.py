"""Past one machine, measured on this one: extraction with K torchrun ranks against one
process, and the training loader reading a cache from an S3 server against reading the
same cache from disk.

    python -m benchmarks.sections.scaleout --images ../shared/data/imagenet-sample --n 96 --ranks 2

Both rows are side by side in one run. On a 2-core CPU two ranks cannot beat one process
(the one process already uses both cores for the forward); the point is the cost of the
coordination. The S3 server is moto, a Python server on the same cores as the reader: its
rate is a floor for the loader on a real object store, not an estimate of one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featrecon.cache import remote
from featrecon.cache.factory import open_cache
from featrecon.cache.loader import CacheLoader

from ..common import machine

log = logging.getLogger("benchmarks.sections.scaleout")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extract_cmd(ranks: int, images: Path, n: int, out: str, stats: Path, layers: str = "all") -> list[str]:
    args = ["extract-features", "--images", str(images), "--limit", str(n), "--out", out, "--weights", "random:0",
            "--layers", layers, "--views", "0", "--compile", "no", "--no-progress", "--device", "cpu", "--stats", str(stats)]
    if ranks == 1:
        return [sys.executable, "-m", "featrecon", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "featrecon", *args]


def bench_extraction(images: Path, n: int, ranks: int, work: Path, env: dict) -> dict:
    """Wall time of the whole command (launch, model load, extraction) and the steady rate."""
    rows = {}
    for k in (1, ranks):
        out, stats = work / f"x{k}.zarr", work / f"x{k}.json"
        threads = str(max(1, (os.cpu_count() or 1) // k))  # the cores shared out between the ranks
        t0 = time.perf_counter()
        subprocess.run(_extract_cmd(k, images, n, str(out), stats), check=True, capture_output=True,
                       env={**env, "OMP_NUM_THREADS": threads, "GLOO_SOCKET_IFNAME": "lo"})
        wall = time.perf_counter() - t0
        records = json.loads(stats.read_text())
        records = records if isinstance(records, list) else [records]
        loop = max(r["seconds"] for r in records)  # the slowest rank ends the job
        rows[k] = {"ranks": k, "threads_per_rank": int(threads), "wall_seconds": wall, "loop_seconds": loop,
                   "images_per_s": n / loop, "per_rank_images": [r["processed"] for r in records]}
        shutil.rmtree(out, ignore_errors=True)
    rows["ratio"] = rows[ranks]["images_per_s"] / rows[1]["images_per_s"]
    return rows


def _epoch_rate(path, layers, threads: int | None, rounds: int = 3) -> float:
    with open_cache(path) as store:
        idx = np.flatnonzero(store.status() == 1)
    best = 0.0
    for r in range(rounds):
        loader = CacheLoader(path, layers, idx, 32, seed=r, in_memory=False, threads=threads, reuse_buffers=True)
        t0 = time.perf_counter()
        n = sum(len(b.indices) for b in loader.epoch(0))
        best = max(best, n / (time.perf_counter() - t0))
        loader.close()
    return best


def bench_s3_loader(images: Path, n: int, work: Path, env: dict) -> dict:
    """Loader samples/s (layer3 and the images, as training reads them) from a moto S3
    server on 127.0.0.1 against the same cache on the local disk."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        local = work / "l.zarr"
        subprocess.run(_extract_cmd(1, images, n, str(local), work / "l.json", "layer3"), check=True,
                       capture_output=True, env=env)
        fs, _ = remote.filesystem("s3://bench")
        fs.put(str(local), "bench/l.zarr", recursive=True)
        url = "s3://bench/l.zarr"
        out = {"samples": int(n), "layers": ["layer3"]}
        out["disk_samples_per_s"] = _epoch_rate(local, ("layer3",), None)
        out["s3_samples_per_s"] = _epoch_rate(url, ("layer3",), None)
        out["s3_samples_per_s_2_threads"] = _epoch_rate(url, ("layer3",), 2)
        out["ratio"] = out["s3_samples_per_s"] / out["disk_samples_per_s"]
        return out
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--n", type=int, default=96, help="images extracted")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    work = Path(tempfile.mkdtemp(prefix="featrecon-scaleout-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        command = "python -m benchmarks.sections.scaleout " + " ".join(argv if argv is not None else sys.argv[1:])
        result = {"command": command,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(torch.device("cpu")),
                  "extraction": bench_extraction(args.images.resolve(), args.n, args.ranks, work, env),
                  "s3_loader": bench_s3_loader(args.images.resolve(), args.n, work, env)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout.json").write_text(json.dumps(result, indent=2) + "\n")
    e, s = result["extraction"], result["s3_loader"]
    print(f"| extraction, {args.n} images, all layers | 1 process: {e[1]['images_per_s']:.1f} img/s | "
          f"{args.ranks} ranks: {e[args.ranks]['images_per_s']:.1f} img/s (per rank {e[args.ranks]['per_rank_images']}) | "
          f"ratio {e['ratio']:.2f} |")
    print(f"| loader, layer3 + images | disk: {s['disk_samples_per_s']:.0f} samples/s | moto S3: "
          f"{s['s3_samples_per_s']:.0f} samples/s (32 reads in flight), {s['s3_samples_per_s_2_threads']:.0f} with 2 | "
          f"ratio {s['ratio']:.2f} |")
    return result


if __name__ == "__main__":
    main()
