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
from .devices import describe_device
from .metrics import evaluate_studies
from .mosmed import annotated_studies
from .prediction import THRESHOLD, load_trained_model, predict_probabilities
from .sources import RunCard, data_source, resolve_data_dir
from .splits import get_split

__all__ = ["evaluate_run", "predict_part", "format_report"]


def predict_part(run_dir, data_dir=None, part: str = "test", device: str = "auto", batch_size: int = 8, progress: bool = True):
    """Predict every study of one part of the run's split.

    Returns:
        ``(predictions, truths, images, config, device)``: dicts from study id to uint8
        ``(Z, H, W)`` masks, and to float32 preprocessed slices, at the run's image size.
    """
    model, config = load_trained_model(run_dir, device)
    device = next(model.parameters()).device
    data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
    ids = get_split(config.split).part(part)
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
        ``run_card``. Also written to ``json_path`` when given.
    """
    started = time.perf_counter()
    predictions, truths, _, config, device, data_dir = predict_part(run_dir, data_dir, part, device, progress=progress)
    scores = evaluate_studies(predictions, truths)
    history = json.loads((Path(run_dir) / "history.json").read_text()) if (Path(run_dir) / "history.json").is_file() else []
    card = RunCard(
        data=data_source(data_dir),
        model=config.model,
        device=describe_device(device),
        epochs=len(history),
        image_size=config.image_size,
        seconds=time.perf_counter() - started,
        preset=config.preset,
    )
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
        path = Path(json_path)
        tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    return report


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
