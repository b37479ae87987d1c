"""Lesion-shape statistics of masks, the real masks' values (package data) and the phantom's targets.

A *piece* is a face-connected component of a mask: 4-connected within an axial slice, 6-connected
in 3D (scipy's default structuring element). The statistics are those that tell fragmented ground
glass from a few smooth patches: how many pieces a lesion slice holds, how many 3D pieces a study
holds and how large they are, besides the lesion burden that the phantom matches study by study.
The real values were measured on the 50 expert masks of MosMedData (CT-1 studies 255..304) at
512 x 512 pixels by ``benchmarks/phantom.py --measure-real``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources

import numpy as np
from scipy import ndimage

__all__ = ["SMALL_PIECE_VOXELS", "TARGETS", "lesion_shape_statistics", "real_mask_statistics", "within_targets"]

SMALL_PIECE_VOXELS = 50
"""A 3D piece under this many voxels counts as small (at 512 px, about 28 mm^2 times one slice)."""

TARGETS = {
    "pieces_per_lesion_slice_median": (5.0, 9.0),
    "pieces_per_study_median": (40.0, 90.0),
    "share_of_small_pieces": (0.75, 0.95),
    "lesion_percent_mean": (0.10, 0.35),
    "lesion_slice_share_mean": (0.30, 0.50),
}
"""Ranges the phantom's annotated studies must fall in at 512 px, around the real masks' values
(:func:`real_mask_statistics`): a median of 7 pieces per lesion slice, 60 3D pieces per study,
86% of pieces small, 0.19% lesion voxels and 38% lesion slices."""


def _quartiles(values) -> dict[str, float]:
    q25, median, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75]) if len(values) else (np.nan,) * 3
    return {"q25": float(q25), "median": float(median), "q75": float(q75)}


def lesion_shape_statistics(masks: Iterable[np.ndarray]) -> dict:
    """Lesion-shape statistics of a set of studies' masks.

    Args:
        masks: One array per study, shape ``(X, Y, Z)`` with Z the axial slices; nonzero is lesion.

    Returns:
        ``studies``; ``pieces_per_lesion_slice`` and ``pieces_per_study`` (quartiles ``q25``,
        ``median``, ``q75``, pooled over all lesion slices and over the studies);
        ``piece_voxels`` (quartiles and ``q90`` of the 3D pieces' sizes, pooled);
        ``share_of_small_pieces`` (pieces under :data:`SMALL_PIECE_VOXELS` voxels);
        ``lesion_percent_mean`` (mean over studies of lesion voxels, % of the volume) and
        ``lesion_slice_share_mean`` (mean share of slices holding lesion).
    """
    per_slice, per_study, sizes, percent, share = [], [], [], [], []
    for mask in masks:
        mask = np.asarray(mask) != 0
        percent.append(100.0 * mask.mean())
        has_lesion = mask.any(axis=(0, 1))
        share.append(has_lesion.mean())
        per_slice += [ndimage.label(mask[:, :, z])[1] for z in np.flatnonzero(has_lesion)]
        labels, n = ndimage.label(mask)
        per_study.append(n)
        sizes.append(np.bincount(labels.ravel())[1:])
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=int)
    voxels = _quartiles(sizes)
    voxels["q90"] = float(np.percentile(sizes, 90)) if sizes.size else float("nan")
    return {
        "studies": len(per_study),
        "pieces_per_lesion_slice": _quartiles(per_slice),
        "pieces_per_study": _quartiles(per_study),
        "piece_voxels": voxels,
        "share_of_small_pieces": float((sizes < SMALL_PIECE_VOXELS).mean()) if sizes.size else float("nan"),
        "lesion_percent_mean": float(np.mean(percent)) if percent else float("nan"),
        "lesion_slice_share_mean": float(np.mean(share)) if share else float("nan"),
    }


def _flat(stats: dict) -> dict[str, float]:
    """The figures that :data:`TARGETS` names, from :func:`lesion_shape_statistics`' output."""
    return {
        "pieces_per_lesion_slice_median": stats["pieces_per_lesion_slice"]["median"],
        "pieces_per_study_median": stats["pieces_per_study"]["median"],
        "share_of_small_pieces": stats["share_of_small_pieces"],
        "lesion_percent_mean": stats["lesion_percent_mean"],
        "lesion_slice_share_mean": stats["lesion_slice_share_mean"],
    }


def within_targets(stats: dict) -> dict[str, tuple[float, tuple[float, float], bool]]:
    """For each figure of :data:`TARGETS`: ``(value, (low, high), low <= value <= high)``."""
    flat = _flat(stats)
    return {name: (flat[name], bounds, bounds[0] <= flat[name] <= bounds[1]) for name, bounds in TARGETS.items()}


def real_mask_statistics() -> dict:
    """The statistics of the 50 real MosMedData masks at 512 px (package data
    ``covidseg/data/real_mask_statistics.json``, in the format of :func:`lesion_shape_statistics`)."""
    text = resources.files("covidseg").joinpath("data/real_mask_statistics.json").read_text(encoding="utf-8")
    return json.loads(text)["statistics"]
