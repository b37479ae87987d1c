"""Screening a folder of studies: lungs, lesions, involvement and category for each, in one CSV.

``covidseg screen DATA --run R --out OUT.csv`` predicts every study of a MosMedData folder (the
registry's studies, with their category) or every NIfTI file of a folder, and writes one row per
study (:data:`COLUMNS`). A study that cannot be screened (an unreadable file, a file the registry
names but that is missing, a study without lungs, a failed lung split) gets a row with its error,
and the rest are still screened.

Resuming: rows are appended to a part file beside ``OUT`` as each study finishes
(``OUT.part0.csv``, one per rank); a rerun reads ``OUT`` and every part file and screens only the
studies without a row. At the end the rows are merged, sorted by study, into ``OUT`` (written
atomically) and the part files are removed. A study whose row holds an error counts as done; delete
its row to screen it again.

Scale-out: under ``torchrun --nproc_per_node N -m covidseg screen DATA --model-run R --out OUT``
(torchrun reads ``--run`` as an abbreviation of its own ``--run-path``, so the run is given by
the flag's other name, ``--model-run``) each rank (``RANK`` of
``WORLD_SIZE``, from torchrun's environment) takes every N-th study still to do, on its own GPU
(``cuda:LOCAL_RANK``) where there are GPUs, and writes its own part file; torch.distributed (gloo)
only synchronises the ranks, and rank 0 merges. The merged CSV equals that of one process, except
for the ``seconds`` column.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from .errors import CovidsegError, DataError
from .mosmed import CATEGORIES, REGISTRY_NAME, discover_studies, read_registry
from .severity import confusion_matrix, format_confusion

__all__ = [
    "COLUMNS",
    "KAPPA",
    "DIST_TIMEOUT",
    "Entry",
    "list_studies",
    "read_rows",
    "screen",
    "ScreenSummary",
]

COLUMNS = (
    "study",
    "file",
    "registry_category",
    "lung_ml_right",
    "lung_ml_left",
    "lung_ml_total",
    "lesion_ml_right",
    "lesion_ml_left",
    "lesion_ml_total",
    "lesion_ml_all",
    "involvement_percent_right",
    "involvement_percent_left",
    "involvement_percent_total",
    "predicted_category",
    "seconds",
    "error",
)
"""Columns of the screening CSV: volumes in mL, involvement in percent of each lung and of both,
``lesion_ml_all`` the whole predicted mask (lesion outside the lungs included)."""

KAPPA = "quadratic"
"""Weights of the kappa printed under the confusion matrix (:func:`covidseg.severity.weighted_kappa`)."""

DIST_TIMEOUT = timedelta(hours=6)
"""How long a rank waits for the others at a synchronisation point before giving up."""

_DECIMALS = 3


@dataclass(frozen=True)
class Entry:
    """One study to screen.

    Attributes:
        study: Its name in the CSV (``study_NNNN``, or the file's path relative to the folder).
        path: The CT file.
        category: The registry's category, or ``''`` where there is none.
        problem: Why it cannot be screened before it is even read (e.g. a missing file), or ``''``.
    """

    study: str
    path: Path
    category: str = ""
    problem: str = ""


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith("."))


def list_studies(data: str | os.PathLike) -> list[Entry]:
    """The studies of a MosMedData folder, or the NIfTI files of any folder, sorted by name.

    A MosMedData folder's registry, when present, names the studies and their categories; a file it
    names that is missing becomes an :class:`Entry` with a ``problem``. Without a registry, the
    ``studies/CT-k`` folders give the categories; anything else is a folder of NIfTI files (masks
    named ``*_mask.nii.gz`` are left out), searched recursively.

    Raises:
        DataError: If ``data`` is not a folder, holds no study, or its registry is malformed.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(data, "not a folder; give a MosMedData folder or a folder of NIfTI files")
    registry = data / REGISTRY_NAME
    if registry.is_file():
        entries = []
        for line, study in read_registry(registry, data):
            missing = "" if study.image.is_file() else f"named by {REGISTRY_NAME} line {line} but missing"
            entries.append(Entry(study.name, study.image, study.category, missing))
    elif any((data / "studies" / c).is_dir() for c in CATEGORIES):
        entries = [Entry(s.name, s.image, s.category) for s in discover_studies(data)]
    else:
        files = [p for p in _nifti_files(data) if not p.name.lower().endswith(("_mask.nii.gz", "_mask.nii"))]
        entries = [Entry(p.relative_to(data).as_posix(), p) for p in files]
    if not entries:
        raise DataError(data, "no studies found (expected a MosMedData folder or .nii/.nii.gz files)")
    names = [e.study for e in entries]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataError(data, f"study {duplicate} appears twice")
    return sorted(entries, key=lambda e: e.study)


def _part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*.csv"))


def read_rows(path: str | os.PathLike) -> dict[str, dict]:
    """The complete rows of a screening CSV, by study; a row cut short by a kill is left out.

    Raises:
        DataError: If the file is not a screening CSV (another header).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable ({exc})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return {}
    if tuple(rows[0]) != COLUMNS:
        raise DataError(path, f"not a screening CSV of this version (its header differs from {','.join(COLUMNS[:3])},...); choose another --out")
    complete = text.endswith("\n")
    body = rows[1:] if complete else rows[1:-1]
    return {row[0]: dict(zip(COLUMNS, row)) for row in body if len(row) == len(COLUMNS)}


def _format(value) -> str:
    return f"{value:.{_DECIMALS}f}" if isinstance(value, float) else str(value)


def _row(entry: Entry, severity=None, seconds: float = 0.0, error: str = "") -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(study=entry.study, file=str(entry.path), registry_category=entry.category, seconds=f"{seconds:.1f}", error=error)
    if severity is not None:
        for side in ("right", "left", "total"):
            row[f"lung_ml_{side}"] = _format(severity.lung_ml[side])
            row[f"lesion_ml_{side}"] = _format(severity.lesion_ml[side])
            row[f"involvement_percent_{side}"] = _format(severity.involvement_percent[side])
        row["lesion_ml_all"] = _format(severity.lesion_ml["all"])
        row["predicted_category"] = severity.category
    return row


def _csv_text(rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


class _PartFile:
    """A rank's part file: complete rows appended one ``write`` at a time, flushed to disk."""

    def __init__(self, path: Path):
        self.path = path
        kept = read_rows(path)
        from .files import atomic_write

        with atomic_write(path) as handle:  # drop a row a kill cut short
            handle.write(",".join(COLUMNS) + "\n" + _csv_text(kept.values()))
        self.handle = open(path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self.handle.write(_csv_text([row]))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _screen_one(entry: Entry, model, config, lungs: str, batch_size: int):
    from .lungs import lung_labels
    from .nifti import load_volume
    from .prediction import predict_study
    from .preprocessing import check_hu_range
    from .severity import assess

    volume = load_volume(entry.path)
    check_hu_range(volume.array, volume.path)
    lung_mask = lung_labels(volume.array, volume.affine, lungs, volume.path)  # cheap: before the model
    lesion = predict_study(model, volume.array, config.image_size, batch_size)
    return assess(lesion, lung_mask, volume.affine)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CovidsegError):
        return exc.problem
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


@dataclass(frozen=True)
class ScreenSummary:
    """What a screening run did.

    Attributes:
        out: The merged CSV (written by rank 0 only).
        screened: Studies screened in this run (by all ranks on rank 0, by this rank on the others).
        skipped: Studies that already had a row.
        errors: Rows (all ranks, all runs) with an error.
        matrix: Registry (rows) against predicted (columns) counts, over the rows with both.
        report: The confusion matrix and kappa as text (rank 0; empty on the other ranks).
    """

    out: Path
    screened: int
    skipped: int
    errors: int
    matrix: np.ndarray
    report: str


def _distributed():
    """``(rank, world_size, local_rank)`` from torchrun's environment, the process group set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=DIST_TIMEOUT)
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _device_for(device: str, local_rank: int, world: int) -> str:
    import torch

    if device == "auto" and world > 1 and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def screen(
    data: str | os.PathLike,
    run: str | os.PathLike,
    out: str | os.PathLike,
    lungs: str = "classical",
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    only=None,
) -> ScreenSummary:
    """Screen every study of ``data`` into ``out`` (see the module's notes), resuming earlier runs.

    Args:
        data: A MosMedData folder or a folder of NIfTI studies in HU.
        run: A training run (``covidseg train --out``).
        out: The CSV to write (:data:`COLUMNS`).
        lungs: The lung method (:data:`covidseg.lungs.LUNG_METHODS`).
        device: ``'auto'``, ``'cpu'``, ``'cuda'``...; under torchrun ``'auto'`` gives each rank its
            own GPU.
        batch_size: Slices per forward pass.
        progress: Show a progress bar (each rank its own).
        only: Screen only these studies (names as in the CSV's ``study`` column); default all.

    Returns:
        The :class:`ScreenSummary`.

    Raises:
        DataError: If ``data`` holds no studies or ``out`` cannot be written or is another file.
        CheckpointError: For a bad run.
    """
    from tqdm.auto import tqdm

    from .prediction import load_trained_model
    from .severity import check_lung_method

    out = Path(out)
    if out.is_dir():
        raise DataError(out, "is a folder; give a file name such as screening.csv")
    check_lung_method(lungs)
    entries = list_studies(data)
    if only is not None:
        wanted = set(only)
        unknown = sorted(wanted - {e.study for e in entries})
        if unknown:
            raise DataError(data, f"no study named {', '.join(unknown[:3])} here")
        entries = [e for e in entries if e.study in wanted]
    rank, world, local = _distributed()
    done = read_rows(out)
    for part in _part_files(out):
        done.update(read_rows(part))
    _barrier(world)  # every rank has read what is done before any rank writes
    todo = [e for e in entries if e.study not in done][rank::world]
    skipped = sum(e.study in done for e in entries)
    screened = 0
    if todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        model, config = load_trained_model(run, _device_for(device, local, world))
        part = _PartFile(out.with_name(f"{out.name}.part{rank}.csv"))
        prefix = f"rank {rank}: " if world > 1 else ""
        try:
            with tqdm(todo, desc=f"{prefix}screening", unit="study", disable=not progress, position=rank) as bar:
                for entry in bar:
                    start = time.perf_counter()
                    severity, error = None, entry.problem
                    if not error:
                        try:
                            severity = _screen_one(entry, model, config, lungs, batch_size)
                        except Exception as exc:  # noqa: BLE001 - a bad study is a row, not a stopped run
                            error = _error_text(exc)
                    if error:
                        tqdm.write(f"covidseg: warning: {entry.path}: {error}", file=sys.stderr)
                    part.append(_row(entry, severity, time.perf_counter() - start, error))
                    screened += 1
        finally:
            part.close()
    _barrier(world)
    if rank != 0:
        return ScreenSummary(out, screened, skipped, 0, np.zeros((len(CATEGORIES),) * 2, dtype=int), "")
    return _merge(out, entries, skipped)


def _merge(out: Path, entries: list[Entry], skipped: int) -> ScreenSummary:
    """Rank 0: merge ``out`` and the part files into ``out``, sorted by study; remove the parts."""
    from .files import atomic_write

    parts = _part_files(out)
    rows = read_rows(out)
    for part in parts:
        rows.update(read_rows(part))
    order = {e.study: i for i, e in enumerate(entries)}
    merged = sorted(rows.values(), key=lambda r: (order.get(r["study"], len(order)), r["study"]))
    with atomic_write(out) as handle:
        handle.write(",".join(COLUMNS) + "\n" + _csv_text(merged))
    for part in parts:
        part.unlink(missing_ok=True)
    known = [r for r in merged if r["registry_category"] and r["predicted_category"]]
    matrix = confusion_matrix([r["registry_category"] for r in known], [r["predicted_category"] for r in known])
    errors = sum(bool(r["error"]) for r in merged)
    report = format_confusion(matrix, KAPPA) if known else "no study with both a registry and a predicted category: no confusion matrix"
    return ScreenSummary(out, len(merged) - skipped, skipped, errors, matrix, report)
