"""Which device a stage runs on."""

from __future__ import annotations

import torch

from .errors import FeatreconError


def resolve_device(spec: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else as torch spells it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FeatreconError(f"--device {spec!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatreconError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return dev
