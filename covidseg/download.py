"""Downloading the 50 annotated MosMedData CT-1 studies and their masks, verified.

The files come from a public GitHub mirror of MosMedData COVID19_1110 (Morozov et al., 2020,
arXiv:2005.06465), pinned to a tag, as raw file URLs. Every file is checked against its git blob
SHA-1 from the manifest shipped with the package (``covidseg/data/mirror_manifest.tsv``) before
it gets its final name, so a folder filled by :func:`download` only ever holds intact files.

The download is resumable and safe to repeat: a file already present and verified is not fetched
again, a ``.part`` file left by an interrupted run is continued with an HTTP ``Range`` request,
transient network errors are retried with exponential backoff, and concurrent runs into the same
folder take turns through a lock file (:func:`covidseg.runs.folder_lock`).

It is bounded, too: a file is refused as soon as it grows past its size in the manifest (or, where
the manifest has none, :data:`MAX_UNKNOWN_SIZE_BYTES`); a server that sends nothing for ``timeout``
seconds, or less than ``min_speed`` bytes a second over ``stall_seconds``, is given up on; and
files are never opened through symbolic links, so nothing outside the download folder is written.

Nothing happens at import; the network is only touched by :func:`download`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import http.client
import logging
import operator
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from . import __version__
from .errors import DataError, DownloadError
from .files import install, open_no_follow
from .mosmed import ANNOTATED_IDS, REGISTRY_NAME, Study, discover_studies, mask_path, study_path, write_registry
from .runs import folder_lock

__all__ = [
    "fetch_files",
    "DEFAULT_MIRROR",
    "CREDIT",
    "MANIFEST_RESOURCE",
    "LOCK_NAME",
    "PART_SUFFIX",
    "git_blob_sha1",
    "read_manifest",
    "read_manifest_sizes",
    "mirror_paths",
    "mirror_url",
    "download",
]

DEFAULT_MIRROR = (
    "https://raw.githubusercontent.com/michaelwfry/"
    "MosMedData-Chest-CT-Scans-with-COVID-19-Related-Findings/v1.0"
)
"""Base URL of the GitHub mirror, pinned to tag ``v1.0``; a file's URL is ``f"{mirror}/{path}"``."""

CREDIT = """\
MosMedData: Chest CT Scans With COVID-19 Related Findings.
Research and Practical Clinical Center for Diagnostics and Telemedicine Technologies
of the Moscow Health Care Department.
Morozov S.P. et al., "MosMedData: Chest CT Scans With COVID-19 Related Findings Dataset",
arXiv:2005.06465 (2020).
Licence: CC BY-NC-ND 3.0, https://creativecommons.org/licenses/by-nc-nd/3.0/
(attribution, non-commercial use only, no redistribution of modified files)."""
"""The attribution the dataset's licence requires wherever the data is used or shown."""

MANIFEST_RESOURCE = "data/mirror_manifest.tsv"
"""The packaged manifest, relative to the ``covidseg`` package: ``path<TAB>git_blob_sha1<TAB>size``.
Sizes are known for the 50 masks (measured on the files that match the hashes); the mirror's git
tree lists no sizes, and the CT volumes could not be measured, so theirs are empty."""

MANIFEST_HEADER = ("path", "git_blob_sha1")
"""The manifest's first columns; a third, ``size`` (bytes, may be empty), is optional."""

MAX_UNKNOWN_SIZE_BYTES = 64 << 20
"""Largest file accepted when the manifest gives no size (64 MiB). The largest annotated study is
512 x 512 x 53 voxels (its mask's shape): 55.6 MB even as float32 and stored uncompressed."""

MIN_SPEED_BYTES_PER_S = 1024.0
"""A transfer slower than this, averaged over ``stall_seconds``, is given up on."""

STALL_SECONDS = 60.0
"""The window over which the transfer speed is measured."""

PROGRESS_BYTES = 256 << 10
"""An attempt that adds fewer bytes than this to the largest ``.part`` so far (and does not finish
the file) made no progress: it counts towards ``retries``, so a server sending a byte per
connection is given up on."""

LOCK_NAME = ".covidseg-download.lock"
"""Lock file held (:func:`covidseg.runs.folder_lock`) in the output folder while a download runs;
``.covidseg-download.owner`` names the holder meanwhile. A download that fails having written
nothing removes it again (and the folder, if it made it)."""

PART_SUFFIX = ".part"
"""Suffix of a file being downloaded; it is renamed to its final name once verified."""

CATEGORY = "CT-1"
"""Category of all annotated studies."""

CHUNK_BYTES = 1 << 20
"""Bytes read from the network, or from disk for hashing, at a time."""

RETRY_STATUSES = frozenset({408, 429})
"""HTTP statuses below 500 that are worth retrying (every 5xx is retried too)."""

MAX_RETRY_AFTER_S = 60.0
"""Longest wait honoured from a server's ``Retry-After`` header."""

USER_AGENT = f"covidseg/{__version__} (Python urllib)"

_SHA1_HEX = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_HTML_STARTS = (b"<!doctype", b"<html")

logger = logging.getLogger(__name__)


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git blob SHA-1 of a file: what ``git hash-object`` prints for it.

    That is ``sha1(b"blob <size>\\0" + content)``, computed in chunks so large files are never
    held in memory.

    Args:
        path: The file.

    Returns:
        40 lowercase hex digits.

    Raises:
        OSError: If the file cannot be read.
    """
    with open(path, "rb") as handle:
        hasher = _blob_hasher(os.fstat(handle.fileno()).st_size)
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def read_manifest(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Read a mirror manifest: a header line ``path<TAB>git_blob_sha1[<TAB>size]``, then one file a line.

    Args:
        path: A manifest file; ``None`` reads the one shipped with the package.

    Returns:
        ``{relative path: git blob SHA-1}``, e.g. ``{"masks/study_0255_mask.nii.gz": "5c3d...", ...}``.

    Raises:
        DownloadError: Naming the manifest, if it is unreadable or a line is malformed.
    """
    return {name: sha1 for name, sha1, _ in _manifest_rows(path)}


def read_manifest_sizes(path: str | os.PathLike | None = None) -> dict[str, int]:
    """The file sizes, in bytes, that a manifest gives (files whose size is empty are left out).

    Args:
        path: A manifest file; ``None`` reads the one shipped with the package.

    Raises:
        DownloadError: As :func:`read_manifest`.
    """
    return {name: size for name, _, size in _manifest_rows(path) if size is not None}


def _manifest_rows(path: str | os.PathLike | None) -> list[tuple[str, str, int | None]]:
    if path is None:
        where = f"covidseg/{MANIFEST_RESOURCE}"
        resource = resources.files("covidseg")
        for part in MANIFEST_RESOURCE.split("/"):
            resource = resource.joinpath(part)
    else:
        where = str(path)
        resource = Path(path)
    try:
        text = resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DownloadError(where, f"unreadable manifest ({_reason(exc)})") from None
    lines = text.splitlines()
    header = tuple(lines[0].lstrip("\ufeff").split("\t")) if lines else ()
    if header not in (MANIFEST_HEADER, (*MANIFEST_HEADER, "size")):
        raise DownloadError(where, f"manifest header must be {'<TAB>'.join(MANIFEST_HEADER)}[<TAB>size]")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        size = fields[2].strip() if len(fields) == 3 == len(header) else None
        if (len(fields) != len(header) or not fields[0] or not _SHA1_HEX.fullmatch(fields[1].strip())
                or (size and not size.isdigit())):
            raise DownloadError(where, f"line {number}: expected <path><TAB><40 hex digits>"
                                       f"{'<TAB><size or nothing>' if len(header) == 3 else ''}, found {line!r}")
        rows.append((fields[0], fields[1].strip(), int(size) if size else None))
    return rows


def mirror_paths(study_id: int) -> tuple[str, str]:
    """The mirror paths of an annotated study's CT volume and mask.

    Example: ``mirror_paths(255) == ("studies/CT-1/study_0255.nii.gz", "masks/study_0255_mask.nii.gz")``.
    """
    return study_path("", study_id, CATEGORY).as_posix(), mask_path("", study_id).as_posix()


def mirror_url(path: str, mirror: str = DEFAULT_MIRROR) -> str:
    """The URL of a mirror path: ``f"{mirror}/{path}"``."""
    return f"{mirror.rstrip('/')}/{path}"


def download(
    out: str | os.PathLike,
    mirror: str = DEFAULT_MIRROR,
    ids: Iterable[int] = ANNOTATED_IDS,
    manifest: Mapping[str, str] | str | os.PathLike | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: bool = True,
    sizes: Mapping[str, int] | None = None,
    max_bytes: int = MAX_UNKNOWN_SIZE_BYTES,
    min_speed: float = MIN_SPEED_BYTES_PER_S,
    stall_seconds: float = STALL_SECONDS,
) -> list[Path]:
    """Download annotated MosMedData CT-1 studies and their masks into ``out``, verified.

    For each study id, fetches ``studies/CT-1/study_NNNN.nii.gz`` and
    ``masks/study_NNNN_mask.nii.gz``, then writes ``dataset_registry.csv`` so that
    :func:`covidseg.mosmed.discover_studies` finds them. Please credit the dataset as
    :data:`CREDIT` says.

    Each file is written to ``<name>.part`` and renamed only once its git blob SHA-1 matches the
    manifest. Files already present and verified are skipped (a second run requests nothing);
    a damaged file already present is deleted and fetched again; a ``.part`` file is resumed
    with ``Range: bytes=N-`` (from zero when the server ignores the range). Connection errors,
    timeouts, incomplete reads and HTTP 5xx/408/429 are retried ``retries`` times with waits of
    ``backoff * 2**k`` seconds, resuming from the bytes already received. Concurrent runs into
    the same folder wait for each other (:func:`covidseg.runs.folder_lock` on
    ``out/.covidseg-download.lock``; the one waiting logs a warning naming the folder and the
    process that holds it). A run that fails before writing anything leaves nothing behind.

    Bounds: a file is refused once it passes its size (from ``sizes``, else ``max_bytes``), and at
    once when the server announces more (``Content-Length``, ``Content-Range``); a read that waits
    ``timeout`` seconds, or a transfer slower than ``min_speed`` bytes/s over ``stall_seconds``,
    fails the attempt; an attempt that adds less than :data:`PROGRESS_BYTES` counts towards
    ``retries``. The ``.part`` file, the target and the lock file are never opened through a
    symbolic link, and every file stays inside ``out``.

    Args:
        out: The dataset folder to fill (created if needed).
        mirror: Base URL of the mirror (default: the GitHub mirror, tag ``v1.0``); a ``file://``
            URL of a local copy works too.
        ids: The study ids, among the annotated 255..304.
        manifest: ``{path: git blob SHA-1}``, or a manifest file; ``None`` uses the packaged one.
        retries: How many times a transient failure is retried (per file, counted afresh
            whenever an attempt adds at least :data:`PROGRESS_BYTES` to the file).
        backoff: Wait before the first retry, in seconds, doubled at each further retry.
        timeout: Socket timeout of each connection and read, in seconds.
        progress: Show tqdm progress bars (files, and bytes of the current file as they arrive).
        sizes: ``{path: size in bytes}``; ``None`` takes them from the manifest file (the packaged
            one when ``manifest`` is ``None``), or knows none when ``manifest`` is a mapping.
        max_bytes: The largest size accepted for a file whose size is not known.
        min_speed: Slowest transfer accepted, in bytes per second, averaged over ``stall_seconds``.
        stall_seconds: The window of the speed rule, in seconds.

    Returns:
        The paths of the files, CT volume then mask for each study, in the order of ``ids``.

    Raises:
        DownloadError: On one line naming the file or URL: an id without a manifest entry,
            HTTP 4xx (not retried), retries exhausted (timeouts, a stalled transfer), an HTML
            page instead of the file, more bytes than announced or expected, a SHA-1 mismatch
            (the bad ``.part`` is deleted), a symbolic link where a file or folder is to be
            written, or a folder that cannot be written.
    """
    out = Path(out)
    hashes = dict(manifest) if isinstance(manifest, Mapping) else read_manifest(manifest)
    if sizes is None:
        sizes = {} if isinstance(manifest, Mapping) else read_manifest_sizes(manifest)
    study_ids = _checked_ids(ids)
    paths = []
    for study_id in study_ids:
        for path in mirror_paths(study_id):
            if path not in hashes:
                raise DownloadError(path, f"study {study_id} is not in the mirror manifest "
                                          f"(annotated studies are {ANNOTATED_IDS[0]}..{ANNOTATED_IDS[-1]})")
            paths.append(path)
    fetched = [Study(i, CATEGORY, study_path(out, i, CATEGORY), mask_path(out, i)) for i in study_ids]
    return fetch_files(out, paths, hashes, mirror, sizes=sizes, finish=lambda folder: _update_registry(folder, fetched),
                       retries=retries, backoff=backoff, timeout=timeout, progress=progress, max_bytes=max_bytes,
                       min_speed=min_speed, stall_seconds=stall_seconds, desc="MosMedData CT-1")


def fetch_files(
    out: str | os.PathLike,
    paths: Iterable[str],
    hashes: Mapping[str, str],
    mirror: str = DEFAULT_MIRROR,
    *,
    sizes: Mapping[str, int] | None = None,
    finish: Callable[[Path], object] | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: bool = True,
    max_bytes: int = MAX_UNKNOWN_SIZE_BYTES,
    min_speed: float = MIN_SPEED_BYTES_PER_S,
    stall_seconds: float = STALL_SECONDS,
    desc: str = "MosMedData",
) -> list[Path]:
    """Fetch mirror ``paths`` into ``out``, each verified against its git blob SHA-1: the engine
    behind :func:`download` and :func:`covidseg.selection.download_selection`, with the same
    resumption, retries, bounds and link refusal (see :func:`download`).

    Args:
        out: The dataset folder (created if needed).
        paths: Paths relative to the mirror's root, as in the manifest.
        hashes: ``{path: git blob SHA-1}`` holding every path.
        mirror: Base URL of the mirror.
        sizes: ``{path: size in bytes}`` where known; other files are capped at ``max_bytes``.
        finish: Called with ``out`` once every file is verified, still holding the folder's lock
            (to write the registry).
        desc: Label of the progress bar.
        Other arguments: as :func:`download`.

    Returns:
        The verified files, in the order of ``paths``.

    Raises:
        DownloadError: As :func:`download`.
    """
    out = Path(out)
    paths = list(paths)
    sizes = sizes or {}
    if retries < 0 or backoff < 0 or timeout <= 0 or max_bytes <= 0 or min_speed < 0 or stall_seconds <= 0:
        raise ValueError(f"need retries >= 0, backoff >= 0, timeout > 0, max_bytes > 0, min_speed >= 0 and "
                         f"stall_seconds > 0, got {retries}, {backoff}, {timeout}, {max_bytes}, {min_speed}, {stall_seconds}")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(out, f"cannot create the folder ({_reason(exc)})") from None

    targets = {path: _inside(out, path) for path in paths}
    for target in targets.values():  # before any request (checked again as each file is opened)
        _refuse_links(target)
    fetcher = _Fetcher(None, retries, backoff, timeout, progress, min_speed, stall_seconds)
    files = []

    def wait(holder: str) -> None:
        logger.warning("%s: another download into this folder is running (%s); waiting for it", out, holder)

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(folder_lock(out, LOCK_NAME, wait, created=created))
        except OSError as exc:
            raise DownloadError(out / LOCK_NAME, _write_problem(exc, "cannot create the lock file")) from None
        with tqdm(total=len(paths), unit="file", desc=desc, disable=not progress) as bar:
            for path in paths:
                limit = _Limit(sizes[path], True) if path in sizes else _Limit(max_bytes, False)
                files.append(fetcher.ensure(targets[path], mirror_url(path, mirror), hashes[path], limit))
                bar.update()
        if finish is not None:
            finish(out)
    return files


@dataclasses.dataclass(frozen=True)
class _Limit:
    """The size a file must have (``exact``) or may at most have."""

    size: int
    exact: bool

    def check(self, size: int, url: str, what: str) -> None:
        """Refuse ``size`` bytes (announced or received) that this limit does not allow."""
        if size > self.size:
            allowed = f"the {self.size} bytes the manifest gives" if self.exact else f"the {self.size}-byte limit"
            raise DownloadError(url, f"larger than expected: {what} {size} bytes, more than {allowed}")

    def check_total(self, total: int, url: str) -> None:
        """Refuse an announced full size that is not the expected one."""
        self.check(total, url, "the server announces")
        if self.exact and total != self.size:
            raise DownloadError(url, f"the server announces {total} bytes, the manifest gives {self.size}")


class _Transient(Exception):
    """A failure worth retrying (whether it counts towards the retries depends on the bytes it
    added, see :data:`PROGRESS_BYTES`)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Mismatch(Exception):
    def __init__(self, actual: str, resumed: bool):
        super().__init__(actual)
        self.actual = actual
        self.resumed = resumed


class _RangeNotSatisfiable(Exception):
    """HTTP 416: the ``.part`` file is at least as long as the file on the server."""


class _Fetcher:
    """Fetches single files with verification, resumption and retries."""

    def __init__(self, opener: urllib.request.OpenerDirector | None, retries: int, backoff: float,
                 timeout: float, progress: bool, min_speed: float = 0.0, stall_seconds: float = STALL_SECONDS):
        self.deadline = _HeaderDeadline(timeout)
        self.opener = opener or _build_opener(self.deadline)
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.progress = progress
        self.min_speed = min_speed
        self.stall_seconds = stall_seconds

    def ensure(self, target: Path, url: str, sha1: str, limit: _Limit) -> Path:
        """Make ``target`` an intact copy of ``url``, downloading it unless it already is."""
        part = _refuse_links(target)
        if target.is_file():
            actual = _hash_or_raise(target)
            if actual == sha1:
                return target
            logger.warning("%s: damaged (SHA-1 %s, expected %s); deleting it and downloading it again",
                           target, actual, sha1)
            _remove(target)
        self._fetch(url, part, target, sha1, limit)
        try:
            install(part, target)
        except OSError as exc:
            raise DownloadError(target, f"cannot rename {part.name} ({_reason(exc)})") from None
        return target

    def _fetch(self, url: str, part: Path, target: Path, sha1: str, limit: _Limit) -> None:
        failures = 0
        may_restart = True  # a resumed file that fails verification is fetched once more from zero
        furthest = 0  # the largest size the part has reached: progress is measured against it
        while True:
            offset = part.stat().st_size if part.is_file() else 0
            furthest = max(furthest, offset)
            try:
                self._attempt(url, part, target, sha1, offset, limit)
                return
            except _RangeNotSatisfiable:
                if _hash_or_raise(part) == sha1:  # complete, but not renamed by the run that fetched it
                    return
                logger.warning("%s: longer than the file on the server; starting again", part)
                _remove(part)
            except _Mismatch as exc:
                _remove(part)
                if exc.resumed and may_restart:
                    logger.warning("%s: resumed file does not verify; downloading it again from the start", part)
                    may_restart = False
                    continue
                raise DownloadError(target, f"SHA-1 mismatch: expected {sha1}, got {exc.actual} "
                                            f"(downloaded from {url})") from None
            except _Transient as exc:
                size = part.stat().st_size if part.is_file() else 0
                failures = 1 if size >= furthest + PROGRESS_BYTES else failures + 1
                furthest = max(furthest, size)
                if failures > self.retries:
                    attempts = "1 attempt" if self.retries == 0 else f"{self.retries + 1} attempts"
                    raise DownloadError(url, f"failed after {attempts}: {exc}") from None
                delay = self.backoff * 2 ** (failures - 1)
                if exc.retry_after is not None and self.backoff > 0:
                    delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
                logger.warning("%s: %s; retry %d of %d in %.3g s", url, exc, failures, self.retries, delay)
                time.sleep(delay)

    def _attempt(self, url: str, part: Path, target: Path, sha1: str, offset: int, limit: _Limit) -> None:
        """One request: append to ``part`` (or rewrite it), then verify it.

        Raises:
            _Transient, _Mismatch, _RangeNotSatisfiable, DownloadError.
        """
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self._open_or_classify(urllib.request.Request(url, headers=headers), offset)
        with response:
            total, offset = self._expected_size(response, url, offset)
            if total is not None:
                limit.check_total(total, url)
            elif limit.exact:  # a body of unannounced length must still have the manifest's size
                total = limit.size
            length = response.headers.get("Content-Length", "").strip()
            if length.isdigit():  # a 206's body may announce more than its Content-Range
                limit.check(offset + int(length), url, "the server announces")
            content_type = response.headers.get("Content-Type", "")
            if "text/html" in content_type.lower():
                raise DownloadError(url, f"the server returned an HTML page (Content-Type {content_type}) "
                                         "instead of the file; check the mirror URL")
            hasher = None
            if total is not None:  # hash while streaming: the blob header needs the final size
                hasher = _blob_hasher(total)
                if offset:
                    _hash_into(hasher, part)
            try:
                received = self._stream(response, url, part, offset, total, limit, hasher, target.name)
            except DownloadError:
                _remove(part)
                raise
        size = offset + received
        if total is not None and size < total:
            raise _Transient(f"connection closed after {size} of {total} bytes")
        actual = hasher.hexdigest() if hasher is not None else _hash_or_raise(part)
        if actual != sha1:
            raise _Mismatch(actual, resumed=offset > 0)

    def _open(self, request: urllib.request.Request, offset: int) -> http.client.HTTPResponse:
        url = request.full_url
        try:
            return self.opener.open(request, timeout=self.timeout)
        except Exception:
            if self.deadline.expired:
                raise _Transient(f"no complete response headers within {self.timeout:g} s") from None
            raise
        finally:
            self.deadline.stop()

    def _open_or_classify(self, request: urllib.request.Request, offset: int) -> http.client.HTTPResponse:
        url = request.full_url
        try:
            return self._open(request, offset)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                raise _RangeNotSatisfiable() from None
            if exc.code >= 500 or exc.code in RETRY_STATUSES:
                raise _Transient(f"HTTP {exc.code} {exc.reason}", retry_after=_retry_after(exc)) from None
            hint = "; check the mirror URL and tag" if exc.code in (403, 404) else ""
            raise DownloadError(url, f"HTTP {exc.code} {exc.reason}{hint}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (str, ssl.SSLCertVerificationError)):  # bad URL, untrusted host
                raise DownloadError(url, _reason(exc.reason)) from None
            raise _Transient(_reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(_reason(exc)) from None

    @staticmethod
    def _expected_size(response, url: str, offset: int) -> tuple[int | None, int]:
        """The file's full size (``None`` if not announced) and the offset the body starts at."""
        if offset and getattr(response, "status", None) == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match and int(match[1]) == offset and match[3] != "*":
                return int(match[3]), offset
            raise DownloadError(url, f"answered the request for bytes {offset}- with Content-Range "
                                     f"{response.headers.get('Content-Range')!r}")
        status = getattr(response, "status", None)
        if status not in (200, None):  # None: a file:// mirror
            raise DownloadError(url, f"unexpected HTTP status {status}")
        length = response.headers.get("Content-Length", "").strip()
        return (int(length) if length.isdigit() else None), 0  # a 200 restarts from zero

    def _stream(self, response, url: str, part: Path, offset: int, total: int | None, limit: _Limit,
                hasher, name: str) -> int:
        """Write the body to ``part`` (appending at ``offset``) as it arrives; return the number of
        bytes received."""
        received = 0
        try:  # made only now, so that a download that fails before its first byte leaves nothing
            part.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(part.parent, f"cannot create the folder ({_reason(exc)})") from None
        try:
            handle = open_no_follow(part, "ab" if offset else "wb")
        except OSError as exc:
            raise DownloadError(part, _write_problem(exc)) from None
        read = getattr(response, "read1", response.read)  # read1: what has arrived, without waiting for more
        speed = _SpeedRule(self.min_speed, self.stall_seconds)
        with handle, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=name, leave=False, disable=not self.progress, miniters=1) as bar:
            while True:
                try:
                    chunk = read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise _Transient(_reason(exc)) from None
                if not chunk:
                    break
                if offset + received == 0 and chunk.lstrip()[:9].lower().startswith(_HTML_STARTS):
                    raise DownloadError(url, "the server returned an HTML page instead of the file; "
                                             "check the mirror URL")
                if total is not None and offset + received + len(chunk) > total:
                    raise DownloadError(url, f"larger than expected: more than the {total} bytes "
                                             f"{'expected' if limit.exact else 'announced'}")
                limit.check(offset + received + len(chunk), url, "received")
                try:
                    handle.write(chunk)
                except OSError as exc:
                    raise DownloadError(part, f"cannot write ({_reason(exc)})") from None
                if hasher is not None:
                    hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                slow = speed.add(len(chunk))
                if slow:
                    raise _Transient(slow)
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                raise DownloadError(part, f"cannot write ({_reason(exc)})") from None
        return received


def _update_registry(out: Path, fetched: list[Study]) -> Path:
    """Write the registry: the studies already registered or present, plus those just fetched."""
    try:
        known = {s.study_id: s for s in discover_studies(out)}
    except DataError:  # e.g. masks of an earlier download missing from the registry
        known = {}
    for study_id in ANNOTATED_IDS:  # annotated studies from earlier runs with other ids
        image, mask = study_path(out, study_id, CATEGORY), mask_path(out, study_id)
        if image.is_file():
            known[study_id] = Study(study_id, CATEGORY, image, mask if mask.is_file() else None)
    known.update((s.study_id, s) for s in fetched)
    try:
        return write_registry(out, list(known.values()))
    except OSError as exc:
        raise DownloadError(out / REGISTRY_NAME, f"cannot write ({_reason(exc)})") from None


class _HeaderDeadline:
    """Gives up on a request whose status line and headers have not all arrived ``seconds`` after
    it started: a timeout per read alone lets a server trickle them a byte at a time. On expiry the
    connection's socket is shut down, which fails the read that is waiting."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._timer: threading.Timer | None = None

    def start(self, connection: http.client.HTTPConnection) -> None:
        self.stop()
        self.expired = False

        def expire():
            self.expired = True
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        self._timer = threading.Timer(self.seconds, expire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _build_opener(deadline: _HeaderDeadline) -> urllib.request.OpenerDirector:
    """urllib's opener, with ``deadline`` started as each HTTP(S) connection is made."""

    def watched(base):
        class Connection(base):
            def connect(self):
                deadline.start(self)
                super().connect()

        return Connection

    http_connection, https_connection = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


class _SpeedRule:
    """Fails a transfer that brings less than ``min_speed`` bytes/s over a ``window`` of seconds."""

    def __init__(self, min_speed: float, window: float):
        self.min_speed, self.window = min_speed, window
        self.start, self.bytes = time.monotonic(), 0

    def add(self, count: int) -> str | None:
        """Count ``count`` new bytes; return the problem if the window closed too slowly."""
        self.bytes += count
        elapsed = time.monotonic() - self.start
        if elapsed < self.window:
            return None
        if self.bytes < self.min_speed * elapsed:
            return (f"too slow: {self.bytes} bytes in {elapsed:.3g} s, less than the "
                    f"{self.min_speed:g} bytes/s required")
        self.start, self.bytes = time.monotonic(), 0
        return None


def _inside(out: Path, path: str) -> Path:
    """``out / path``, refused if a symbolic link or ``..`` would take it outside ``out``."""
    target = out / path
    root = out.resolve()
    parent = target.parent
    if ".." in Path(path).parts or not parent.resolve().is_relative_to(root):
        raise DownloadError(target, f"lies outside the download folder {out} (a symbolic link on the way?); "
                                    "refusing to write there")
    return target


def _refuse_links(target: Path) -> Path:
    """Refuse a symbolic link at ``target`` or at its ``.part`` file; return the ``.part`` path."""
    part = target.with_name(target.name + PART_SUFFIX)
    for path in (target, part):
        if path.is_symlink():
            raise DownloadError(path, "is a symbolic link; refusing to follow it (remove it, or download "
                                      "into a folder without links)")
    return part


def _write_problem(exc: OSError, failed: str = "cannot write") -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link; refusing to follow it"
    return f"{failed} ({_reason(exc)})"


def _checked_ids(ids: Iterable[int]) -> list[int]:
    checked: list[int] = []
    for study_id in ids:
        try:
            if isinstance(study_id, bool):
                raise TypeError
            study_id = operator.index(study_id)
        except TypeError:
            raise DownloadError(None, f"study ids must be integers, got {study_id!r}") from None
        if study_id not in checked:
            checked.append(study_id)
    return checked


def _blob_hasher(size: int):
    return hashlib.sha1(b"blob %d\0" % size)


def _hash_into(hasher, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                hasher.update(chunk)
    except OSError as exc:
        raise DownloadError(path, f"unreadable ({_reason(exc)})") from None


def _hash_or_raise(path: Path) -> str:
    try:
        return git_blob_sha1(path)
    except OSError as exc:
        raise DownloadError(path, f"unreadable ({_reason(exc)})") from None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise DownloadError(path, f"cannot delete ({_reason(exc)})") from None


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = (exc.headers.get("Retry-After") or "").strip() if exc.headers else ""
    return float(value) if value.isdigit() else None


def _reason(exc: BaseException | str) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."
