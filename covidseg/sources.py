"""Where the data comes from: real MosMedData, or the embedded synthetic phantom.

``--data`` (or the ``data`` argument) wins; otherwise ``COVIDSEG_DATA`` names a MosMedData folder;
otherwise the phantom is generated on first use into a cache folder and reused. Results always say
which source they were computed on (:class:`covidseg.run_card.RunCard`), so phantom numbers are never mistaken for
the thesis'.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .phantom import ensure_phantom, is_phantom

__all__ = ["DATA_ENV", "REAL", "PHANTOM", "resolve_data_dir", "data_source", "data_identity"]

IDENTITY_HEAD_BYTES = 1 << 16
"""Bytes at the start of each study and mask file that :func:`data_identity` digests."""

DATA_ENV = "COVIDSEG_DATA"
"""Environment variable naming a folder with the real MosMedData (as ``covidseg download`` writes it)."""

REAL = "real MosMedData"
PHANTOM = "synthetic phantom"


def resolve_data_dir(data: str | os.PathLike | None = None, phantom_size: int = 128, progress: bool = True) -> Path:
    """The dataset folder to use.

    Args:
        data: An explicit folder; wins over everything.
        phantom_size: In-plane size of the phantom, used when no real data is named.
        progress: Show a progress bar if the phantom must be generated.
    """
    if data is not None:
        return Path(data)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return ensure_phantom(size=phantom_size, progress=progress)


def data_source(root: str | os.PathLike) -> str:
    """:data:`PHANTOM` for a phantom folder, else :data:`REAL`."""
    return PHANTOM if is_phantom(root) else REAL


def data_identity(studies) -> str:
    """A cheap digest that tells one dataset from another: for each study and mask file, its
    name, its size and a SHA-256 of its first 64 KiB (a gzip header holds the file's time stamp;
    NIfTI's holds the geometry). The folder's location does not enter it, so a moved or copied
    dataset keeps its identity; reading it costs milliseconds.

    Args:
        studies: :class:`covidseg.mosmed.Study` objects (those a run sees).

    Returns:
        A hexadecimal digest (16 characters).
    """
    digest = hashlib.sha256()
    for study in sorted(studies, key=lambda s: s.study_id):
        for path in (study.image, study.mask):
            if path is None:
                continue
            path = Path(path)
            with open(path, "rb") as handle:
                head = handle.read(IDENTITY_HEAD_BYTES)
            digest.update(f"{study.study_id}\0{path.name}\0{path.stat().st_size}\0".encode())
            digest.update(hashlib.sha256(head).digest())
    return digest.hexdigest()[:16]
