"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so loading it
can never execute code: a pickle that would is refused. It records the model, the optimiser, the
epoch, the early-stopping state, the history and the :class:`~covidseg.config.TrainConfig` that
made it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .config import MODEL_NAMES, TrainConfig
from .errors import CheckpointError, RunMismatchError
from .files import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "checkpoint_config"]

CHECKPOINT_FORMAT = "covidseg-checkpoint-1"
"""Value of the ``format`` key; files without it are not covidseg checkpoints."""

_REQUIRED_KEYS = ("format", "model_name", "config", "model", "epoch", "history")

_KEY_TYPES = {
    "model_name": str,
    "config": dict,
    "model": dict,
    "epoch": int,
    "history": list,
    "optimizer": dict,
    "scaler": dict,
    "early_stopping": dict,
    "data": str,
}
"""Type of each key a checkpoint may hold; anything else means a damaged or foreign file."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically (:func:`covidseg.files.atomic_write`): serialised in memory,
    written to a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    If the write fails (read-only folder, full disk) or the process is killed meanwhile, the
    previous file at ``path`` is untouched: a reader sees the old checkpoint or the new one, never
    a partial one. A kill can leave a hidden temporary file behind, which the next run into the
    folder removes (:func:`covidseg.files.remove_stale_temporaries`).

    Args:
        state: The checkpoint dictionary; ``format`` is added.
        path: Target file.

    Raises:
        CheckpointError: If the file cannot be written.
    """
    path = Path(path)
    # Serialise in memory first: torch's zip writer turns a failed write (full disk) into an
    # obscure RuntimeError, while a plain file write reports ENOSPC as it is.
    try:
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getbuffer())
    except OSError as exc:
        raise CheckpointError(path, f"could not be written ({exc.strerror or exc}); the previous checkpoint is kept") from None
    return path


def load_checkpoint(path: str | os.PathLike, model_name: str | None = None, config: TrainConfig | None = None) -> dict:
    """Load and check a checkpoint.

    Args:
        path: The ``.pt`` file.
        model_name: If given, the checkpoint must be of this model.
        config: If given, the checkpoint's config must agree with it, except in the fields a
            resumed run may change (:data:`covidseg.config.RESUMABLE_CHANGES`).

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
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(path, f"truncated or not a checkpoint ({_damage(path, exc)})") from None
        # A PyTorch file holding more than tensors and plain values: unpickling it could run code.
        unsafe = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        reason = f"loading it would run {unsafe.group(1)}" if unsafe else "damaged, or holding objects only a full unpickle can read"
        raise CheckpointError(path, f"refused: not a plain-weights checkpoint ({reason})") from None
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(path, f"truncated or not a checkpoint ({_damage(path, exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a covidseg checkpoint (no format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {', '.join(missing)}")
    malformed = [key for key, kind in _KEY_TYPES.items() if key in state and not isinstance(state[key], kind)]
    weights = state["model"]
    if isinstance(weights, dict) and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        malformed.append("model")
    if malformed:
        raise CheckpointError(path, f"damaged checkpoint: {', '.join(malformed)} of the wrong type")
    try:
        state["config"] = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid config in checkpoint: {exc}") from None
    problem = _value_problem(state)
    if problem:
        raise CheckpointError(path, f"damaged checkpoint: {problem}")
    if state["model_name"] not in MODEL_NAMES:
        raise CheckpointError(path, f"checkpoint is for an unknown model {state['model_name']!r}")
    if state["model_name"] != state["config"].model:
        raise CheckpointError(path, f"damaged checkpoint: model {state['model_name']!r} but config for {state['config'].model!r}")
    if model_name is not None and state["model_name"] != model_name:
        raise RunMismatchError(path, f"checkpoint is for model {state['model_name']!r}, not {model_name!r}")
    if config is not None:
        differing = state["config"].differences(config)
        if differing:
            shown = ", ".join(f"{n}={getattr(state['config'], n)!r} (asked {getattr(config, n)!r})" for n in differing)
            raise RunMismatchError(path, f"checkpoint was made with another config: {shown}")
    return state


_STOPPING_FIELDS = {"best_score": float, "best_epoch": int, "bad_epochs": int}
"""The early-stopping state (:meth:`covidseg.training.EarlyStopping.state_dict`) and its types."""


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def _value_problem(state: dict) -> str | None:
    """What is wrong with the values of a checkpoint whose keys have the right types, or ``None``:
    the epoch, the early-stopping state, the history, and weights that are not finite."""
    epoch = state["epoch"]
    if isinstance(epoch, bool) or epoch < 0:
        return f"epoch {epoch!r} must be a whole number of at least 0"
    stopping = state.get("early_stopping")
    if stopping is not None:
        for name, kind in _STOPPING_FIELDS.items():
            if not _is(stopping.get(name), kind):
                return f"early_stopping {name} {stopping.get(name)!r} must be a {kind.__name__}"
        if math.isnan(stopping["best_score"]) or not -1 <= stopping["best_epoch"] <= epoch or not 0 <= stopping["bad_epochs"] <= epoch + 1:
            return f"early_stopping {stopping} does not fit epoch {epoch}"
    if not all(isinstance(row, dict) for row in state["history"]):
        return "history must be a list of epoch rows"
    for name, tensor in state["model"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"weight {name} holds non-finite values (NaN or infinity): the run that saved it diverged"
    return None


def _damage(path: Path, exc: BaseException) -> str:
    """What is wrong with a file ``torch.load`` could not read, in a few words."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "the file is cut short: incomplete zip archive"
    if not head.startswith(b"PK"):
        return "not a PyTorch file"
    first = " ".join(str(exc).split(". ")[0].split()) or type(exc).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def checkpoint_config(path: str | os.PathLike) -> TrainConfig:
    """The config stored in a checkpoint."""
    return load_checkpoint(path)["config"]
