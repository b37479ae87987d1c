"""Scoring a trained run on a part of its split, as thesis ch. 6-10 report it.

The headline numbers are the mean and max over test studies of the per-study (3D) Dice. The
pooled and per-slice variants are reported beside them, each named for what it averages.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .dataset import SliceDataset
from .errors import DataError
from .metrics import evaluate_studies
from .mosmed import annotated_studies
from .prediction import THRESHOLD, load_trained_model, predict_probabilities
from .sources import RunCard, resolve_data_dir
from .splits import get_split

__all__ = ["evaluate_run", "predict_part", "format_report"]


def predict_part(
    run_dir, data_dir=None, part: str = "test", device: str = "auto", batch_size: int = 8, progress: bool = True, studies=None
):
    """Predict every study of one part of the run's split (or only ``studies``, ids of that part).

    Returns:
        ``(predictions, truths, images, config, device, data_dir)``: dicts from study id to
        uint8 ``(Z, H, W)`` masks, and to float32 preprocessed slices, at the run's image size;
        the run's config, the device used and the data folder read.
    """
    model, config = load_trained_model(run_dir, device)
    device = next(model.parameters()).device
    data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
    ids = get_split(config.split).part(part)
    if studies is not None:
        outside = sorted(set(studies) - set(ids))
        if outside:
            raise ValueError(f"studies {outside} are not in the {part} part of split {config.split!r}")
        ids = [i for i in ids if i in set(studies)]
    dataset = SliceDataset(annotated_studies(data_dir, ids), config.image_size, progress=progress)
    predictions, truths, images = {}, {}, {}
    for entry in dataset.studies:
        sid = entry.study.study_id
        probabilities = predict_probabilities(model, entry.images, batch_size, device)
        predictions[sid] = (probabilities >= THRESHOLD).astype(np.uint8)
        truths[sid], images[sid] = entry.masks, entry.images
    return predictions, truths, images, config, device, data_dir


def evaluate_run(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    part: str = "test",
    device: str = "auto",
    json_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Score a run on ``part`` of its split.

    Returns:
        A dict with ``per_study`` (study id -> Dice), ``mean_dice`` and ``max_dice`` (over
        per-study Dice, the thesis' "mean / max"), ``pooled_dice``, the per-slice variants and the
        other scores from :func:`covidseg.metrics.evaluate_studies`, plus ``part``, ``split`` and a
        ``run_card``. Also written to ``json_path`` when given (atomically).

    Raises:
        CheckpointError: If the run holds no usable checkpoint.
        DataError: For unusable data, an unreadable ``history.json``, or a ``json_path`` that is
            a folder or cannot be written (an existing file there is then left as it was).
    """
    started = time.perf_counter()
    if json_path is not None:
        _check_json_path(Path(json_path))  # before the work, not after it
    predictions, truths, _, config, device, data_dir = predict_part(run_dir, data_dir, part, device, progress=progress)
    scores = evaluate_studies(predictions, truths)
    history = _read_history(Path(run_dir) / "history.json")
    card = RunCard.describe(config, data_dir, device, len(history), time.perf_counter() - started)
    report = {
        "part": part,
        "split": config.split,
        "model": config.model,
        **scores,
        "per_study": {str(k): v["dice"] for k, v in scores["per_study"].items()},
        "per_study_scores": {str(k): v for k, v in scores["per_study"].items()},
        "run_card": card.to_dict(),
    }
    if json_path is not None:
        _write_json_atomically(Path(json_path), report)
    return report


def _read_history(path: Path) -> list:
    """The rows of a run's ``history.json`` (none if the file is absent)."""
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(path, f"unreadable training history ({' '.join(str(exc).split())})") from None
    if not isinstance(history, list):
        raise DataError(path, "unreadable training history (expected a list of epochs)")
    return history


def _check_json_path(path: Path) -> None:
    if path.is_dir():
        raise DataError(path, "is a folder; give a file name such as scores.json")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(path, f"cannot write here: {parent} is a file, not a folder")


def _write_json_atomically(path: Path, value) -> None:
    """Write ``value`` as JSON through a temporary file; a failure leaves the old file intact."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise DataError(path, f"could not be written ({exc.strerror or exc}); nothing was changed") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def format_report(report: dict) -> str:
    """The per-study Dice table and the mean / max line, followed by the run card."""
    lines = [f"{'study':>12}  {'Dice':>6}", f"{'-' * 12}  {'-' * 6}"]
    for sid, dice in report["per_study"].items():
        lines.append(f"{'study_' + str(sid).zfill(4):>12}  {dice:6.3f}")
    lines.append(f"{'-' * 12}  {'-' * 6}")
    lines.append(
        f"{report['part']} per-study Dice: mean {report['mean_dice']:.3f} / max {report['max_dice']:.3f}"
        f"  (pooled over voxels {report['pooled_dice']:.3f})"
    )
    card = report["run_card"]
    lines.append(str(RunCard(**card)))
    return "\n".join(lines)
