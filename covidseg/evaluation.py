"""Scoring a trained run on a part of its split, as thesis ch. 6-10 report it.

The headline numbers are the mean and max over test studies of the per-study (3D) Dice. The
pooled and per-slice variants are reported beside them, each named for what it averages.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .dataset import SliceDataset
from .errors import DataError
from .files import check_output_file, read_json_object, write_json
from .metrics import THRESHOLD, evaluate_studies
from .mosmed import annotated_studies
from .prediction import load_trained_model, predict_probabilities
from .run_card import RunCard
from .sources import resolve_data_dir
from .splits import get_split

__all__ = ["REPORT_FORMAT", "evaluate_run", "predict_part", "format_report", "is_report"]

REPORT_FORMAT = "covidseg-evaluation-1"
"""Value of the ``format`` key of a report :func:`evaluate_run` writes."""

_REPORT_KEYS = ("part", "split", "per_study", "run_card")
"""Keys every report has (reports written before ``format`` existed are known by these)."""


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
        DataError: For unusable data, an unreadable ``history.json``, or a ``json_path`` that
            cannot be written (an existing file there is then left as it was).
        CovidsegError: If ``json_path`` is a folder, or an existing file that is not a report
            this function wrote (:func:`is_report`); checked before any work.
    """
    started = time.perf_counter()
    if json_path is not None:
        check_output_file(json_path, "scores.json", is_report)  # before the work, not after it
    predictions, truths, _, config, device, data_dir = predict_part(run_dir, data_dir, part, device, progress=progress)
    scores = evaluate_studies(predictions, truths)
    history = _read_history(Path(run_dir) / "history.json")
    card = RunCard.describe(config, data_dir, device, len(history), time.perf_counter() - started)
    report = {
        "format": REPORT_FORMAT,
        "part": part,
        "split": config.split,
        "model": config.model,
        **scores,
        "per_study": {str(k): v["dice"] for k, v in scores["per_study"].items()},
        "per_study_scores": {str(k): v for k, v in scores["per_study"].items()},
        "run_card": card.to_dict(),
    }
    if json_path is not None:
        write_json(Path(json_path), report)
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


def is_report(path: str | os.PathLike) -> bool:
    """Whether ``--json`` may replace ``path``: a report :func:`evaluate_run` wrote (its
    ``format``, or, for reports written before it had one, a ``mean_dice`` or all of
    ``part, split, per_study, run_card``), or an empty JSON object, which holds nothing to lose.

    Files larger than 64 MiB are not read (no report is that large).
    """
    value = read_json_object(path)
    if value is None:
        return False
    return value == {} or value.get("format") == REPORT_FORMAT or "mean_dice" in value or all(key in value for key in _REPORT_KEYS)


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
