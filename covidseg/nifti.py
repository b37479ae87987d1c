"""Reading and writing NIfTI volumes, with their orientation taken from the affine.

All volumes are brought to one working orientation, :data:`WORKING_ORIENTATION` (``LAS``, the
orientation MosMedData is stored in), with nibabel's orientation tools rather than hard-coded
rotations. The third array axis is then always the axial (inferior to superior) one.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from nibabel.affines import voxel_sizes
from nibabel.filebasedimages import ImageFileError

from .errors import DataError
from .files import atomic_path
from .preprocessing import show_values

__all__ = [
    "WORKING_ORIENTATION",
    "Volume",
    "load_volume",
    "save_volume",
    "orientation_of",
    "check_same_grid",
    "check_output_path",
    "check_new_output",
    "written_by_covidseg",
    "OUTPUT_DESCRIPTION_PREFIX",
    "write_image_atomically",
]

WORKING_ORIENTATION = ("L", "A", "S")
"""Axis codes every loaded volume is reoriented to: axis 0 runs to the patient's left, axis 1
to anterior, axis 2 to superior (so ``array[:, :, k]`` is an axial slice)."""

_MIN_VOXEL_VOLUME_MM3 = 1e-6
"""A voxel smaller than this (in mm³) means the header's geometry is missing or broken."""

AFFINE_TOLERANCE_MM = 1e-2
"""Largest difference, in mm, between a study's and its mask's affine that still counts as the same
voxel grid."""


@dataclass(frozen=True)
class Volume:
    """A 3D volume in the working orientation.

    Attributes:
        array: The voxels, shape ``(X, Y, Z)``, in :data:`WORKING_ORIENTATION`.
        affine: The 4x4 voxel-to-world (RAS+, mm) matrix of ``array``.
        header: The NIfTI header as read from the file (geometry of the file on disk).
        path: The file it came from.
        file_affine: The affine of the file on disk, before reorientation.
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path
    file_affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (``nibabel.affines.voxel_sizes`` of
        :attr:`affine`: the norms of its columns)."""
        return tuple(float(s) for s in voxel_sizes(self.affine))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³: ``|det|`` of the 3x3 part of :attr:`affine`.

        :attr:`affine` is nibabel's best affine (``get_best_affine``: the sform if its code is
        set, else the qform). :func:`load_volume` refuses a header whose sform and ``pixdim`` (the
        qform's voxel size, which ITK always uses as its spacing) disagree, so ITK, nibabel and
        this value measure the same voxel.
        """
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def to_file_orientation(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` (in the working orientation, same shape as :attr:`array`) reoriented
        back to the orientation of the file on disk."""
        transform = orientations.ornt_transform(
            orientations.axcodes2ornt(WORKING_ORIENTATION), orientations.io_orientation(self.file_affine)
        )
        return orientations.apply_orientation(array, transform)


def orientation_of(affine: np.ndarray) -> tuple[str, str, str]:
    """Axis codes (e.g. ``('L', 'A', 'S')``) of a voxel-to-world affine."""
    return tuple(nib.aff2axcodes(affine))


def load_volume(path: str | os.PathLike, dtype=None) -> Volume:
    """Load a 3D NIfTI file and reorient it to :data:`WORKING_ORIENTATION`.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.
        dtype: The numpy dtype of the returned array; by default the file's on-disk type
            (``int16`` for MosMedData), so no scaling or float copy is made.

    Returns:
        The :class:`Volume`.

    Raises:
        DataError: If the file is missing, a folder, empty, truncated, not NIfTI, not 3D, has a
            degenerate affine or a non-numeric voxel type, or holds NaN or inf.

    Example::

        >>> import tempfile
        >>> import nibabel as nib
        >>> import numpy as np
        >>> from covidseg.nifti import load_volume, orientation_of
        >>> folder = tempfile.TemporaryDirectory()
        >>> hu = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
        >>> ras = np.diag([0.5, 0.5, 5.0, 1.0])  # stored in RAS: 0.5 x 0.5 mm pixels, 5 mm slices
        >>> nib.save(nib.Nifti1Image(hu, ras), f"{folder.name}/ct.nii.gz")
        >>> volume = load_volume(f"{folder.name}/ct.nii.gz")
        >>> volume.array.shape, volume.array.dtype.name, volume.spacing
        ((2, 3, 4), 'int16', (0.5, 0.5, 5.0))
        >>> orientation_of(volume.affine), orientation_of(volume.file_affine)  # loaded in LAS
        (('L', 'A', 'S'), ('R', 'A', 'S'))
        >>> bool((volume.array == hu[::-1]).all())  # so the first axis is flipped
        True
        >>> folder.cleanup()
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder, not a NIfTI file (convert a DICOM series to NIfTI first, e.g. with dcm2niix)")
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises many types for foreign files
        raise DataError(path, f"not a readable NIfTI file ({_open_problem(exc, path)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI file (nibabel read it as {type(image).__name__})")
    if image.ndim != 3:
        raise DataError(path, f"expected a 3D volume, found {image.ndim}D with shape {image.shape}")
    if min(image.shape) < 1:
        raise DataError(path, f"empty volume: shape {image.shape}")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < _MIN_VOXEL_VOLUME_MM3:
        raise DataError(path, f"voxel-to-world affine is degenerate (voxel volume {show_values([abs(np.linalg.det(image.affine[:3, :3]))])} mm³, "
                              "zero or non-finite); fix the header")
    _check_unambiguous_voxel_size(image.header, path)
    ornt = orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(WORKING_ORIENTATION)
    )
    try:  # the voxels are read here: as_reoriented permutes and flips them (a view) and the affine
        working = image.as_reoriented(ornt)
        raw = np.asanyarray(working.dataobj)
    except MemoryError:
        raise DataError(path, f"too large to load: shape {image.shape}, {image.get_data_dtype()}") from None
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError ... for damaged data
        raise DataError(path, f"truncated or corrupt data ({_reason(exc, path)})") from None
    if raw.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported voxel type {raw.dtype} (expected integers or floats)")
    array = np.ascontiguousarray(raw, dtype=dtype)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(path, f"{bad} voxels are NaN or infinite")
    return Volume(array=array, affine=working.affine, header=image.header, path=path, file_affine=image.affine.copy())


def save_volume(array: np.ndarray, like: Volume, path: str | os.PathLike, description: str | None = None) -> Path:
    """Write ``array`` (working orientation) on the grid of ``like``, atomically.

    The file gets ``like``'s on-disk orientation, NIfTI version and header geometry exactly: the qform
    (quaternion, offsets, ``pixdim`` with ``qfac``), the sform rows and both codes are copied
    field by field, so every reader (nibabel, which prefers the sform; ITK, ITK-SNAP and 3D
    Slicer, which prefer the qform unless the sform code is 1, scanner anatomical) places the
    mask exactly where it places ``like``. The file is written through
    :func:`covidseg.files.atomic_path`, so a failed write never leaves a partial file.

    Args:
        array: Voxels with the same shape as ``like.array``.
        like: The volume whose geometry the file takes.
        path: Where to write (``.nii.gz``).
        description: Optional text for the header's ``descrip`` field (80 bytes at most).

    Returns:
        ``path``.
    """
    if array.shape != like.array.shape:
        raise ValueError(f"array shape {array.shape} differs from the reference {like.array.shape}")
    kind = nib.Nifti2Image if isinstance(like.header, nib.Nifti2Header) else nib.Nifti1Image  # float64 geometry stays float64
    image = kind(like.to_file_orientation(array), None, like.header)
    header = image.header
    for field in _GEOMETRY_FIELDS:
        header[field] = like.header[field]
    header.set_data_dtype(array.dtype)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    if description is not None:
        header["descrip"] = description.encode()[:79]
    return write_image_atomically(image, path)


_GEOMETRY_FIELDS = ("pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")
"""The NIfTI header fields that hold a volume's geometry (NIfTI-1 standard, nifti1.h)."""


def write_image_atomically(image: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Save a nibabel image to ``path`` through a temporary file and a rename.

    Either the new file is complete at ``path`` or, if anything fails, the file that was there
    before is untouched and no temporary file is left behind (:func:`covidseg.files.atomic_path`:
    a new file gets the umask's mode, a replaced file keeps its mode). The header is written as
    the image holds it: nibabel does not touch the qform or sform of an image made with
    ``affine=None``.

    Args:
        image: The image to write.
        path: A ``.nii`` or ``.nii.gz`` file name (its folder is created).

    Returns:
        ``path``.

    Raises:
        DataError: If ``path`` is a folder or not a NIfTI file name, its folder is not writable,
            or the disk is full.
    """
    path = Path(path)
    check_output_path(path)
    started = False
    try:
        with atomic_path(path, suffix=_nifti_suffix(path)) as tmp:
            started = True
            nib.save(image, tmp)
    except OSError as exc:
        if not started:  # the temporary file could not even be created
            raise DataError(path, f"cannot write here ({exc.strerror or exc})") from None
        raise DataError(path, f"could not be written ({exc.strerror or exc}); nothing was changed") from None
    except Exception as exc:  # nibabel's own errors, e.g. for a header it cannot encode
        raise DataError(path, f"could not be written ({_reason(exc)}); nothing was changed") from None
    return path


def _check_unambiguous_voxel_size(header, path: Path) -> None:
    """Refuse a header whose sform gives another voxel size than ``pixdim``.

    nibabel measures voxels with the sform when its code is set; ITK (SimpleITK, ITK-SNAP, 3D
    Slicer) always takes its spacing from ``pixdim`` and ignores an sform whose scales differ
    ("unexpected scales in sform"). Volumes in mL would then depend on the reader.
    """
    if int(header["sform_code"]) == 0:
        return
    sform_sizes = voxel_sizes(header.get_sform())
    pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
    if not np.allclose(sform_sizes, pixdim, rtol=_VOXEL_SIZE_RTOL, atol=0):
        shown = lambda v: " x ".join(f"{x:.6g}" for x in v)  # noqa: E731
        raise DataError(path, f"header is ambiguous: the sform's voxel size {shown(sform_sizes)} mm differs from "
                              f"pixdim {shown(pixdim)} mm (ITK would use pixdim, nibabel the sform); fix the header")


_VOXEL_SIZE_RTOL = 1e-4
"""Relative difference between sform and ``pixdim`` voxel sizes accepted as float32 rounding."""


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any work is done, that ``path`` can name a NIfTI file to write.

    Raises:
        DataError: If ``path`` is an existing folder, does not end in ``.nii`` or ``.nii.gz``, or
            lies under an existing file.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder; give a file name such as mask.nii.gz")
    if not _nifti_suffix(path):
        raise DataError(path, "output file name must end in .nii.gz or .nii")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(path, f"cannot write here: {parent} is a file, not a folder")
    return path


OUTPUT_DESCRIPTION_PREFIX = "covidseg "
"""How the ``descrip`` field of every NIfTI file a covidseg command writes begins (masks, lungs)."""


def written_by_covidseg(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a NIfTI file a covidseg command wrote (its header's ``descrip`` begins
    with :data:`OUTPUT_DESCRIPTION_PREFIX`); only the header is read."""
    try:
        header = nib.load(os.fspath(path)).header
        description = bytes(header["descrip"].item()) if "descrip" in header else b""
    except Exception:  # not NIfTI, unreadable, truncated: not ours
        return False
    return description.startswith(OUTPUT_DESCRIPTION_PREFIX.encode())


def check_new_output(path: str | os.PathLike, example: str = "mask.nii.gz") -> Path:
    """Check, before any work is done, that a command may write the NIfTI file ``path``: a usable
    name (:func:`check_output_path`) where no file lies, or a file an earlier covidseg command
    wrote (:func:`written_by_covidseg`), never a CT study or any other file of the user's.

    Raises:
        DataError: Naming ``path`` and the problem; nothing is written.
    """
    from .files import check_output_file

    return check_output_file(check_output_path(path), example, written_by_covidseg)


def _nifti_suffix(path: Path) -> str:
    """``'.nii.gz'`` or ``'.nii'`` (in the case the file name has it), else ``''``."""
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.name[-len(suffix):]
    return ""


def check_same_grid(study: Volume, mask: Volume) -> None:
    """Check that a mask lies on its study's voxel grid.

    Raises:
        DataError: Naming the mask, if the shapes differ or the affines differ by more than
            :data:`AFFINE_TOLERANCE_MM`.
    """
    if study.array.shape != mask.array.shape:
        raise DataError(mask.path, f"mask shape {mask.array.shape} differs from its study's {study.array.shape}")
    gap = float(np.abs(study.affine - mask.affine).max())
    if gap > AFFINE_TOLERANCE_MM:
        raise DataError(mask.path, f"mask affine differs from its study's by up to {show_values([gap])} mm "
                                   f"(at most {AFFINE_TOLERANCE_MM:g} mm allowed)")


def _open_problem(exc: BaseException, path: Path) -> str:
    """Why nibabel could not open ``path``, in plain words."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, gzip.BadGzipFile):
        return "named .gz but not gzip-compressed"
    if isinstance(exc, (EOFError, zlib.error)) or _gzip_damage(path):
        return "truncated: the gzip stream is damaged or ends early"
    if isinstance(exc, ImageFileError):
        return "no NIfTI-1 or NIfTI-2 header"
    return _reason(exc, path)


def _gzip_damage(path: Path) -> bool:
    """Whether ``path`` is gzip data that cannot be decompressed to its end."""
    try:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                return False
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error):
        return True
    return False


def _reason(exc: BaseException, path: Path | None = None) -> str:
    """A short one-line reason from a third-party exception, without repeating the file name."""
    text = str(exc)
    if path is not None:
        text = text.replace(f'"{path}"', "the file").replace(f"'{path}'", "the file").replace(str(path), "the file")
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."
