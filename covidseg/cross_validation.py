"""Cross-validation on MiniSeg's five folds, scored out of fold and set beside MiniSeg's own scores.

MiniSeg (Qiu et al., AAAI 2021), the published peer of the thesis, reports a 5-fold
cross-validation on the same 50 annotated MosMedData studies; its folds are the package's splits
``miniseg-fold-1`` .. ``miniseg-fold-5`` (:mod:`covidseg.splits`: fold K tests on MiniSeg's K-th
fold, validates on the next, trains on the other three). :func:`cross_validate` (``covidseg cv``)

1. trains one run per fold into ``OUT/fold-K`` through
   :func:`covidseg.runs.train_or_reuse`: a finished fold is reused, an interrupted one resumes
   from its ``last.pt``, so a rerun of the same command after Ctrl-C or a kill continues where it
   stopped. With several CUDA GPUs each GPU trains its share of the folds in a process of its own
   (:func:`assign_folds`); on one device the folds run one after another;
2. predicts every test study with the model of the fold that held it out (*out of fold*), so that
   each of the 50 studies is scored once, by a model that never saw it;
3. scores the 50 studies under every protocol of :mod:`covidseg.metrics` and sets the scores beside
   MiniSeg's (:func:`miniseg_per_study`), with a bootstrap interval over studies and, on the real
   data only, a paired Wilcoxon signed-rank test of the per-study pairs.

Like with like: MiniSeg published predictions only for the slices that hold lesion, so its
per-study Dice is pooled over a study's *lesion slices*; our column beside it is scored the same
way, and the scores that need the other slices (the thesis' whole-study Dice) have no MiniSeg
value. MiniSeg's numbers are on the real data at 512 px: beside phantom results they are printed
for orientation only and the paired test is not computed.

Example:
    >>> from covidseg.config import get_preset
    >>> config = get_preset("quick").replace(model="unet")
    >>> report = cross_validate(config, "runs/cv-unet")  # doctest: +SKIP
    >>> print(format_report(report))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import CovidsegError, DataError, RunFolderError
from .files import check_output_file, read_json_object, write_json
from .metrics import confusion_counts, dice, evaluate_studies, slice_dice
from .mosmed import ANNOTATED_IDS, mask_path
from .runs import describe_contents, folder_contents, is_finished, is_run_file
from .run_card import RunCard
from .sources import REAL, data_source, resolve_data_dir
from .splits import MINISEG_FOLDS

__all__ = [
    "FOLDS",
    "REPORT_FORMAT",
    "REPORT_NAME",
    "PROTOCOLS",
    "parse_folds",
    "fold_split",
    "fold_dir",
    "assign_folds",
    "check_out_folder",
    "train_folds",
    "score_out_of_fold",
    "cross_validate",
    "TimeBudgetSpent",
    "format_report",
    "is_report",
    "miniseg_per_study",
    "miniseg_study_scores",
    "miniseg_table_text",
]

FOLDS = tuple(range(1, len(MINISEG_FOLDS) + 1))
"""MiniSeg's folds, 1..5."""

REPORT_FORMAT = "covidseg-cross-validation-1"
"""Value of the ``format`` key of the JSON report :func:`cross_validate` writes."""

REPORT_NAME = "cross-validation.json"
"""The report's default name, in the cross-validation folder."""

MINISEG_TABLE = "data/miniseg_per_study_dice.csv"
"""Package data: MiniSeg's per-study scores (:func:`miniseg_per_study`)."""

MINISEG_SOURCE = "real MosMedData, 512 px (MiniSeg's published predictions)"
"""What MiniSeg's scores were computed on."""

MINISEG_COLUMNS = ("study_id", "fold", "lesion_slices", "missed_slices", "tp", "fp", "fn", "dice", "slice_dice_mean")
"""Columns of :data:`MINISEG_TABLE`."""

PROTOCOLS = {
    "study_lesion_slices": "per-study Dice over the study's lesion slices (MiniSeg's per-study protocol)",
    "slice_skip": "per-slice Dice over lesion slices, slices without lesion left out (MiniSeg's 'skip')",
    "pooled_lesion_slices": "Dice pooled over the voxels of every lesion slice",
    "study_whole": "per-study Dice over the whole study (the thesis' protocol)",
    "slice_one": "per-slice Dice over every slice, an empty slice predicted empty scoring 1",
    "pooled_whole": "Dice pooled over every voxel of every study",
}
"""The averaging protocols of the report, by key (:mod:`covidseg.metrics` defines each)."""

PAIRED_TEST = "Wilcoxon signed-rank, two-sided (scipy.stats.wilcoxon)"
"""The paired test of the per-study pairs (ours, MiniSeg's), over the lesion slices."""

_now = time.time
"""The clock of the time budget of :func:`train_folds`: wall-clock seconds, the same in the
worker processes (tests replace it)."""

_BESIDE = re.compile(r"^fold-[1-5](-[0-9a-f]{8})?$")
"""Folders a cross-validation holds: ``fold-K``, and ``fold-K-<digest>`` where
:func:`~covidseg.runs.train_or_reuse` trained a run of another identity beside a kept one."""


# --------------------------------------------------------------------------- folds and folders


def parse_folds(text: str) -> tuple[int, ...]:
    """Read a choice of folds: ``'1-5'``, ``'2'``, ``'1,3,5'`` or ``'1-2,5'``.

    Returns:
        The folds, sorted, each once.

    Raises:
        ValueError: For anything else, or a fold outside 1..5 (the message names the text).
    """
    folds: set[int] = set()
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"expected folds such as 1-5, 2 or 1,3,5, got {text!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ValueError(f"a range of folds runs upwards, such as 1-3, got {text!r}")
        if not (FOLDS[0] <= low and high <= FOLDS[-1]):
            raise ValueError(f"folds must lie between {FOLDS[0]} and {FOLDS[-1]} (MiniSeg's five folds), got {text!r}")
        folds.update(range(low, high + 1))
    return tuple(sorted(folds))


def _checked_folds(folds: Sequence[int]) -> tuple[int, ...]:
    chosen = tuple(sorted(set(int(k) for k in folds)))
    if not chosen or chosen[0] < FOLDS[0] or chosen[-1] > FOLDS[-1]:
        raise ValueError(f"folds must be some of {', '.join(map(str, FOLDS))}, got {list(folds)}")
    return chosen


def fold_split(fold: int) -> str:
    """The split of fold ``fold``: ``'miniseg-fold-K'`` (test: MiniSeg's fold K, validation: fold K+1)."""
    return f"miniseg-fold-{fold}"


def fold_dir(out: str | os.PathLike, fold: int) -> Path:
    """The run folder of fold ``fold`` in the cross-validation folder ``out``: ``OUT/fold-K``."""
    return Path(out) / f"fold-{fold}"


def assign_folds(folds: Sequence[int], devices: int) -> tuple[tuple[int, ...], ...]:
    """Share folds among devices, round robin: the i-th fold goes to device ``i mod devices``.

    Args:
        folds: The folds, in the order they should start.
        devices: How many devices (processes) can train at once, at least 1.

    Returns:
        One tuple of folds per device that gets any (``min(devices, len(folds))`` tuples); each
        device trains its folds one after another. ``assign_folds([1, 2, 3, 4, 5], 2)`` is
        ``((1, 3, 5), (2, 4))``.

    Raises:
        ValueError: If ``devices`` is less than 1.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    folds = tuple(folds)
    return tuple(folds[i::devices] for i in range(min(devices, len(folds))))


def check_out_folder(out: str | os.PathLike) -> Path:
    """Check, before any work, that ``out`` can hold a cross-validation: a new or empty folder, or
    one that holds only what :func:`cross_validate` writes (fold run folders and its report).

    Hidden files are left alone and do not count.

    Raises:
        DataError: If ``out`` is a file.
        RunFolderError: If ``out`` holds anything else, or a fold folder holds files that are not
            a covidseg run's; nothing is changed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file; --out must be a folder for the fold runs")
    names = [name for name in folder_contents(out) if not name.startswith(".")]
    foreign = [name for name in names if not (name == REPORT_NAME or (_BESIDE.match(name) and (out / name).is_dir()))]
    if foreign:
        raise RunFolderError(out, f"{describe_contents(foreign)}, which a cross-validation does not write; it needs a new or "
                                  f"empty folder, or one it wrote before (fold-1 ... fold-5, {REPORT_NAME}): choose another --out")
    for name in names:
        if name != REPORT_NAME:
            contents = [n for n in folder_contents(out / name) if not n.startswith(".")]
            stray = [n for n in contents if not is_run_file(n)]
            if stray:
                raise RunFolderError(out / name, f"{describe_contents(stray)}, which is not part of a covidseg run; "
                                                 f"it is left as it is: choose another --out")
    return out


# --------------------------------------------------------------------------- training


def _train_sequentially(config, out: Path, folds: Sequence[int], data_dir: Path, progress: bool,
                        deadline: float | None = None) -> dict[int, tuple]:
    """Train (or reuse, or resume) each fold in turn; fold -> ``(run folder, history)``.

    With a ``deadline`` (:data:`_now` seconds), each fold trains with the minutes left as its
    time budget, and a fold its budget stopped ends the loop: the folds after it are not in the
    result. After the deadline no fold starts, except the first this call trains: like
    :func:`covidseg.training.fit`, a call trains at least one epoch, so that calls with a budget
    too short for anything else still make progress.
    """
    from .runs import train_or_reuse

    runs, trained = {}, False
    for fold in folds:
        fold_config = config.replace(split=fold_split(fold))
        if deadline is not None:
            left = deadline - _now()
            if left <= 0 and trained:
                break
            fold_config = fold_config.replace(time_budget=max(left, _SPENT) / 60)
        if progress:
            print(f"fold {fold}: {fold_split(fold)} in {fold_dir(out, fold)}")
        reused = is_finished(fold_dir(out, fold))  # (or a finished run of another identity, kept: this one trains beside it)
        runs[fold] = train_or_reuse(fold_config, data_dir, fold_dir(out, fold), progress=progress)
        trained = trained or not reused
        if not is_finished(runs[fold][0]):  # its time budget stopped it
            break
    return runs


_SPENT = 1e-3
"""The budget, in seconds, of a fold that starts after the deadline (the call's first to train):
less than any epoch, so :func:`covidseg.training.fit` trains one and stops."""


def parallel_devices(device: str) -> int:
    """How many CUDA GPUs the folds can be shared among for ``device``: all visible GPUs for
    ``'auto'`` and ``'cuda'``, else 1 (``'cpu'``, ``'mps'`` and a named ``'cuda:N'`` train on one)."""
    if device not in ("auto", "cuda"):
        return 1
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _visible_device(index: int) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` a worker gets to see only the ``index``-th GPU of this process."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index % len(visible)] if visible else str(index)


def _worker(index: int, visible: str | None, config_dict: dict, out: str, folds: tuple, data_dir: str, progress: bool,
            deadline: float | None, results) -> None:
    """One process's folds (spawned by :func:`train_folds`); puts ``(index, status, value)`` on
    ``results``: ``value`` is the folds that finished where ``status`` is ``'done'``, else a message.

    ``CUDA_VISIBLE_DEVICES`` is set before anything here touches CUDA, so ``device='auto'`` (and
    the run's identity, which holds the config's device) is the same in every worker.
    """
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    from .config import TrainConfig

    try:
        runs = _train_sequentially(TrainConfig.from_dict(config_dict), Path(out), folds, Path(data_dir), progress, deadline)
        finished = tuple(fold for fold, (run, _) in runs.items() if is_finished(run))
        results.put((index, "done", finished))  # a few bytes: the pipe never fills before the parent reads it
    except KeyboardInterrupt as exc:
        results.put((index, "interrupted", str(exc)))
    except CovidsegError as exc:
        results.put((index, "error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent, on one line
        results.put((index, "bug", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"))


def _train_in_parallel(config, out: Path, shares, data_dir: Path, progress: bool, cuda: bool, deadline: float | None) -> set[int]:
    """One spawned process per share of folds; return the folds that finished (all of them,
    unless the time budget ran out). Ctrl-C reaches every worker, each keeps its last completed
    epoch, and the interruption is raised here once all have stopped."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")  # a fresh process: CUDA is set up after CUDA_VISIBLE_DEVICES
    results = context.SimpleQueue()
    workers = []
    for index, folds in enumerate(shares):
        visible = _visible_device(index) if cuda else None
        if progress:
            where = f"GPU {visible}" if cuda else f"worker {index + 1}"
            print(f"{where}: folds {', '.join(map(str, folds))}")
        args = (index, visible, config.to_dict(), str(out), folds, str(data_dir), progress, deadline, results)
        workers.append(context.Process(target=_worker, args=args, name=f"covidseg-cv-{index}"))
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    except KeyboardInterrupt:
        for worker in workers:  # a Ctrl-C at a terminal reached them already; a signal to this process alone did not
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGINT)
        for worker in workers:
            worker.join()
        raise
    outcomes = {}
    while not results.empty():
        index, status, value = results.get()
        outcomes[index] = (status, value)
    finished = set()
    for index, worker in enumerate(workers):
        status, value = outcomes.get(index, ("bug", f"worker {index + 1} ended with exit status {worker.exitcode} and no result"))
        if status == "interrupted":
            raise KeyboardInterrupt(value)
        if status == "error":
            raise CovidsegError(None, value)
        if status != "done":
            raise RuntimeError(value)
        finished.update(value)
    return finished


def train_folds(config, out: str | os.PathLike, folds: Sequence[int] = FOLDS, data_dir: str | os.PathLike | None = None,
                progress: bool = True, devices: int | None = None) -> dict[int, tuple[Path, list[dict]]]:
    """Train each chosen fold of ``config`` into ``OUT/fold-K``, reusing finished and resuming
    interrupted folds (:func:`covidseg.runs.train_or_reuse`).

    ``config.time_budget`` (minutes) is the budget of this whole call, counted from its start:
    each fold trains with the minutes the folds before it left (stopping between epochs, after at
    least one, as :func:`covidseg.training.fit` does), a fold the budget stopped ends the training
    of the folds after it, and no fold starts once the minutes are spent, except the first fold to
    train (on each device): a call trains at least one epoch.

    Args:
        config: The :class:`~covidseg.config.TrainConfig`; its ``split`` is replaced per fold.
        out: The cross-validation folder.
        folds: The folds to train.
        data_dir: The dataset folder (default: ``COVIDSEG_DATA`` or the phantom).
        progress: Progress bars and messages.
        devices: Processes to train in at once (default: one per CUDA GPU when ``config.device``
            is ``'auto'`` or ``'cuda'`` and there are several, else 1). With more than 1, each
            process trains its share of :func:`assign_folds`, on its own GPU where there are GPUs.

    Returns:
        Fold -> ``(run_dir, history)``: the run folder used (``OUT/fold-K``, or beside it where a
        run of another identity was kept there) and its history (one dict per epoch). Every
        chosen fold is there, finished, unless the time budget ran out: then the folds not
        started are missing and the one it stopped is not finished
        (:func:`covidseg.runs.is_finished`).

    Raises:
        CovidsegError: As :func:`covidseg.training.fit`, from any fold.
        KeyboardInterrupt: On Ctrl-C (:class:`~covidseg.training.TrainingInterrupted` on one
            device); each fold keeps its last completed epoch.
    """
    deadline = None if config.time_budget is None else _now() + config.time_budget * 60
    folds = _checked_folds(folds)
    out = Path(out)
    data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
    count = parallel_devices(config.device) if devices is None else devices
    shares = assign_folds(folds, count)
    if len(shares) <= 1:
        return _train_sequentially(config, out, folds, data_dir, progress, deadline)
    cuda = config.device in ("auto", "cuda") and parallel_devices(config.device) > 1
    finished = _train_in_parallel(config, out, shares, data_dir, progress, cuda, deadline)
    # Every fold is finished now, unless the time budget ran out: this finds and reuses the finished ones.
    return _train_sequentially(config, out, [fold for fold in folds if fold in finished], data_dir, progress)


# --------------------------------------------------------------------------- MiniSeg's scores


@functools.lru_cache(maxsize=1)
def miniseg_per_study() -> dict[int, dict]:
    """MiniSeg's per-study scores on the 50 annotated studies, from package data.

    Measured on the predicted masks MiniSeg's authors published for their 5-fold
    cross-validation, against the expert masks at 512 px, over each study's lesion slices (the
    only slices with a published prediction); see the file's header for source and licence.

    Returns:
        Study id -> ``fold``, ``lesion_slices``, ``missed_slices`` (lesion slices predicted
        empty), ``tp``, ``fp``, ``fn`` (voxels pooled over the lesion slices), ``dice`` (pooled
        over the lesion slices: MiniSeg's per-study Dice) and ``slice_dice_mean`` (mean per-slice
        Dice over the lesion slices).
    """
    text = resources.files("covidseg").joinpath(MINISEG_TABLE).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {int(row["study_id"]): _typed(row) for row in rows}


def _typed(row: Mapping[str, str]) -> dict:
    values = {key: int(row[key]) for key in MINISEG_COLUMNS[1:7]}
    values.update(dice=float(row["dice"]), slice_dice_mean=float(row["slice_dice_mean"]))
    return values


_PNG_NAME = re.compile(r"CrossVal(?P<fold>[1-5])__study_(?P<study>\d{4})_(?P<slice>\d{4})\.png")


def miniseg_study_scores(predictions_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> dict[int, dict]:
    """Score MiniSeg's published predictions study by study (what :func:`miniseg_per_study` ships).

    Args:
        predictions_dir: MiniSeg's PNG masks, ``CrossVal{F}__study_{NNNN}_{KKKK}.png`` (fold F,
            study NNNN, slice KKKK of the NIfTI's third axis), 512 x 512, 0 or 255; PNG row r,
            column c is voxel ``[c, r, k]`` of the nibabel array.
        masks_dir: The 50 expert masks, ``study_NNNN_mask.nii.gz``, side by side.

    Returns:
        Study id -> the scores of :func:`miniseg_per_study` (unrounded).

    Raises:
        DataError: If a file is missing or not what MiniSeg published (a PNG on a slice without
            lesion, a study in a fold other than MiniSeg's, another size or values).
    """
    import nibabel as nib
    from PIL import Image

    predictions_dir, masks_dir = Path(predictions_dir), Path(masks_dir)
    pngs: dict[tuple[int, int], Path] = {}
    for png in sorted(predictions_dir.glob("*.png")):
        match = _PNG_NAME.fullmatch(png.name)
        if match is None:
            raise DataError(png, "is not one of MiniSeg's predictions (CrossVal{F}__study_{NNNN}_{KKKK}.png)")
        study, fold = int(match["study"]), int(match["fold"])
        if study not in MINISEG_FOLDS[fold - 1]:
            raise DataError(png, f"puts study {study} in fold {fold}, which MiniSeg's folds do not")
        pngs[study, int(match["slice"])] = png
    scores = {}
    for study in ANNOTATED_IDS:
        path = masks_dir / mask_path("", study).name
        if not path.is_file():
            raise DataError(path, "expert mask not found")
        truth = np.asanyarray(nib.load(path).dataobj).T == 1  # (Z, Y, X): slice k is PNG k
        lesion = np.flatnonzero(truth.any(axis=(1, 2)))
        prediction = np.zeros((lesion.size, *truth.shape[1:]), dtype=bool)
        for row, k in enumerate(lesion):
            png = pngs.pop((study, int(k)), None)
            if png is not None:
                pixels = np.asarray(Image.open(png))
                if pixels.shape != truth.shape[1:] or np.isin(pixels, (0, 255), invert=True).any():
                    raise DataError(png, f"expected a {truth.shape[2]} x {truth.shape[1]} mask of 0 and 255")
                prediction[row] = pixels == 255
        tp, fp, fn, _ = confusion_counts(prediction, truth[lesion])
        per_slice = slice_dice(prediction, truth[lesion], empty="skip")
        fold = next(f for f, ids in enumerate(MINISEG_FOLDS, start=1) if study in ids)
        scores[study] = {
            "fold": fold, "lesion_slices": int(lesion.size), "missed_slices": int(np.count_nonzero(~prediction.any(axis=(1, 2)))),
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "dice": float(dice(tp, fp, fn)), "slice_dice_mean": float(per_slice.mean()),
        }
    if pngs:
        (study, k), png = next(iter(pngs.items()))
        raise DataError(png, f"predicts slice {k} of study {study}, which holds no lesion in the expert mask")
    return scores


_TABLE_HEADER = """\
# MiniSeg's per-study scores on the 50 annotated MosMedData CT-1 studies, 5-fold cross-validation.
# Source: the predicted masks published by the authors of MiniSeg (Qiu, Liu, Li, Xu, "MiniSeg: An
# Extremely Minimum Network for Efficient COVID-19 Segmentation", AAAI 2021; repository yun-liu/MiniSeg,
# folder SegMaps/COVID-19-P1110; licence CC BY-NC-SA 4.0, non-commercial), scored against the MosMedData
# expert masks (Morozov et al., arXiv:2005.06465; CC BY-NC-ND 3.0) at 512 px. Neither is distributed
# here: these are numbers measured on them, shared under the same non-commercial terms with this credit.
# Only the lesion slices (expert mask not empty) have a prediction, so every score is over those slices.
# Columns: study_id; fold (MiniSeg's fold that tested it); lesion_slices; missed_slices (lesion slices
# predicted empty); tp, fp, fn (voxels, pooled over the lesion slices); dice = 2 tp / (2 tp + fp + fn)
# (MiniSeg's per-study Dice); slice_dice_mean (per-slice Dice averaged over the lesion slices, an empty
# prediction scoring 0). Written by covidseg.cross_validation.miniseg_table_text.
"""


def miniseg_table_text(predictions_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> str:
    """The text of :data:`MINISEG_TABLE`, computed from MiniSeg's predictions and the expert masks
    (:func:`miniseg_study_scores`): its header, then one row per study, scores to 6 decimals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MINISEG_COLUMNS)
    for study, row in sorted(miniseg_study_scores(predictions_dir, masks_dir).items()):
        writer.writerow([study, *(row[key] for key in MINISEG_COLUMNS[1:7]), f"{row['dice']:.6f}", f"{row['slice_dice_mean']:.6f}"])
    return _TABLE_HEADER + buffer.getvalue()


def _miniseg_summary(studies: Sequence[int]) -> dict:
    """MiniSeg's scores over ``studies``, under the lesion-slice protocols of :data:`PROTOCOLS`."""
    table = miniseg_per_study()
    rows = [table[i] for i in studies]
    per_study = np.array([row["dice"] for row in rows])
    slices = sum(row["lesion_slices"] for row in rows)
    counts = [sum(row[key] for row in rows) for key in ("tp", "fp", "fn")]
    return {
        "study_lesion_slices": _distribution(per_study),
        "slice_skip": sum(row["slice_dice_mean"] * row["lesion_slices"] for row in rows) / slices,
        "pooled_lesion_slices": float(dice(*counts)),
        "lesion_slices": slices,
        "lesion_slices_missed": sum(row["missed_slices"] for row in rows),
    }


# --------------------------------------------------------------------------- scoring


def _distribution(values: np.ndarray) -> dict:
    """Mean with its BCa bootstrap 95% interval over studies, median, min and max."""
    from .stats import mean_ci

    mean, low, high = mean_ci(values, method="bca") if values.size > 1 else (float(values.mean()),) * 3
    return {"mean": mean, "low": low, "high": high, "median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max()), "n": int(values.size)}


def _paired(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """The Wilcoxon signed-rank test of per-study pairs (:data:`PAIRED_TEST`)."""
    from scipy import stats

    difference = ours - theirs
    result = {"test": PAIRED_TEST, "pairs": PROTOCOLS["study_lesion_slices"] + ", ours and MiniSeg's, study by study",
              "n": int(difference.size), "median_difference": float(np.median(difference))}
    if not np.any(difference):
        return {**result, "statistic": 0.0, "p_value": 1.0}
    test = stats.wilcoxon(ours, theirs, alternative="two-sided")
    return {**result, "statistic": float(test.statistic), "p_value": float(test.pvalue)}


def score_out_of_fold(runs: Mapping[int, tuple], data_dir: str | os.PathLike | None = None, device: str = "auto",
                      progress: bool = True) -> dict:
    """Score every test study with the model of the fold that held it out, and set the scores
    beside MiniSeg's on the same studies.

    Args:
        runs: Fold -> ``(run_dir, history)`` of its run (trained on split ``miniseg-fold-K``), as
            :func:`train_folds` returns them.
        data_dir: The dataset folder the runs were trained on.
        device: Where to predict.
        progress: Progress bars.

    Returns:
        The report :func:`cross_validate` writes: ``per_study`` (study id -> ``fold``,
        ``study_whole``, ``study_lesion_slices`` and ``miniseg``), ``folds`` (fold -> its run,
        epochs, best validation Dice and mean per-study Dice over lesion slices, ours and
        MiniSeg's), ``ours`` and ``miniseg`` (the :data:`PROTOCOLS` scores; per-study ones as
        ``mean`` with its BCa 95% interval ``low``/``high``, ``median``, ``min``, ``max``),
        ``without_lesion`` (studies whose lesions all vanish at the run's image size: they have no
        lesion slice, no ``study_lesion_slices``, and are left out of both columns' lesion-slice
        scores and of the paired test),
        ``paired_test`` (or ``None``, with ``paired_test_skipped`` saying why), ``protocols``,
        ``data`` (:data:`~covidseg.sources.REAL` or :data:`~covidseg.sources.PHANTOM`) and a
        ``run_card``.

    Raises:
        CheckpointError: If a run holds no usable checkpoint.
        DataError: If a run was trained on another split than its fold's, or with another model
            or image size than the other folds.
    """
    from .evaluation import predict_part

    started = time.perf_counter()
    predictions, truths, folds, config = {}, {}, {}, None
    for fold, (run, history) in sorted(runs.items()):
        part_predictions, part_truths, _, fold_config, used, data_dir = predict_part(run, data_dir, "test", device, progress=progress)
        if fold_config.split != fold_split(fold):
            raise DataError(run, f"was trained on split {fold_config.split!r}, not {fold_split(fold)!r}: it is no run of fold {fold}")
        config = config or fold_config
        if (fold_config.model, fold_config.image_size) != (config.model, config.image_size):
            raise DataError(run, f"holds a {fold_config.model} at {fold_config.image_size} px, the other folds a {config.model} "
                                 f"at {config.image_size} px: folds of one cross-validation must be the same model")
        predictions.update(part_predictions)
        truths.update(part_truths)
        folds[str(fold)] = {"run": str(run), "split": fold_config.split, "test_studies": sorted(part_predictions),
                            "epochs": len(history), "best_val_dice": max((row["val_dice"] for row in history), default=float("nan"))}
    studies = sorted(truths)
    fold_of = {i: int(key) for key, fold in folds.items() for i in fold["test_studies"]}
    lesion = {i: truths[i].any(axis=(1, 2)) for i in studies}
    # Resized below the masks' 512 px, a study's few small lesions can vanish: such a study has no
    # lesion slice to score under MiniSeg's protocol and is left out of it, in both columns.
    paired = [i for i in studies if lesion[i].any()]
    if not paired:
        raise DataError(data_dir, f"no test study keeps a lesion at {config.image_size} px; score at a larger --image-size")
    whole = evaluate_studies(predictions, truths)
    on_lesion = evaluate_studies({i: predictions[i][lesion[i]] for i in paired}, {i: truths[i][lesion[i]] for i in paired})
    miniseg = miniseg_per_study()
    per_study = {str(i): {"fold": fold_of[i], "study_whole": whole["per_study"][i]["dice"],
                          "study_lesion_slices": on_lesion["per_study"][i]["dice"] if i in on_lesion["per_study"] else None,
                          "miniseg": miniseg[i]["dice"]} for i in studies}
    for fold in folds.values():
        ids = [i for i in fold["test_studies"] if i in on_lesion["per_study"]]
        fold["ours_study_lesion_slices"] = float(np.mean([per_study[str(i)]["study_lesion_slices"] for i in ids])) if ids else None
        fold["miniseg_study_lesion_slices"] = float(np.mean([miniseg[i]["dice"] for i in ids])) if ids else None
    ours_lesion = np.array([per_study[str(i)]["study_lesion_slices"] for i in paired])
    source = data_source(data_dir)
    report = {
        "format": REPORT_FORMAT,
        "model": config.model,
        "preset": config.preset,
        "image_size": config.image_size,
        "data": source,
        "config": {key: value for key, value in config.to_dict().items() if key != "split"},
        "folds": folds,
        "per_study": per_study,
        "ours": {
            "study_lesion_slices": _distribution(ours_lesion),
            "slice_skip": whole["per_slice_dice_skip"],
            "pooled_lesion_slices": on_lesion["pooled_dice"],
            "study_whole": _distribution(np.array([per_study[str(i)]["study_whole"] for i in studies])),
            "slice_one": whole["per_slice_dice_one"],
            "pooled_whole": whole["pooled_dice"],
            "lesion_slices": whole["n_lesion_slices"],
            "lesion_slices_missed": whole["lesion_slices_missed"],
            "slices": whole["n_slices"],
        },
        "miniseg": {**_miniseg_summary(paired), "source": MINISEG_SOURCE},
        "without_lesion": [i for i in studies if i not in on_lesion["per_study"]],
        "protocols": PROTOCOLS,
        "paired_test": None,
        "paired_test_skipped": None,
    }
    if source == REAL:
        report["paired_test"] = _paired(ours_lesion, np.array([miniseg[i]["dice"] for i in paired]))
    else:
        report["paired_test_skipped"] = (f"our scores are on the {source}, MiniSeg's on real MosMedData; "
                                         "a paired test needs both on the same real studies")
    epochs = sum(fold["epochs"] for fold in folds.values())
    report["run_card"] = RunCard.describe(config, data_dir, used, epochs, time.perf_counter() - started).to_dict()
    return report


def cross_validate(config, out: str | os.PathLike, folds: Sequence[int] = FOLDS, data_dir: str | os.PathLike | None = None,
                   json_path: str | os.PathLike | None = None, progress: bool = True, devices: int | None = None) -> dict:
    """Train the chosen folds (:func:`train_folds`), score every test study out of fold
    (:func:`score_out_of_fold`) and write the report as JSON.

    Rerunning the same call after an interruption reuses the finished folds and resumes the
    unfinished one from its ``last.pt``.

    Args:
        config: The :class:`~covidseg.config.TrainConfig` (its ``split`` is set per fold).
        out: The cross-validation folder: ``OUT/fold-K`` per fold, and the report.
        folds: MiniSeg's folds to run (default all five).
        data_dir: The dataset folder (default: ``COVIDSEG_DATA`` or the phantom).
        json_path: The JSON report (default ``OUT/cross-validation.json``).
        progress: Progress bars and messages.
        devices: See :func:`train_folds`.

    Returns:
        The report of :func:`score_out_of_fold`; its run card's ``seconds`` is the wall time of
        the call (training, or reusing, and scoring).

    Raises:
        TimeBudgetSpent: If ``config.time_budget`` (minutes for the whole call, see
            :func:`train_folds`) ran out before every chosen fold had finished; nothing is scored
            or written, and the same call continues.
        DataError, RunFolderError: If ``out`` or ``json_path`` cannot take the results
            (:func:`check_out_folder`; an existing ``json_path`` that is not such a report);
            checked before any work, and nothing is changed.
        CovidsegError, KeyboardInterrupt: As :func:`train_folds`.

    Example:
        >>> report = cross_validate(get_preset("quick").replace(model="unet"), "runs/cv")  # doctest: +SKIP
    """
    started = time.perf_counter()
    folds = _checked_folds(folds)
    out = check_out_folder(out)
    json_path = out / REPORT_NAME if json_path is None else Path(json_path)
    check_output_file(json_path, REPORT_NAME, is_report)
    data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
    runs = train_folds(config, out, folds, data_dir, progress, devices)
    finished = [fold for fold in folds if fold in runs and is_finished(runs[fold][0])]
    if config.time_budget is not None and len(finished) < len(folds):
        raise TimeBudgetSpent(config.time_budget, finished, [fold for fold in folds if fold not in finished])
    if progress:
        print("scoring out of fold: the test studies of each fold predicted by its model, then the bootstrap intervals")
    report = score_out_of_fold(runs, data_dir, config.device, progress)
    report["run_card"]["seconds"] = time.perf_counter() - started  # training (or reusing) and scoring
    write_json(json_path, report)
    return report


class TimeBudgetSpent(Exception):
    """The time budget of :func:`cross_validate` ran out before every chosen fold had finished.

    Nothing is scored: out-of-fold scores need every fold. The finished folds are kept and reused
    by the next call, and an unfinished one resumes from its ``last.pt``, so the same call
    continues where this one stopped.

    Attributes:
        minutes: The budget, in minutes.
        finished: The folds that have finished training.
        unfinished: The folds that have not: stopped by the budget, or not started.
    """

    def __init__(self, minutes: float, finished: Sequence[int], unfinished: Sequence[int]):
        self.minutes, self.finished, self.unfinished = minutes, tuple(finished), tuple(unfinished)
        done = f"{_naming(self.finished)} finished" if self.finished else "no fold finished"
        super().__init__(f"the time budget of {minutes:g} min ran out before every fold had finished: {done}, "
                         f"{_naming(self.unfinished)} not yet (each keeps its last completed epoch); "
                         "nothing is scored until every fold has finished")


def _naming(folds: Sequence[int]) -> str:
    """'fold 3' or 'folds 3, 4, 5'."""
    return f"{'fold' if len(folds) == 1 else 'folds'} {', '.join(map(str, folds))}"


def is_report(path: str | os.PathLike) -> bool:
    """Whether a file may be replaced by a new report: one :func:`cross_validate` wrote (its
    ``format``), or an empty JSON object."""
    value = read_json_object(path)
    return value is not None and (value == {} or value.get("format") == REPORT_FORMAT)


# --------------------------------------------------------------------------- the table


def _interval(summary: Mapping) -> str:
    return f"{summary['mean']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def _spread(summary: Mapping) -> str:
    return f"{summary['median']:.3f} / {summary['min']:.3f} / {summary['max']:.3f}"


def format_report(report: Mapping) -> str:
    """The report as text: a line per fold, the out-of-fold scores beside MiniSeg's under the
    protocol named above each row, the paired test (or why there is none) and the run card."""
    ours, theirs = report["ours"], report["miniseg"]
    ours_label = f"{report['data']}, {report['image_size']} px"
    ours_data = "real data" if report["data"] == REAL else "phantom"  # each column says which data it is on
    lines = [
        f"cross-validation on MiniSeg's folds: {report['model']}, {report['preset']} preset, {ours_label}",
        f"{'fold':>4}  {'test studies':>12}  {'epochs':>6}  {'best val Dice':>13}  {'ours *':>7}  {'MiniSeg *':>9}  run",
    ]
    for fold, row in report["folds"].items():
        means = [f"{row[key]:.3f}" if row[key] is not None else "-" for key in ("ours_study_lesion_slices", "miniseg_study_lesion_slices")]
        lines.append(f"{fold:>4}  {len(row['test_studies']):>12}  {row['epochs']:>6}  {row['best_val_dice']:>13.3f}  "
                     f"{means[0]:>7}  {means[1]:>9}  {row['run']}")
    lines += [
        f"* mean {PROTOCOLS['study_lesion_slices']} over the fold's test studies; ours on the {report['data']}, "
        "MiniSeg's on the real data",
        "",
        f"out of fold: {len(report['per_study'])} studies, each predicted by the model of the fold that held it out",
        f"  {'':34}{f'ours ({ours_data})':>24}{'MiniSeg (real data)':>24}",
    ]
    published = "not published"
    rows = {
        "study_lesion_slices": [("mean [95% interval]", _interval(ours["study_lesion_slices"]), _interval(theirs["study_lesion_slices"])),
                                ("median / min / max", _spread(ours["study_lesion_slices"]), _spread(theirs["study_lesion_slices"]))],
        "slice_skip": [("mean", f"{ours['slice_skip']:.3f}", f"{theirs['slice_skip']:.3f}")],
        "pooled_lesion_slices": [("Dice", f"{ours['pooled_lesion_slices']:.3f}", f"{theirs['pooled_lesion_slices']:.3f}")],
        "study_whole": [("mean [95% interval]", _interval(ours["study_whole"]), published),
                        ("median / min / max", _spread(ours["study_whole"]), published)],
        "slice_one": [("mean", f"{ours['slice_one']:.3f}", published)],
        "pooled_whole": [("Dice", f"{ours['pooled_whole']:.3f}", published)],
    }
    for key, values in rows.items():
        lines.append(PROTOCOLS[key])
        lines += [f"  {label:34}{mine:>24}{other:>24}" for label, mine, other in values]
    if report["without_lesion"]:
        count = len(report["without_lesion"])
        lines.append(f"left out of the lesion-slice rows, in both columns: {count} {'study' if count == 1 else 'studies'} "
                     f"whose lesions all vanish at {report['image_size']} px ({', '.join(map(str, report['without_lesion']))})")
    lines += [
        f"lesion slices predicted empty: ours {ours['lesion_slices_missed']} of {ours['lesion_slices']}, "
        f"MiniSeg {theirs['lesion_slices_missed']} of {theirs['lesion_slices']}",
        "[95% interval]: BCa bootstrap over studies (scipy.stats.bootstrap, 9999 resamples); "
        f"{published}: MiniSeg's predictions cover only the lesion slices",
        f"ours: {ours_label} | MiniSeg: {theirs['source']}",
    ]
    if report["data"] != REAL:
        lines.append(f"NOT COMPARABLE: our scores are on the {report['data']}, MiniSeg's on real MosMedData; "
                     "its column is shown for orientation only")
    paired = report["paired_test"]
    if paired is None:
        lines.append(f"paired test not computed: {report['paired_test_skipped']}")
    else:
        lines.append(f"paired test: {paired['test']}, {paired['n']} pairs ({paired['pairs']}): "
                     f"median difference ours - MiniSeg {paired['median_difference']:+.3f}, "
                     f"statistic {paired['statistic']:.1f}, p = {paired['p_value']:.4f}")
    lines.append(str(RunCard(**report["run_card"])))
    return "\n".join(lines)
