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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX
    (oneDNN's bf16 convolutions). Without either, bf16 on a CPU is emulated and slower than fp32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    # torch.cpu's probes are private; a torch without them reads as "no" (fp32, the safe default).
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p is not None and p() for p in probes)


def bf16_autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` where `enabled`, else a context that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
