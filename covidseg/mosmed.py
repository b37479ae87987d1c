"""The MosMedData COVID19_1110 folder layout: finding studies, their category and their mask.

The dataset (Morozov et al., 2020, arXiv:2005.06465) is laid out as::

    dataset_registry.csv
    studies/CT-0/study_0001.nii.gz ... studies/CT-4/study_1110.nii.gz
    masks/study_0255_mask.nii.gz   ... masks/study_0304_mask.nii.gz

The phantom (:mod:`covidseg.phantom`) writes exactly this layout, so real and synthetic data are
read by the same code.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .files import atomic_write

__all__ = [
    "CATEGORIES",
    "CATEGORY_COUNTS",
    "ANNOTATED_IDS",
    "REGISTRY_NAME",
    "Study",
    "study_path",
    "mask_path",
    "discover_studies",
    "annotated_studies",
    "write_registry",
    "read_registry",
]

CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
"""Severity categories: CT-0 normal, CT-1 under 25% of lung parenchyma involved, CT-2 25-50%,
CT-3 50-75%, CT-4 over 75%."""

CATEGORY_COUNTS = {"CT-0": 254, "CT-1": 684, "CT-2": 125, "CT-3": 45, "CT-4": 2}
"""Studies per category in the full dataset (1110 in all)."""

ANNOTATED_IDS = tuple(range(255, 305))
"""The 50 CT-1 studies with expert masks (ground-glass opacification and consolidation)."""

REGISTRY_NAME = "dataset_registry.csv"
REGISTRY_COLUMNS = ("study_id", "category", "study_file", "mask_file")


@dataclass(frozen=True)
class Study:
    """One CT study of the dataset.

    Attributes:
        study_id: The number in ``study_NNNN``.
        category: One of :data:`CATEGORIES`.
        image: Path of the CT volume.
        mask: Path of the expert mask, or ``None`` for an unannotated study.
    """

    study_id: int
    category: str
    image: Path
    mask: Path | None = None

    @property
    def name(self) -> str:
        """``study_NNNN``."""
        return f"study_{self.study_id:04d}"


def study_path(root: str | os.PathLike, study_id: int, category: str) -> Path:
    """Where a study's CT volume lives under a dataset root."""
    return Path(root) / "studies" / category / f"study_{study_id:04d}.nii.gz"


def mask_path(root: str | os.PathLike, study_id: int) -> Path:
    """Where a study's mask lives under a dataset root."""
    return Path(root) / "masks" / f"study_{study_id:04d}_mask.nii.gz"


def discover_studies(root: str | os.PathLike) -> list[Study]:
    """Find the studies of a MosMedData folder.

    The registry, when present, is the source of truth, and every file it names must exist.
    Without a registry, the ``studies/CT-k`` folders are scanned. Each mask must belong to a
    study, and every study with a mask file is returned with it.

    Args:
        root: The dataset folder (holding ``studies/`` and ``masks/``).

    Returns:
        The studies, sorted by id.

    Raises:
        DataError: If the folder is missing or empty, the registry is malformed or names
            missing files, a study appears twice, or a mask has no study.
    """
    root = Path(root)
    if root.is_file():
        raise DataError(root, "is a file; give the MosMedData folder (the one holding studies/ and masks/)")
    if not root.is_dir():
        raise DataError(root, "data folder not found")
    registry = root / REGISTRY_NAME
    studies = _read_registry(registry, root) if registry.is_file() else _scan(root)
    if not studies:
        inner = sorted(p.parent.parent for p in root.glob("*/studies/CT-*") if p.is_dir())
        hint = f"; did you mean {inner[0]}?" if inner else ""
        raise DataError(root, f"no MosMedData studies found (expected studies/CT-k/study_NNNN.nii.gz){hint}")
    seen: dict[int, Study] = {}
    for study in studies:
        if study.study_id in seen:
            raise DataError(study.image, f"study {study.study_id} appears twice (also {seen[study.study_id].image})")
        seen[study.study_id] = study
    known = {s.study_id for s in studies}
    for orphan in sorted((root / "masks").glob("study_*_mask.nii.gz")):
        if _parse_id(orphan.name.removesuffix("_mask.nii.gz")) not in known:
            raise DataError(orphan, "mask has no matching study in studies/")
    return studies


def annotated_studies(root: str | os.PathLike, ids=None) -> list[Study]:
    """The annotated studies of a dataset folder, optionally restricted to ``ids`` (in that order).

    Raises:
        DataError: If a requested study, or the mask of an annotated (CT-1, 0255..0304) study,
            is missing.
    """
    by_id = {s.study_id: s for s in discover_studies(root)}
    wanted = list(ANNOTATED_IDS if ids is None else ids)
    found = []
    for study_id in wanted:
        study = by_id.get(study_id)
        if study is None:
            raise DataError(study_path(root, study_id, "CT-1"), "annotated study not found")
        if study.mask is None:
            raise DataError(mask_path(root, study_id), "mask of an annotated study is missing")
        found.append(study)
    return found


def write_registry(root: str | os.PathLike, studies: list[Study]) -> Path:
    """Write ``dataset_registry.csv`` in MosMedData's own format (paths relative to ``root``,
    starting with ``/``)."""
    root = Path(root)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(REGISTRY_COLUMNS)
    for s in sorted(studies, key=lambda s: s.study_id):
        rel = lambda p: "/" + p.relative_to(root).as_posix() if p is not None else ""  # noqa: E731
        writer.writerow([s.study_id, s.category, rel(s.image), rel(s.mask)])
    target = root / REGISTRY_NAME
    with atomic_write(target, "wb") as handle:
        handle.write(("\ufeff" + buffer.getvalue()).encode("utf-8"))
    return target


def read_registry(registry: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[int, Study]]:
    """The rows of a ``dataset_registry.csv``, without checking that the files they name exist.

    Args:
        registry: The registry file.
        root: The dataset folder its paths are relative to (default: the registry's folder).

    Returns:
        ``(line, study)`` for every non-blank row, in the file's order.

    Raises:
        DataError: If the registry is unreadable or malformed.
    """
    registry = Path(registry)
    root = registry.parent if root is None else Path(root)
    try:
        text = registry.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(registry, f"unreadable registry ({exc})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(c.strip() for c in rows[0]) != REGISTRY_COLUMNS:
        raise DataError(registry, f"registry header must be {','.join(REGISTRY_COLUMNS)}")
    studies = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 4:
            raise DataError(registry, f"line {line}: expected 4 columns, found {len(row)}")
        sid, category, image, mask = (cell.strip() for cell in row)
        if not sid.isdigit() or category not in CATEGORIES:
            raise DataError(registry, f"line {line}: bad study id {sid!r} or category {category!r}")
        studies.append((line, Study(int(sid), category, root / image.lstrip("/"), root / mask.lstrip("/") if mask else None)))
    return studies


def _read_registry(registry: Path, root: Path) -> list[Study]:
    studies = []
    for line, study in read_registry(registry, root):
        for path in (study.image, study.mask):
            if path is not None and not path.is_file():
                raise DataError(path, f"named by {REGISTRY_NAME} line {line} but missing")
        studies.append(study)
    return sorted(studies, key=lambda s: s.study_id)


def _scan(root: Path) -> list[Study]:
    studies = []
    for category in CATEGORIES:
        for image in sorted((root / "studies" / category).glob("study_*.nii.gz")):
            study_id = _parse_id(image.name.removesuffix(".nii.gz"))
            if study_id is None:
                continue
            mask = mask_path(root, study_id)
            studies.append(Study(study_id, category, image, mask if mask.is_file() else None))
    return sorted(studies, key=lambda s: s.study_id)


def _parse_id(stem: str) -> int | None:
    number = stem.removeprefix("study_")
    return int(number) if number.isdigit() else None
