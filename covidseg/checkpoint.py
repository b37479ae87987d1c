"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so loading it
can never execute code: a pickle that would is refused. It records the model, the optimiser, the
epoch, the early-stopping state, the history and the :class:`~covidseg.config.TrainConfig` that
made it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import CheckpointError

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "checkpoint_config"]

CHECKPOINT_FORMAT = "covidseg-checkpoint-1"
"""Value of the ``format`` key; files without it are not covidseg checkpoints."""

_REQUIRED_KEYS = ("format", "model_name", "config", "model", "epoch", "history")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, flushed, then renamed.

    If the write fails (read-only folder, full disk), the previous file at ``path`` is untouched.

    Args:
        state: The checkpoint dictionary; ``format`` is added.
        path: Target file.

    Raises:
        CheckpointError: If the file cannot be written.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CheckpointError(path, f"could not be written ({exc.strerror or exc}); the previous checkpoint is kept") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, model_name: str | None = None, config: TrainConfig | None = None) -> dict:
    """Load and check a checkpoint.

    Args:
        path: The ``.pt`` file.
        model_name: If given, the checkpoint must be of this model.
        config: If given, the checkpoint's config must agree with it (except ``max_epochs``,
            ``device`` and ``preset``).

    Returns:
        The checkpoint dictionary, with ``config`` as a :class:`TrainConfig`.

    Raises:
        CheckpointError: If the file is missing, truncated, not a covidseg checkpoint, would run code
            when unpickled, or was made for another model or config.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unsupported object"
        if "Weights only load failed" in str(exc):
            reason = "it holds objects that would execute code when loaded"
        raise CheckpointError(path, f"refused: not a plain-weights checkpoint ({reason})") from None
    except Exception as exc:  # torch raises many types for damaged or foreign files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(path, f"truncated or not a checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a covidseg checkpoint (no format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {', '.join(missing)}")
    try:
        state["config"] = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid config in checkpoint ({exc})") from None
    if model_name is not None and state["model_name"] != model_name:
        raise CheckpointError(path, f"checkpoint is for model {state['model_name']!r}, not {model_name!r}")
    if config is not None:
        differing = state["config"].differences(config)
        if differing:
            shown = ", ".join(f"{n}={getattr(state['config'], n)!r} (asked {getattr(config, n)!r})" for n in differing)
            raise CheckpointError(path, f"checkpoint was made with another config: {shown}")
    return state


def checkpoint_config(path: str | os.PathLike) -> TrainConfig:
    """The config stored in a checkpoint."""
    return load_checkpoint(path)["config"]
