"""A PyTorch dataset of axial (slice, mask) pairs, built from a list of studies.

Each study is decoded once, preprocessed (:func:`covidseg.preprocessing.preprocess_hu`), optionally
resized, and kept in memory as one contiguous ``(Z, H, W)`` array; items are views into it, so no
``.nii.gz`` is decoded per item and only one copy of the preprocessed volumes exists. With
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
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .mosmed import Study
from .errors import DataError
from .files import atomic_write
from .nifti import check_same_grid, load_volume
from .preprocessing import check_binary_mask, check_hu_range, preprocess_hu

__all__ = ["StudySlices", "SliceDataset", "load_study_slices", "to_slices", "from_slices", "resize_slices"]

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


def to_slices(array: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` volume to a contiguous ``(Z, X, Y)`` stack of axial slices."""
    return np.ascontiguousarray(np.moveaxis(array, 2, 0))


def from_slices(stack: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_slices`: ``(Z, X, Y)`` back to ``(X, Y, Z)``."""
    return np.moveaxis(stack, 0, 2)


def resize_slices(stack: np.ndarray, size: int | tuple[int, int], mode: str) -> np.ndarray:
    """Resize every slice of a ``(Z, H, W)`` stack in-plane.

    Args:
        stack: The slices.
        size: Target ``(H, W)``, or one int for a square.
        mode: ``'bilinear'`` for images and probabilities (anti-aliased when shrinking) or
            ``'mask'`` for binary masks (area-weighted, then thresholded at 0.5).

    Returns:
        float32 for ``'bilinear'``, uint8 for ``'mask'``.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if stack.shape[1:] == size:
        return stack if mode != "mask" else stack.astype(np.uint8, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    if mode == "mask":
        shrink = size[0] < stack.shape[1]
        out = F.interpolate(tensor, size=size, mode="area" if shrink else "bilinear", align_corners=None if shrink else False)
        return (out[:, 0].numpy() >= 0.5).astype(np.uint8)
    shrink = size[0] < stack.shape[1]
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].numpy()


def load_study_slices(study: Study, image_size: int | None = None, require_mask: bool = True) -> StudySlices:
    """Decode, check, preprocess and slice one study.

    Raises:
        DataError: For unreadable files, a non-HU volume, a mask off the study's grid or with values
            other than 0 and 1, or a missing mask when ``require_mask``.
    """
    volume = load_volume(study.image)
    check_hu_range(volume.array, study.image)
    images = to_slices(preprocess_hu(volume.array))
    masks = None
    if study.mask is not None:
        mask = load_volume(study.mask)
        check_same_grid(volume, mask)
        masks = to_slices(check_binary_mask(mask.array, study.mask))
    elif require_mask:
        raise DataError(study.image, "study has no mask, but an annotated study is required")
    if image_size is not None:
        images = resize_slices(images, image_size, "bilinear")
        masks = None if masks is None else resize_slices(masks, image_size, "mask")
    return StudySlices(study, images, masks)


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
