"""Choosing the compute device: ``'auto'`` means CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "describe_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:1'`` or ``'mps'`` into a device.

    Raises:
        ValueError: If a named accelerator is not available.
    """
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
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but MPS is not available; use --device auto or cpu")
    return device


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. ``'cuda (NVIDIA T4)'`` or ``'cpu (2 threads)'``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
