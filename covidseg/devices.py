"""Choosing the compute device: ``'auto'`` means CUDA, then Apple MPS, then the CPU.

Device names are checked without importing torch (:func:`check_device_name`), so that the CLI can
refuse a bad ``--device`` at once; torch is imported only to resolve one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_FORMS", "check_device_name", "resolve_device", "describe_device"]

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
"""The device names covidseg supports, in words."""

_SUPPORTED = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


def check_device_name(name: str) -> str | None:
    """``None`` for a supported device name, else what is wrong with it (a phrase).

    Torch knows more device types (``meta``, ``xpu``, ``hpu``...), but covidseg trains and
    predicts only on the CPU, CUDA GPUs and Apple's MPS.
    """
    if isinstance(name, str) and _SUPPORTED.match(name):
        return None
    return f"is not a supported device; use {DEVICE_FORMS}"


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:1'`` or ``'mps'`` into a device.

    Raises:
        ValueError: If the name is not supported or a named accelerator is not available.
    """
    import torch

    problem = check_device_name(name)
    if problem:
        raise ValueError(f"device {name!r} {problem}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for, but there are {torch.cuda.device_count()} CUDA GPUs; use --device cuda or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but MPS is not available; use --device auto or cpu")
    return device


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. ``'cuda (NVIDIA T4)'`` or ``'cpu (2 threads)'``."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
