"""What every chapter of the book does the same way: report versions, pick the preset, reuse runs.

A chapter's parameters cell calls :func:`choose_setup`:

- ``COVIDSEG_QUICK=1`` (CI sets it): the ``quick`` preset on the synthetic phantom, always (even
  with ``COVIDSEG_DATA`` set, so that quick results are never shown as real-data ones);
- a CUDA GPU and real data (``COVIDSEG_DATA``, or in Colab the data :func:`covidseg.colab.prepare`
  downloads, into Google Drive by default): the ``thesis`` preset on the real data;
- anything else (a laptop CPU): ``quick`` on the phantom.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .config import QUICK_ENV, TrainConfig, get_preset, preset_from_env
from .files import write_json
from .sources import DATA_ENV, data_source

__all__ = ["RUNS_ENV", "ChapterSetup", "versions", "choose_setup", "run_dir_for", "train_or_reuse", "evaluate_or_reuse"]

RUNS_ENV = "COVIDSEG_RUNS"
"""Folder holding the chapters' training runs (default ``runs`` beside the notebook), shared so that
the comparison chapter reuses the models the model chapters trained."""


def versions() -> str:
    """One line with the versions that matter and the compute device."""
    from importlib.metadata import version

    import nibabel
    import numpy
    import torch

    from . import __version__
    from .devices import describe_device, resolve_device

    return (
        f"covidseg {__version__} | python {platform.python_version()} | torch {torch.__version__} | "
        f"smp {version('segmentation-models-pytorch')} | nibabel {nibabel.__version__} | numpy {numpy.__version__} | "
        f"device: {describe_device(resolve_device('auto'))}"
    )


@dataclass(frozen=True)
class ChapterSetup:
    """The preset and data a chapter runs with.

    Attributes:
        preset: ``'quick'`` or ``'thesis'``.
        config: The preset's :class:`~covidseg.config.TrainConfig` (a chapter sets ``model``).
        data_dir: The dataset folder.
        source: ``'real MosMedData'`` or ``'synthetic phantom'``.
        reason: Why this preset was chosen, in words.
        colab: Whether this runs in Google Colab (:func:`covidseg.colab.in_colab`).
    """

    preset: str
    config: TrainConfig
    data_dir: Path
    source: str
    reason: str
    colab: bool = False

    def __str__(self) -> str:
        return f"preset: {self.preset} ({self.reason}) | data: {self.source} in {self.data_dir} | image size {self.config.image_size} px"


def choose_setup(progress: bool = True, drive: bool = True) -> ChapterSetup:
    """Pick the preset and the data as described in the module docstring.

    In Colab, first make the session ready (:func:`covidseg.colab.prepare`): mount Google Drive
    (with ``drive``), keep the runs there, and download and verify the real data there, unless
    ``COVIDSEG_DATA`` names a folder or ``COVIDSEG_QUICK`` asks for the phantom.

    Args:
        progress: Progress bars (phantom generation, download).
        drive: In Colab, keep the data and the runs in Google Drive, so that running a chapter
            again after a disconnect finds the data and resumes the unfinished run; ignored
            elsewhere.

    Raises:
        DownloadError: In Colab, if the data cannot be fetched or verified (one line naming the file).
        ValueError: If ``COVIDSEG_QUICK`` has a value that is not understood.
    """
    import torch

    from . import colab

    quick = preset_from_env(default="") == "quick"
    real = Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None
    in_colab = colab.in_colab()
    if in_colab:
        real = colab.prepare(drive=drive, fetch=real is None and not quick, progress=progress) or real
    if quick:
        preset, data, reason = "quick", None, f"{QUICK_ENV} is set"
    elif torch.cuda.is_available() and real is not None:
        preset, data, reason = "thesis", real, "a CUDA GPU and the real data are available"
    elif real is None:
        preset, data, reason = "quick", None, "no real data: set COVIDSEG_DATA or run covidseg download"
    else:
        preset, data, reason = "quick", real, "no CUDA GPU: quick settings on the real data"
    from .phantom import ensure_phantom

    config = get_preset(preset)
    data_dir = ensure_phantom(size=config.image_size, progress=progress) if data is None else data
    return ChapterSetup(preset, config, data_dir, data_source(data_dir), reason, colab=in_colab)


def run_dir_for(config: TrainConfig, root: str | os.PathLike | None = None) -> Path:
    """``runs/<model>-<preset>``, under :data:`RUNS_ENV` when set."""
    root = Path(root or os.environ.get(RUNS_ENV, "runs"))
    return root / f"{config.model}-{config.preset}"


def train_or_reuse(config: TrainConfig, data_dir, run_dir=None, progress: bool = True, reuse_other_code: bool = False):
    """:func:`covidseg.runs.train_or_reuse` (train, resume or reuse a run by its identity) into
    ``run_dir``, by default the chapters' :func:`run_dir_for`.

    Returns:
        ``(run_dir, history)``: the folder of the run used, and its history.
    """
    from .runs import train_or_reuse as train_run

    return train_run(config, data_dir, Path(run_dir or run_dir_for(config)), progress, reuse_other_code)


def evaluate_or_reuse(run_dir, data_dir, part: str = "test") -> dict:
    """A run's scores on ``part`` (:func:`covidseg.evaluation.evaluate_run`), kept in
    ``<run_dir>/<part>-scores.json`` and reused while the run's checkpoint, the data folder and the
    package's code are unchanged: chapter 9 reuses the scores that chapters 5-8 computed.
    """
    from .evaluation import evaluate_run
    from .runs import code_fingerprint

    run_dir = Path(run_dir)
    checkpoint = next((run_dir / name for name in ("best.pt", "last.pt") if (run_dir / name).is_file()), None)
    if checkpoint is None:
        return evaluate_run(run_dir, data_dir, part=part, progress=False)  # raises the error that says why
    stat = checkpoint.stat()
    identity = {"checkpoint": [checkpoint.name, stat.st_size, stat.st_mtime_ns], "data": str(Path(data_dir).resolve()), "code": code_fingerprint()}
    saved_file = run_dir / f"{part}-scores.json"
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("identity") == identity:
        return saved["report"]
    report = evaluate_run(run_dir, data_dir, part=part, progress=False)
    write_json(saved_file, {"identity": identity, "report": report})
    return report
