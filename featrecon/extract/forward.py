"""The extraction's forward engines: the backbone's outputs cast to the stored dtype with
their float16 overflow counted, eagerly, through torch.compile on a CPU, or replayed as
CUDA graphs with the copy to pinned host memory on a side stream."""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch

from ..cache import schema as S
from .backbone import FeatureExtractor

log = logging.getLogger(__name__)


def to_storage(features: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cast to the stored dtype, count per-sample float16 overflow, as numpy (CPU tensors)."""
    return _to_numpy(_cast_with_range(features, dtype))


def _stored(v: torch.Tensor, dtype: str) -> torch.Tensor:
    """A layer's activations as stored: the cache's dtype, NCHW."""
    return v.to(torch.float16 if dtype == "float16" else torch.float32).contiguous()


def _overflow_counts(h: torch.Tensor) -> torch.Tensor:
    """Per sample, the values stored as +-inf in the float16 `h`: those beyond float16's range
    (|x| >= 65520, which does not round to 65504), or an inf the float32 forward already had."""
    return torch.isinf(h).flatten(1).sum(1)


def _cast_with_range(features: dict[str, torch.Tensor], dtype: str) -> dict[str, tuple]:
    """Each layer in the stored dtype (NCHW) with, for float16, its largest and smallest value:
    two reductions over the float16 result cost less than counting infinities in every sample
    or reducing the float32 activations (benchmarks/DESIGN.md)."""
    out = {}
    for layer, v in features.items():
        h = _stored(v, dtype)
        out[layer] = (h, h.amax(), h.amin()) if dtype == "float16" else (h, None, None)
    return out


def _to_numpy(cast: dict[str, tuple], n: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The first `n` samples of `_cast_with_range`'s CPU tensors as numpy arrays, and per-sample
    overflow counts of the layers whose range reached an infinity (or a NaN, which fails both
    comparisons: it takes the exact count, which leaves it out)."""
    arrays, overflow = {}, {}
    for layer, (h, hi, lo) in cast.items():
        h = h[:n]
        if hi is not None and not (hi < math.inf and lo > -math.inf):
            overflow[layer] = _overflow_counts(h).numpy()
        arrays[S.feature_path(layer)] = h.numpy()  # (B, C, H, W)
    return arrays, overflow


def _on_device(features: dict[str, torch.Tensor], dtype: str) -> dict[str, tuple]:
    """Each layer cast to the stored dtype (NCHW) and its per-sample float16 overflow count."""
    out = {}
    for layer, v in features.items():
        h = _stored(v, dtype)
        out[layer] = (h, _overflow_counts(h) if dtype == "float16" else None)
    return out


def _copy_to_host(on_device: dict[str, tuple], stream: torch.cuda.Stream, owned: bool):
    """Copy into pinned host memory on `stream`, which overlaps the next batch's forward.
    Returns the host arrays, the overflow counts and the event after which both hold
    their values. `owned`: the device tensors are ordinary allocations that the caller
    drops (not a graph's outputs), to be kept alive until the copy has read them.

    Pinned memory matters: a copy into ordinary (pageable) memory ran some forty times
    slower (benchmarks/DESIGN.md). The pinned blocks come from PyTorch's
    caching host allocator and are reused once the writer drops its views of them."""
    stream.wait_stream(torch.cuda.current_stream())
    arrays, counts = {}, {}
    with torch.cuda.stream(stream):
        for layer, (h, n_over) in on_device.items():
            for t, into, key in ((h, arrays, S.feature_path(layer)), (n_over, counts, layer)):
                if t is None:
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                if owned:
                    t.record_stream(stream)
                into[key] = host.numpy()
        ready = torch.cuda.Event()
        ready.record(stream)
    return arrays, counts, ready


def to_host_async(features: dict[str, torch.Tensor], dtype: str, stream: torch.cuda.Stream):
    """`to_storage` for a GPU, without waiting for it: cast and count on the GPU, then copy
    to pinned host memory on a side stream. The arrays are valid once the event completes."""
    return _copy_to_host(_on_device(features, dtype), stream, owned=True)


class GpuForward:
    """The forward, the cast to the stored dtype and the overflow count of a full batch,
    replayed as one CUDA graph. Launching a ResNet-50 forward from Python takes hundreds of
    small launches, each needing the GIL, which the writer's and compression threads also
    hold; on a 16-core GPU machine the launches, not the GPU, set the pace. A replay is one
    launch. Two graphs take turns, so one batch's outputs are copied out while the next
    batch runs into the other's. Batches of another size (the last one) run eagerly.
    If capture fails, everything runs eagerly, with a warning."""

    def __init__(self, extractor: FeatureExtractor, dtype: str, batch: int, size: int, device: torch.device,
                 graphs: int = 2):
        self.extractor, self.dtype, self.device = extractor, dtype, device
        self.copy_stream = torch.cuda.Stream(device)
        self.slots: list[dict] = []
        extractor.autocast_cache = False
        try:
            with torch.inference_mode():
                self.slots = [self._capture(batch, size) for _ in range(graphs)]
        except RuntimeError as e:
            log.warning("CUDA graph capture failed (%s); the forward runs eagerly", str(e).splitlines()[0])
            self.slots = []
        self.turn = 0

    def _capture(self, batch: int, size: int) -> dict:
        x = torch.zeros((batch, 3, size, size), dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN picks its algorithms
            for _ in range(2):
                _on_device(self.extractor(x), self.dtype)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _on_device(self.extractor(x), self.dtype)
        return {"graph": graph, "input": x, "output": out, "copied": None}

    def __call__(self, images: torch.Tensor):
        with torch.inference_mode():
            if self.slots and len(images) == len(self.slots[0]["input"]):
                slot = self.slots[self.turn]
                self.turn = (self.turn + 1) % len(self.slots)
                if slot["copied"] is not None:  # its outputs from two batches ago have been copied out
                    torch.cuda.current_stream().wait_event(slot["copied"])
                slot["input"].copy_(images, non_blocking=True)
                slot["graph"].replay()
                arrays, counts, ready = _copy_to_host(slot["output"], self.copy_stream, owned=False)
                slot["copied"] = ready
                return arrays, counts, ready
            feats = self.extractor(images.to(self.device, non_blocking=True))
            return to_host_async(feats, self.dtype, self.copy_stream)


class CompiledForward:
    """On a CPU: the forward, the cast to the stored dtype and the overflow count as one
    function compiled by torch.compile (inductor, with the weights frozen in as constants).

    Inductor fuses the elementwise work around the convolutions (the residual adds, the
    ReLUs, the normalisation of the input, the float16 cast, the layout change to NCHW
    and the range check) into the kernels that produce it: extraction ran faster with the
    same bytes as the eager forward (benchmarks/DESIGN.md). Compiling takes seconds, once
    per process (inductor also caches its work on disk).

    Every batch runs at the one batch size it was compiled for: a shorter last batch is
    padded with zeros and its outputs cut back, so nothing is compiled twice. If the
    compile fails (no C++ compiler, an unsupported platform), everything runs eagerly,
    with a warning."""

    def __init__(self, extractor: FeatureExtractor, dtype: str, batch: int, size: int):
        self.extractor, self.dtype, self.batch = extractor, dtype, batch

        def stored(images: torch.Tensor) -> dict[str, tuple]:
            return _cast_with_range(extractor.features(images), dtype)

        t0 = time.perf_counter()
        # Without CUDA, torch's C++ toolchain module warns about CUDA_HOME on every compile.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            # emulate_precision_casts: round where the eager code rounds. Without it inductor keeps
            # the float32 value inside a fused kernel, and isinf() of the float16 cast never fires
            # (a test caught the overflow count at 0); with autocast it would also differ from eager.
            self.fn = torch.compile(stored, options={"freezing": True, "emulate_precision_casts": True}, dynamic=False)
            x = torch.zeros((batch, 3, size, size), dtype=torch.uint8)  # made outside inference mode, as the
            with torch.inference_mode(), warnings.catch_warnings():  # loader's batches are: an inference
                # tensor would compile again. With --autocast bf16 inductor notes that a kernel mixes
                # bfloat16 and float16 (the cast for storage), which is what is asked for.
                warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
                self.fn(x)
        except Exception as e:  # inductor raises many types; any of them means: run eagerly
            log.warning("torch.compile failed (%s: %s); the forward runs eagerly", type(e).__name__,
                        (str(e).strip().splitlines() or [""])[0][:200])
            self.fn = None
        self.compile_seconds = time.perf_counter() - t0

    def __call__(self, images: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if self.fn is None:
            return to_storage(self.extractor(images), self.dtype)
        n = len(images)
        if n < self.batch:
            images = torch.cat([images, images.new_zeros((self.batch - n, *images.shape[1:]))])
        with torch.inference_mode():
            return _to_numpy(self.fn(images), n)
