"""Study-level splits of the 50 annotated studies, shipped with the package.

Slices of one patient never appear in two parts of a split: a split is a list of *study ids*,
and slicing happens afterwards (see :class:`covidseg.dataset.SliceDataset`).

- ``thesis``: 35/5/10 studies for train/validation/test. The thesis (Table 3.1) reports
  1428/212/409 slices; these ids give exactly those counts with the real masks. Many splits do;
  this one was found by a seeded search (``random.Random(2021)`` shuffles of the 50 ids, the first
  whose real slice counts match).
- ``miniseg-fold-1`` .. ``miniseg-fold-5``: the 5-fold cross-validation of MiniSeg (Qiu et al.,
  AAAI 2021), whose test folds are published with its predictions. Validation is the next fold,
  training the remaining three, so every study is tested exactly once across the five folds.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

from .mosmed import ANNOTATED_IDS

__all__ = ["Split", "SPLIT_NAMES", "THESIS_SLICES", "get_split", "slice_counts", "mask_facts"]

THESIS_SLICES = {"train": 1428, "val": 212, "test": 409}
"""Slices per part in the thesis' Table 3.1."""

_THESIS_VAL = (260, 267, 270, 276, 278)
_THESIS_TEST = (256, 261, 262, 265, 279, 280, 290, 295, 300, 301)

MINISEG_FOLDS = (
    (258, 259, 261, 263, 269, 276, 281, 283, 293, 301),
    (256, 262, 267, 268, 271, 275, 280, 286, 299, 300),
    (257, 265, 270, 272, 273, 274, 278, 282, 288, 302),
    (264, 266, 277, 279, 287, 291, 292, 295, 296, 297),
    (255, 260, 284, 285, 289, 290, 294, 298, 303, 304),
)
"""MiniSeg's test studies of folds 1..5 (``CrossVal1`` .. ``CrossVal5``)."""

SPLIT_NAMES = ("thesis",) + tuple(f"miniseg-fold-{k}" for k in range(1, 6))


@dataclass(frozen=True)
class Split:
    """Study ids of the three parts of a split.

    Attributes:
        name: The split's name, one of :data:`SPLIT_NAMES`.
        train: Training study ids.
        val: Validation study ids (early stopping watches these).
        test: Test study ids (reported once, at the end).
    """

    name: str
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def part(self, name: str) -> tuple[int, ...]:
        """The ids of part ``'train'``, ``'val'`` or ``'test'``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown part {name!r}; valid parts: train, val, test")
        return getattr(self, name)

    def slices(self) -> dict[str, int]:
        """Slices per part, from the real masks' slice counts."""
        counts = slice_counts()
        return {part: sum(counts[i] for i in self.part(part)) for part in ("train", "val", "test")}


def get_split(name: str = "thesis") -> Split:
    """Return a named split.

    Args:
        name: ``'thesis'`` or ``'miniseg-fold-K'`` for K in 1..5.

    Raises:
        ValueError: For an unknown name, listing the valid ones.
    """
    if name == "thesis":
        held_out = set(_THESIS_VAL) | set(_THESIS_TEST)
        train = tuple(i for i in ANNOTATED_IDS if i not in held_out)
        return Split(name, train, _THESIS_VAL, _THESIS_TEST)
    if name in SPLIT_NAMES:
        k = int(name.rsplit("-", 1)[1]) - 1
        test, val = MINISEG_FOLDS[k], MINISEG_FOLDS[(k + 1) % 5]
        held_out = set(test) | set(val)
        return Split(name, tuple(i for i in ANNOTATED_IDS if i not in held_out), val, test)
    raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLIT_NAMES)}")


@functools.lru_cache(maxsize=1)
def mask_facts() -> dict[int, dict[str, float]]:
    """Per-study facts measured on the 50 real masks: ``slices``, ``lesion_slices`` and
    ``lesion_percent`` (lesion voxels as a percentage of the study's voxels)."""
    text = resources.files("covidseg").joinpath("data/ct1_mask_facts.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {
        int(r["study_id"]): {
            "slices": int(r["slices"]),
            "lesion_slices": int(r["lesion_slices"]),
            "lesion_percent": float(r["lesion_percent"]),
        }
        for r in rows
    }


def slice_counts() -> dict[int, int]:
    """Axial slices of each annotated study in the real data (2049 in all)."""
    return {i: int(f["slices"]) for i, f in mask_facts().items()}
