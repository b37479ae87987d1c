"""Severity in MosMedData's own terms: lung and lesion volumes, percent involvement, CT-0..CT-4.

MosMedData COVID19_1110 (Morozov et al., 2020, arXiv:2005.06465) sorts its studies by the share of
lung parenchyma involved: CT-0 none, CT-1 under 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 over 75 %
(:func:`category_of`). Given a study's lesion mask and lung mask (:mod:`covidseg.lungs`),
:func:`assess` measures the volumes from the affine (a voxel is the absolute determinant of its
3x3 part) and the involvement per lung and in total; :func:`confusion_matrix` and
:func:`weighted_kappa` compare predicted categories with the registry's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .lungs import LEFT, LUNG_METHODS, RIGHT, lung_labels
from .mosmed import CATEGORIES

__all__ = [
    "SEVERITY_FORMAT",
    "is_severity_json",
    "CATEGORY_UPPER_PERCENT",
    "KAPPA_WEIGHTS",
    "Severity",
    "voxel_volume_ml",
    "category_of",
    "assess",
    "assess_files",
    "confusion_matrix",
    "weighted_kappa",
    "format_confusion",
    "check_lung_method",
    "check_severity_outputs",
    "report_severity",
]

SEVERITY_FORMAT = "covidseg-severity-1"
"""The ``format`` of the JSON ``covidseg predict --json`` writes; such a file may be replaced."""

CATEGORY_UPPER_PERCENT = {"CT-0": 0.0, "CT-1": 25.0, "CT-2": 50.0, "CT-3": 75.0, "CT-4": 100.0}
"""Upper end of each category's involvement, in percent of the lungs: CT-0 is no involvement,
CT-1 under 25 %, CT-2 25 to under 50 %, CT-3 50 to 75 %, CT-4 over 75 % (Morozov et al., 2020)."""

KAPPA_WEIGHTS = ("linear", "quadratic")
"""Weights of :func:`weighted_kappa` (Cohen, 1968)."""


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL: the absolute determinant of the affine's 3x3 part, over 1000."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def category_of(percent: float) -> str:
    """The MosMedData category of an involvement.

    Args:
        percent: Share of the lungs involved, in percent (0..100).

    Returns:
        ``'CT-0'`` for 0, ``'CT-1'`` under 25, ``'CT-2'`` under 50, ``'CT-3'`` up to 75,
        ``'CT-4'`` above 75.

    Raises:
        ValueError: For a value outside 0..100 or not a number.
    """
    percent = float(percent)
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"involvement must be a percentage in 0..100, got {percent}")
    if percent == 0.0:
        return "CT-0"
    if percent < CATEGORY_UPPER_PERCENT["CT-1"]:
        return "CT-1"
    if percent < CATEGORY_UPPER_PERCENT["CT-2"]:
        return "CT-2"
    if percent <= CATEGORY_UPPER_PERCENT["CT-3"]:
        return "CT-3"
    return "CT-4"


@dataclass(frozen=True)
class Severity:
    """The severity of one study.

    Attributes:
        lung_ml: Volume of the right lung, the left lung and both (``'right'``, ``'left'``,
            ``'total'``), in mL.
        lesion_ml: Lesion volume inside each lung and both, and ``'all'``: the whole mask,
            including any lesion voxel outside the lungs, in mL.
        involvement_percent: Lesion inside each lung over that lung's volume, and in total, in %.
        category: The MosMedData category of the total involvement (:func:`category_of`).
    """

    lung_ml: dict
    lesion_ml: dict
    involvement_percent: dict
    category: str

    def to_dict(self) -> dict:
        """The numbers as plain Python types (for JSON and CSV)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The numbers in words, one line per lung and one in total."""
        out = []
        for side in ("right", "left", "total"):
            out.append(
                f"{side:>5} lung {self.lung_ml[side]:8.1f} mL | lesion {self.lesion_ml[side]:7.1f} mL | "
                f"involvement {self.involvement_percent[side]:5.1f} %"
            )
        out.append(f"category {self.category} (MosMedData: CT-0 none, CT-1 <25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >75 %)")
        return out


def assess(lesion: np.ndarray, lungs: np.ndarray, affine: np.ndarray) -> Severity:
    """Volumes, involvement and category of a study.

    Args:
        lesion: ``(X, Y, Z)`` lesion mask (non-zero is lesion).
        lungs: ``(X, Y, Z)`` lung mask, :data:`covidseg.lungs.RIGHT` (1) and
            :data:`covidseg.lungs.LEFT` (2).
        affine: The 4x4 voxel-to-world matrix (mm) of both.

    Returns:
        The :class:`Severity`.

    Raises:
        ValueError: If the shapes differ or either lung is empty.
    """
    if lesion.shape != lungs.shape:
        raise ValueError(f"lesion mask shape {lesion.shape} differs from the lung mask's {lungs.shape}")
    voxel = voxel_volume_ml(affine)
    lesion = np.asarray(lesion) != 0
    lung_ml, lesion_ml, percent = {}, {}, {}
    for side, where in (("right", lungs == RIGHT), ("left", lungs == LEFT), ("total", lungs > 0)):
        n_lung = int(np.count_nonzero(where))
        if n_lung == 0:
            raise ValueError(f"the {side} lung is empty")
        n_lesion = int(np.count_nonzero(lesion & where))
        lung_ml[side] = n_lung * voxel
        lesion_ml[side] = n_lesion * voxel
        percent[side] = 100.0 * n_lesion / n_lung
    lesion_ml["all"] = int(np.count_nonzero(lesion)) * voxel
    return Severity(lung_ml, lesion_ml, percent, category_of(percent["total"]))


def assess_files(
    study: str | os.PathLike,
    lesion_mask: str | os.PathLike,
    method: str = "classical",
    lungs_out: str | os.PathLike | None = None,
    json_out: str | os.PathLike | None = None,
) -> Severity:
    """The severity of a study from its CT file and its lesion mask file (``covidseg predict``).

    Args:
        study: The CT study, NIfTI in HU.
        lesion_mask: Its lesion mask, on the same grid.
        method: The lung method (:data:`covidseg.lungs.LUNG_METHODS`).
        lungs_out: Where to write the lung mask (uint8, 1 right, 2 left), with the study's
            geometry.
        json_out: Where to write the numbers (:meth:`Severity.to_dict`) as JSON.

    Returns:
        The :class:`Severity`.

    Raises:
        DataError: For unreadable files or a mask off the study's grid.
        LungError: If no lungs, or not two, are found.
    """
    from .files import write_json
    from .nifti import OUTPUT_DESCRIPTION_PREFIX, check_same_grid, load_volume, save_volume

    volume = load_volume(study)
    mask = load_volume(lesion_mask)
    check_same_grid(volume, mask)
    lungs = lung_labels(volume.array, volume.affine, method, volume.path)
    severity = assess(mask.array, lungs, volume.affine)
    if lungs_out is not None:
        save_volume(lungs, volume, lungs_out, description=f"{OUTPUT_DESCRIPTION_PREFIX}lungs ({method}): 1 right, 2 left")
    if json_out is not None:
        write_json(json_out, {"format": SEVERITY_FORMAT, "study": str(volume.path), "lungs": method, **severity.to_dict()})
    return severity


def _index(categories) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(CATEGORIES)}
    try:
        return np.array([lookup[c] for c in categories], dtype=int)
    except KeyError as exc:
        raise ValueError(f"unknown category {exc.args[0]!r}; valid: {', '.join(CATEGORIES)}") from None


def confusion_matrix(reference, predicted) -> np.ndarray:
    """Counts of studies by reference (rows) and predicted (columns) category.

    Args:
        reference: Categories (``'CT-0'``..``'CT-4'``), e.g. the registry's.
        predicted: Categories of the same studies, in the same order.

    Returns:
        int ``(5, 5)`` matrix; rows and columns in the order of
        :data:`covidseg.mosmed.CATEGORIES`.

    Raises:
        ValueError: For lists of different lengths or an unknown category.
    """
    reference, predicted = list(reference), list(predicted)
    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} reference and {len(predicted)} predicted categories")
    matrix = np.zeros((len(CATEGORIES), len(CATEGORIES)), dtype=int)
    np.add.at(matrix, (_index(reference), _index(predicted)), 1)
    return matrix


def weighted_kappa(matrix: np.ndarray, weights: str = "quadratic") -> float:
    """Cohen's weighted kappa of a confusion matrix of ordered categories.

    ``kappa = 1 - sum(w * O) / sum(w * E)``, with ``O`` the observed proportions, ``E`` the
    proportions expected by chance (the outer product of the marginals) and disagreement weights
    ``w_ij = |i - j| / (k - 1)`` (linear) or ``((i - j) / (k - 1))**2`` (quadratic) (Cohen, 1968,
    Psychological Bulletin 70(4):213-220; the same as ``sklearn.metrics.cohen_kappa_score``).

    Args:
        matrix: ``(k, k)`` counts, rows one rater, columns the other.
        weights: ``'linear'`` or ``'quadratic'``.

    Returns:
        Kappa in [-1, 1]; NaN where it is undefined (no studies, or chance agreement is perfect,
        e.g. every study in one category on both sides).

    Raises:
        ValueError: For unknown weights or a matrix that is not square.
    """
    if weights not in KAPPA_WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(KAPPA_WEIGHTS)}")
    observed = np.asarray(matrix, dtype=float)
    if observed.ndim != 2 or observed.shape[0] != observed.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {observed.shape}")
    total = observed.sum()
    k = observed.shape[0]
    if total == 0 or k < 2:
        return float("nan")
    i, j = np.indices(observed.shape)
    w = np.abs(i - j) / (k - 1)
    if weights == "quadratic":
        w = w**2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    chance = float((w * expected).sum())
    if chance == 0.0:
        return float("nan")
    return 1.0 - float((w * observed).sum()) / chance


def format_confusion(matrix: np.ndarray, weights: str = "quadratic", reference: str = "registry") -> str:
    """A confusion matrix as text, with its weighted kappa and the number of studies."""
    width = 7
    lines = [f"{reference} (rows) against predicted (columns):", " " * width + "".join(f"{c:>{width}}" for c in CATEGORIES)]
    for name, row in zip(CATEGORIES, np.asarray(matrix)):
        lines.append(f"{name:>{width}}" + "".join(f"{int(v):>{width}}" for v in row))
    kappa = weighted_kappa(matrix, weights)
    shown = "undefined" if np.isnan(kappa) else f"{kappa:.3f}"
    lines.append(f"{weights} weighted kappa {shown} over {int(np.asarray(matrix).sum())} studies")
    return "\n".join(lines)


def check_lung_method(method: str) -> None:
    """Fail fast, before any prediction, when ``method`` cannot run here.

    Raises:
        ValueError: For an unknown method.
        LungError: For ``'lungmask'`` without the package (see :func:`covidseg.lungs.lungmask_lungs`).
    """
    if method not in LUNG_METHODS:
        raise ValueError(f"unknown lung method {method!r}; valid: {', '.join(LUNG_METHODS)}")
    if method == "lungmask":
        from importlib.util import find_spec

        from .lungs import LungError

        if find_spec("lungmask") is None:
            raise LungError(None, "--lungs lungmask needs the lungmask package and its weights (pip install lungmask, once online); use --lungs classical")



def check_severity_outputs(study, lesion_mask, method: str, lungs_out=None, json_out=None) -> None:
    """The cheap checks of ``covidseg predict --lungs/--lungs-out/--json``, made before any
    prediction: a usable method and output names that destroy neither the study nor the mask.

    Raises:
        DataError: For a bad output path.
        LungError, ValueError: As :func:`check_lung_method`.
    """
    from .files import check_output_file
    from .nifti import check_new_output

    check_lung_method(method)
    taken = {Path(study).resolve(), Path(lesion_mask).resolve()}
    for path, what in ((lungs_out, "--lungs-out"), (json_out, "--json")):
        if path is None:
            continue
        if Path(path).resolve() in taken:
            raise DataError(path, f"{what} names the study or the mask; writing there would destroy it")
        if Path(path).is_dir():
            raise DataError(path, f"{what} is a folder; give a file name")
    if lungs_out is not None:
        check_new_output(lungs_out, "lungs.nii.gz")
    if json_out is not None:
        check_output_file(json_out, "severity.json", is_severity_json)


def is_severity_json(path: str | os.PathLike) -> bool:
    """Whether ``--json`` may replace ``path``: a file ``covidseg predict --json`` wrote (its
    ``format`` is :data:`SEVERITY_FORMAT`), or an empty JSON object."""
    from .files import read_json_object

    value = read_json_object(path, max_bytes=1 << 20)
    return value is not None and (value == {} or value.get("format") == SEVERITY_FORMAT)


def report_severity(study, lesion_mask, method: str = "classical", lungs_out=None, json_out=None) -> Severity | None:
    """Print a predicted study's severity (:func:`assess_files`), as ``covidseg predict`` does.

    Where no lungs are found and neither ``lungs_out`` nor ``json_out`` was asked for, one warning
    line says so and ``None`` is returned; otherwise the error is raised.

    Raises:
        LungError: If no lungs are found and an output was asked for.
    """
    from .lungs import LungError

    try:
        severity = assess_files(study, lesion_mask, method, lungs_out, json_out)
    except LungError as exc:
        if lungs_out is None and json_out is None:
            print(f"covidseg: warning: {exc}; involvement not computed", file=sys.stderr)
            return None
        raise
    print("\n".join(severity.lines()))
    for path, what in ((lungs_out, "lung mask (1 right, 2 left)"), (json_out, "numbers")):
        if path is not None:
            print(f"{what} written to {path}")
    return severity
