"""bfloat16 on a CPU: whether the hardware computes it, and a warning where it does not.

On CPUs with ``avx512_bf16`` or AMX tiles, oneDNN runs a bf16-autocast training step of the
book's networks in about half (WGAN-GP) to two thirds (U-Net) of its float32 time; elsewhere
bfloat16 is emulated and may be slower than float32.
"""
from __future__ import annotations

import warnings

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (``avx512_bf16`` or AMX tiles). Uses
    ``torch.cpu``'s private probes; a torch without them counts as no."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def warn_if_emulated_bf16(device: str, precision: str) -> None:
    """Warn when ``precision`` asks for bf16 on a CPU (``device`` ``"cpu"``, or ``"auto"`` without
    a GPU) that lacks hardware bfloat16."""
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and str(precision).startswith("bf16") and not cpu_has_native_bf16():
        warnings.warn(f"precision={precision!r} on a CPU without avx512_bf16 or AMX: bfloat16 is emulated there "
                      "and may train slower than precision='32-true'", stacklevel=3)
