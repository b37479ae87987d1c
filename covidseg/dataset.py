"""A PyTorch dataset of axial (slice, mask) pairs, built from a list of studies.

Each study is decoded once, brought to the model's input by the steps prediction takes too
(:func:`covidseg.preprocessing.hu_to_slices`, :func:`~covidseg.preprocessing.mask_to_slices`), and
kept in memory as one contiguous ``(Z, H, W)`` array; items are views into it, so no ``.nii.gz`` is
decoded per item and only one copy of the preprocessed volumes exists. With
``cache_dir`` the preprocessed arrays are also stored as ``.npy`` files and memory-mapped on later
runs, which skips decoding altogether.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .mosmed import Study
from .errors import DataError
from .files import atomic_write
from .nifti import check_same_grid, load_volume
from .preprocessing import check_binary_mask, check_hu_range, hu_to_slices, mask_to_slices

__all__ = ["StudySlices", "SliceDataset", "load_study_slices"]

_CACHE_VERSION = 1


@dataclass(frozen=True)
class StudySlices:
    """One study, preprocessed and sliced.

    Attributes:
        study: The study it came from.
        images: float32 ``(Z, H, W)``: axial slice ``k`` is ``images[k]`` (H runs to the patient's
            left, W to anterior, as in :data:`covidseg.nifti.WORKING_ORIENTATION`).
        masks: uint8 ``(Z, H, W)`` in {0, 1}, or ``None`` for an unannotated study.
    """

    study: Study
    images: np.ndarray
    masks: np.ndarray | None


def load_study_slices(study: Study, image_size: int | None = None, require_mask: bool = True) -> StudySlices:
    """Decode, check, preprocess and slice one study.

    Raises:
        DataError: For unreadable files, a non-HU volume, a mask off the study's grid or with values
            other than 0 and 1, or a missing mask when ``require_mask``.
    """
    volume = load_volume(study.image)
    check_hu_range(volume.array, study.image)
    masks = None
    if study.mask is not None:
        mask = load_volume(study.mask)
        check_same_grid(volume, mask)
        masks = mask_to_slices(check_binary_mask(mask.array, study.mask), image_size)
    elif require_mask:
        raise DataError(study.image, "study has no mask, but an annotated study is required")
    return StudySlices(study, hu_to_slices(volume.array, image_size), masks)


class SliceDataset(Dataset):
    """Axial slices of a list of studies, as ``(image, mask)`` float32 tensors of shape ``(1, H, W)``.

    Args:
        studies: The studies, typically ``annotated_studies(root, split.train)``.
        image_size: Resize slices to this square size (``None`` keeps the native size).
        cache_dir: Optional folder for preprocessed ``.npy`` arrays, memory-mapped on reuse.
        progress: Show a progress bar while decoding.

    Shape:
        - image: ``(1, H, W)`` float32 in [-1, 1] (HU / 1000).
        - mask: ``(1, H, W)`` float32 in {0, 1}.
    """

    def __init__(
        self,
        studies: Sequence[Study],
        image_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ):
        self.image_size = image_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.studies: list[StudySlices] = [
            self._load(study) for study in tqdm(list(studies), desc="decoding studies", disable=not progress, leave=False)
        ]
        counts = np.array([s.images.shape[0] for s in self.studies], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.slice_counts = {s.study.study_id: int(c) for s, c in zip(self.studies, counts)}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(study position, slice index)`` of a dataset index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        index %= len(self)
        position = int(np.searchsorted(self._starts, index, side="right")) - 1
        return position, index - int(self._starts[position])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        position, k = self.locate(index)
        entry = self.studies[position]
        image = torch.from_numpy(np.array(entry.images[k], dtype=np.float32, copy=True))[None]
        mask = torch.from_numpy(entry.masks[k].astype(np.float32))[None]
        return image, mask

    def _load(self, study: Study) -> StudySlices:
        if self.cache_dir is None:
            return load_study_slices(study, self.image_size)
        key = self._cache_key(study)
        image_file = self.cache_dir / f"{study.name}-{key}-image.npy"
        mask_file = self.cache_dir / f"{study.name}-{key}-mask.npy"
        if image_file.is_file() and mask_file.is_file():
            try:
                return StudySlices(study, np.load(image_file, mmap_mode="r"), np.load(mask_file, mmap_mode="r"))
            except (OSError, ValueError):  # a damaged cache file: decode the study again and rewrite it
                pass
        loaded = load_study_slices(study, self.image_size)
        for target, array in ((image_file, loaded.images), (mask_file, loaded.masks)):
            try:
                with atomic_write(target, "wb") as handle:
                    np.save(handle, array)
            except OSError as exc:
                raise DataError(target, f"could not be written to the cache ({exc.strerror or exc})") from None
        return loaded

    def _cache_key(self, study: Study) -> str:
        """Changes whenever the source files, the size or the preprocessing change."""
        parts = [str(_CACHE_VERSION), str(self.image_size)]
        for path in (study.image, study.mask):
            if path is None:
                continue
            stat = Path(path).stat()
            parts += [str(Path(path).resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
