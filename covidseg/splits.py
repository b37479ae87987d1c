"""Study-level splits of the 50 annotated studies, shipped with the package.

Slices of one patient never appear in two parts of a split: a split is a list of *study ids*,
and slicing happens afterwards (see :class:`covidseg.dataset.SliceDataset`).

- ``thesis``: a *reconstruction* of the thesis' 35/5/10 split; the thesis does not list its
  study ids. It meets every constraint the thesis gives: 35/5/10 studies, Table 3.1's
  1428/212/409 slices, and a test study of 40 slices (the thesis' prediction figures show one;
  only studies 271 and 299 have 40 slices). Many splits meet them; this one is the first found by
  :func:`reconstruct_thesis_split`, a deterministic search in lexicographic order (no random
  numbers): the test part is the first 10-subset of the ids, in ``itertools.combinations`` order,
  with 409 slices, a 40-slice study, and 5 remaining studies of 212 slices; validation is the
  first such 5-subset of the rest; training is what remains (1428 slices).
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

__all__ = [
    "Split",
    "SPLIT_NAMES",
    "THESIS_SLICES",
    "THESIS_TEST_STUDY_SLICES",
    "get_split",
    "slice_counts",
    "mask_facts",
    "reconstruct_thesis_split",
]

THESIS_SLICES = {"train": 1428, "val": 212, "test": 409}
"""Slices per part in the thesis' Table 3.1."""

THESIS_TEST_STUDY_SLICES = 40
"""Slices of the test study in the thesis' prediction figures (its axis runs to 40 slices)."""

# The output of reconstruct_thesis_split() on the shipped slice counts (tests/test_splits.py
# reruns the search and checks every constraint).
_THESIS_VAL = (261, 263, 264, 265, 269)
_THESIS_TEST = (255, 256, 257, 258, 259, 260, 262, 271, 281, 288)

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


def _first_subset(pool, k, target, counts, accept=lambda subset: True):
    """The first ``k``-subset of ``pool`` in ``itertools.combinations`` order whose slice counts
    sum to ``target`` and that ``accept`` admits, or ``None``. A depth-first walk in the same
    order, pruned where no ``k`` studies can reach ``target``."""
    low, high = min(counts.values()), max(counts.values())

    def walk(start, chosen, remaining, left):
        if left == 0:
            return tuple(chosen) if remaining == 0 and accept(tuple(chosen)) else None
        if not left * low <= remaining <= left * high:
            return None
        for j in range(start, len(pool) - left + 1):
            found = walk(j + 1, chosen + [pool[j]], remaining - counts[pool[j]], left - 1)
            if found:
                return found
        return None

    return walk(0, [], target, k)


def reconstruct_thesis_split(counts: dict[int, int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Search for a 35/5/10 split that meets every constraint the thesis states.

    Constraints: 10 test studies with ``THESIS_SLICES["test"]`` slices, at least one of them with
    ``THESIS_TEST_STUDY_SLICES`` slices, and 5 validation studies with ``THESIS_SLICES["val"]``
    slices (training then has the rest). The search is deterministic: the test part is the first
    admissible 10-subset of the sorted ids in ``itertools.combinations`` order, validation the
    first admissible 5-subset of the remaining ids in the same order.

    Args:
        counts: Slices per study id; the real masks' (:func:`slice_counts`) by default.

    Returns:
        ``(val, test)``: the study ids of the two held-out parts, sorted.

    Raises:
        ValueError: If no split meets the constraints.
    """
    counts = slice_counts() if counts is None else counts
    ids = sorted(counts)

    def rest(test):
        return [i for i in ids if i not in test]

    def admissible(test):
        has_study = any(counts[i] == THESIS_TEST_STUDY_SLICES for i in test)
        return has_study and _first_subset(rest(test), 5, THESIS_SLICES["val"], counts) is not None

    test = _first_subset(ids, 10, THESIS_SLICES["test"], counts, admissible)
    if test is None:
        raise ValueError("no 35/5/10 split of these slice counts meets the thesis' constraints")
    return _first_subset(rest(test), 5, THESIS_SLICES["val"], counts), test
