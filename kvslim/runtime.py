"""Device and dtype names shared by every command: one parser each, one autocast rule.

``parse_dtype`` accepts the long and short torch names (``bfloat16`` / ``bf16`` ...);
``resolve_device`` turns ``auto`` into CUDA when present; ``autocast`` is the mixed-precision
context of training and evaluation (``auto``: bf16 on CUDA, fp32 elsewhere).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
#: names of ``autocast``: ``auto`` or a dtype name
AUTOCAST_DTYPES = ("auto", "bf16", "fp16", "fp32")


def parse_dtype(name: str | torch.dtype, *, field: str = "dtype") -> torch.dtype:
    """``torch.dtype`` of a name in :data:`DTYPES` (a ``torch.dtype`` passes through)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` / ``bfloat16`` / ``float16`` (the long name)."""
    return str(dtype).replace("torch.", "")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit CUDA device needs CUDA."""
    if isinstance(device, torch.device):
        return device
    if device == "auto" or device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast(device: torch.device, dtype: str = "auto"):
    """Mixed-precision context for ``dtype`` in :data:`AUTOCAST_DTYPES` (fp32 = no autocast)."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {AUTOCAST_DTYPES}, got {dtype!r}")
    dt = (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype == "auto" else DTYPES[dtype]
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)
