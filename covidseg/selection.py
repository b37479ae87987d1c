"""Downloading any part of MosMedData's 1110 studies: by category, or a seeded sample of each.

``covidseg download OUT --categories CT-0,CT-3 --per-category 20`` picks, from the manifest of every
file of the pinned mirror (:data:`FULL_MANIFEST_RESOURCE`: all 1110 studies, the 50 masks and the
registry, with their git blob SHA-1s), the studies of those categories, or a sample of ``N`` of each
drawn with ``numpy.random.default_rng(seed)`` (a category with fewer studies gives all of them).
The annotated CT-1 studies come with their masks. The sizes of the files still to fetch are asked
from the mirror (HTTP ``HEAD``) and the disk needed is printed before anything is downloaded; then
every file is fetched and verified as :func:`covidseg.download.download` does, and a
``dataset_registry.csv`` naming the studies present is written.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DownloadError
from .mosmed import CATEGORIES, CATEGORY_COUNTS, Study, mask_path, study_path, write_registry

__all__ = ["FULL_MANIFEST_RESOURCE", "Selection", "parse_categories", "read_full_manifest", "select_studies", "remote_sizes", "download_selection"]

FULL_MANIFEST_RESOURCE = "data/mirror_manifest_full.tsv"
"""Manifest of every file of the pinned mirror (``path<TAB>git_blob_sha1``), relative to the package."""

_STUDY_PATH = re.compile(r"studies/(CT-[0-4])/study_(\d{4})\.nii\.gz")


@dataclass(frozen=True)
class Selection:
    """Studies chosen for download.

    Attributes:
        studies: ``(study_id, category)``, sorted by id.
        paths: The mirror paths to fetch: each study's CT volume, and its mask where it has one.
        notes: Lines about the choice (e.g. a category with fewer studies than asked for).
    """

    studies: list
    paths: list
    notes: list


def parse_categories(text: str) -> list[str]:
    """``'CT-0,CT-3'`` (or ``'all'``) as a list of categories.

    Raises:
        ValueError: Naming an unknown category.
    """
    if text.strip().lower() == "all":
        return list(CATEGORIES)
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown or not names:
        raise ValueError(f"unknown category {', '.join(unknown) or repr(text)}; valid: {', '.join(CATEGORIES)} or all")
    return sorted(set(names), key=CATEGORIES.index)


def read_full_manifest(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The full mirror manifest (:data:`FULL_MANIFEST_RESOURCE`, or ``path``)."""
    from . import download

    if path is not None:
        return download.read_manifest(path)
    from importlib import resources

    with resources.as_file(resources.files("covidseg").joinpath(*FULL_MANIFEST_RESOURCE.split("/"))) as packaged:
        return download.read_manifest(packaged)


def select_studies(manifest: dict[str, str], categories: Iterable[str], per_category: int | None = None, seed: int = 0) -> Selection:
    """The studies of ``categories`` in ``manifest``, all of them or ``per_category`` of each.

    Args:
        manifest: ``{mirror path: git blob SHA-1}`` (:func:`read_full_manifest`).
        categories: Among :data:`covidseg.mosmed.CATEGORIES`.
        per_category: Studies drawn from each category (seeded, without replacement); ``None``
            takes them all.
        seed: Seed of the draw; the same seed and manifest give the same studies.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: For ``per_category`` under 1 or a category without studies in the manifest.
    """
    if per_category is not None and per_category < 1:
        raise ValueError(f"--per-category must be at least 1, got {per_category}")
    by_category: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for path in manifest:
        match = _STUDY_PATH.fullmatch(path)
        if match:
            by_category[match[1]].append(int(match[2]))
    rng = np.random.default_rng(seed)
    studies, notes = [], []
    for category in CATEGORIES:
        if category not in categories:
            continue
        ids = sorted(by_category[category])
        if not ids:
            raise ValueError(f"the manifest lists no study of {category}")
        if per_category is not None and per_category < len(ids):
            ids = sorted(int(i) for i in rng.choice(ids, size=per_category, replace=False))
        elif per_category is not None:
            notes.append(f"{category} has {len(ids)} studies, under the {per_category} asked for: taking them all")
        studies += [(i, category) for i in ids]
    studies.sort()
    paths = []
    for study_id, category in studies:
        paths.append(study_path("", study_id, category).as_posix())
        mask = mask_path("", study_id).as_posix()
        if mask in manifest:
            paths.append(mask)
    return Selection(studies, paths, notes)


def _size_of(url: str, timeout: float) -> int | None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        try:
            return os.stat(urllib.request.url2pathname(parsed.path)).st_size
        except OSError:
            return None
    request = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "").strip()
            return int(length) if length.isdigit() else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def remote_sizes(urls: list[str], timeout: float = 30, workers: int = 8) -> list[int | None]:
    """The sizes in bytes of files on a mirror (HTTP ``HEAD``; ``None`` where it does not say)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda url: _size_of(url, timeout), urls))


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _present(out: Path) -> list[Study]:
    """The studies under ``out/studies/CT-k``, with their masks where present."""
    found = []
    for category in CATEGORIES:
        for image in sorted((out / "studies" / category).glob("study_*.nii.gz")):
            number = image.name.removeprefix("study_").removesuffix(".nii.gz")
            if number.isdigit():
                mask = mask_path(out, int(number))
                found.append(Study(int(number), category, image, mask if mask.is_file() else None))
    return found


def download_selection(
    out: str | os.PathLike,
    categories: Iterable[str],
    per_category: int | None = None,
    seed: int = 0,
    mirror: str | None = None,
    manifest: str | os.PathLike | None = None,
    progress: bool = True,
    echo=print,
) -> list[Path]:
    """Download the studies :func:`select_studies` picks, verified, into ``out``.

    Prints (through ``echo``) the choice and the disk needed before fetching; files already present
    and verified are not fetched again (see :func:`covidseg.download.download`).

    Args:
        out: The dataset folder.
        categories: Categories to take.
        per_category: Studies drawn from each (``None``: all).
        seed: Seed of the draw.
        mirror: Base URL of the mirror (default :data:`covidseg.download.DEFAULT_MIRROR`).
        manifest: A manifest file in place of the packaged full manifest.
        progress: Show progress bars.
        echo: Where the lines go.

    Returns:
        The files, in the order of the selection's paths.

    Raises:
        DownloadError: If the disk lacks the space, or a file cannot be fetched or verified.
        ValueError: For a bad choice of categories or sample size.
    """
    from . import download

    out = Path(out)
    mirror = mirror or download.DEFAULT_MIRROR
    hashes = read_full_manifest(manifest)
    selection = select_studies(hashes, categories, per_category, seed)
    counts = {c: sum(cat == c for _, cat in selection.studies) for c in CATEGORIES}
    echo("selected: " + ", ".join(f"{c} {n} of {CATEGORY_COUNTS[c]}" for c, n in counts.items() if n) + f" (seed {seed})")
    for note in selection.notes:
        echo(note)
    missing = [p for p in selection.paths if not ((out / p).is_file() and download.git_blob_sha1(out / p) == hashes[p])]
    sizes = remote_sizes([download.mirror_url(p, mirror) for p in missing])
    known = sum(s for s in sizes if s is not None)
    unknown = sum(s is None for s in sizes)
    echo(
        f"{len(selection.paths)} files, {len(selection.paths) - len(missing)} already present; "
        f"disk needed: {_gigabytes(known)}" + (f" plus {unknown} files of unknown size" if unknown else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if known > free:
        raise DownloadError(out, f"needs {_gigabytes(known)} but only {_gigabytes(free)} is free; free some space or choose fewer studies")
    def finish(folder: Path) -> None:
        try:
            write_registry(folder, _present(folder))
        except OSError as exc:
            raise DownloadError(folder, f"cannot write the registry ({exc.strerror or exc})") from None

    return download.fetch_files(out, selection.paths, hashes, mirror, finish=finish, progress=progress,
                                desc="MosMedData " + ",".join(c for c, n in counts.items() if n))

