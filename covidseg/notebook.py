"""What every chapter of the book does the same way: report versions, pick the preset, reuse runs.

A chapter's parameters cell calls :func:`choose_setup`:

- ``COVIDSEG_QUICK=1`` (CI sets it): the ``quick`` preset on the synthetic phantom;
- a CUDA GPU and real data (``COVIDSEG_DATA``, or Colab's ``/content/mosmeddata`` after
  ``covidseg download``): the ``thesis`` preset on the real data;
- anything else (a laptop CPU): ``quick`` on the phantom.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .config import QUICK_ENV, TrainConfig, get_preset, preset_from_env
from .sources import DATA_ENV, data_source, resolve_data_dir

__all__ = ["COLAB_DATA_DIR", "RUNS_ENV", "ChapterSetup", "versions", "choose_setup", "run_dir_for", "code_fingerprint", "train_or_reuse", "evaluate_or_reuse"]

COLAB_DATA_DIR = Path("/content/mosmeddata")
"""Where the chapters' Colab setup cell downloads the real data."""

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
    """

    preset: str
    config: TrainConfig
    data_dir: Path
    source: str
    reason: str

    def __str__(self) -> str:
        return f"preset: {self.preset} ({self.reason}) | data: {self.source} in {self.data_dir} | image size {self.config.image_size} px"


def _real_data_dir() -> Path | None:
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    if (COLAB_DATA_DIR / "dataset_registry.csv").is_file():
        return COLAB_DATA_DIR
    return None


def choose_setup(progress: bool = True) -> ChapterSetup:
    """Pick the preset and the data as described in the module docstring."""
    import torch

    real = _real_data_dir()
    if preset_from_env(default="") == "quick":
        preset, data, reason = "quick", None, f"{QUICK_ENV} is set"
    elif torch.cuda.is_available() and real is not None:
        preset, data, reason = "thesis", real, "a CUDA GPU and the real data are available"
    elif real is None:
        preset, data, reason = "quick", None, "no real data: set COVIDSEG_DATA or run covidseg download"
    else:
        preset, data, reason = "quick", real, "no CUDA GPU: quick settings on the real data"
    config = get_preset(preset)
    data_dir = resolve_data_dir(data, phantom_size=config.image_size, progress=progress)
    return ChapterSetup(preset, config, data_dir, data_source(data_dir), reason)


def run_dir_for(config: TrainConfig, root: str | os.PathLike | None = None) -> Path:
    """``runs/<model>-<preset>``, under :data:`RUNS_ENV` when set."""
    root = Path(root or os.environ.get(RUNS_ENV, "runs"))
    return root / f"{config.model}-{config.preset}"


def code_fingerprint() -> str:
    """A digest of the package's Python sources, subpackages included: runs trained by other code are not reused."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def train_or_reuse(config: TrainConfig, data_dir, run_dir=None, progress: bool = True):
    """Train ``config`` unless a finished run with the same config, trained by the same code
    (:func:`code_fingerprint`), exists; resume an unfinished one.

    Returns:
        ``(run_dir, history)``.
    """
    from .training import fit

    run_dir = Path(run_dir or run_dir_for(config))
    history_file = run_dir / "history.json"
    finished = run_dir / "finished.json"
    identity = {"config": config.to_dict(), "code": code_fingerprint()}
    if finished.is_file():
        record = json.loads(finished.read_text())
        if {key: record.get(key) for key in identity} == identity:
            if progress:
                print(f"reusing the finished run in {run_dir}")
            return run_dir, json.loads(history_file.read_text())
        print(f"the run in {run_dir} was trained with another config or by other code; training afresh")
        finished.unlink()
        for checkpoint in ("last.pt", "best.pt"):
            (run_dir / checkpoint).unlink(missing_ok=True)
    result = fit(config, run_dir, data_dir=data_dir, resume=(run_dir / "last.pt").is_file(), progress=progress)
    finished.write_text(json.dumps({**identity, "best_epoch": result.best_epoch, "card": result.card.to_dict()}, indent=2))
    return run_dir, result.history


def evaluate_or_reuse(run_dir, data_dir, part: str = "test") -> dict:
    """A run's scores on ``part`` (:func:`covidseg.evaluation.evaluate_run`), kept in
    ``<run_dir>/<part>-scores.json`` and reused while the run's checkpoint, the data folder and the
    package's code are unchanged: chapter 9 reuses the scores that chapters 5-8 computed.
    """
    from .evaluation import _write_json_atomically, evaluate_run

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
    _write_json_atomically(saved_file, {"identity": identity, "report": report})
    return report
