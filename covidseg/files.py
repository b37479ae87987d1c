"""Writing files safely: write-then-rename, the user's umask, and no temporaries left behind.

Every file covidseg writes (checkpoints, histories, masks, phantom studies, score files, downloads)
goes through :func:`atomic_write` or :func:`atomic_path`: the data is written to a hidden temporary
file in the target's folder, flushed to disk, given the mode a plain ``open(path, "w")`` would
give it, and renamed over the target. A reader sees the old file or the new one, never a partial
one, and a failed write leaves the old file untouched.

Temporary names carry the writer's process id, ``.NAME.PID.RANDOM.tmp``, so that
:func:`remove_stale_temporaries` can remove what a killed process left behind without touching a
file that a live process is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write",
    "check_output_file",
    "install",
    "new_file_mode",
    "open_no_follow",
    "read_json_object",
    "remove_stale_temporaries",
    "temporary_name",
    "write_json",
    "write_text",
]

_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?P<suffix>\.[\w.]+)?$")


def temporary_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh hidden temporary path beside ``path``: ``.NAME.PID.RANDOM.tmp[SUFFIX]``.

    Args:
        path: The target file or folder.
        suffix: Appended after ``.tmp``, for writers that choose the format by the file name
            (``.nii.gz`` for nibabel).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def new_file_mode(path: str | os.PathLike) -> int:
    """The permission bits ``open(path, "w")`` would leave: those of the file being replaced, or
    ``0o666`` less the process umask for a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux 4.7+
    reports it in ``/proc/self/status``; setting and restoring it would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_output_file(path: str | os.PathLike, example: str, replaceable=None) -> Path:
    """Check, before any work is done, that a command may write its output file at ``path``.

    A command writes over no file it did not create: an existing file is replaced only if
    ``replaceable(path)`` says it is an earlier output of the same kind.

    Args:
        path: The output file.
        example: A file name to suggest, e.g. ``'scores.json'``.
        replaceable: ``path -> bool``; without it, no existing file is replaced.

    Raises:
        DataError: If ``path`` is a folder, lies under a file, or is a file that may not be
            replaced; nothing is written.
    """
    from .errors import DataError

    path = Path(path)
    if path.is_dir():
        raise DataError(path, f"is a folder; give a file name such as {example}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(path, f"cannot write here: {parent} is a file, not a folder")
    if (path.exists() or path.is_symlink()) and not (path.is_file() and replaceable is not None and replaceable(path)):
        raise DataError(path, f"already exists and was not written by this command; it is left as it is: "
                                  f"give a new file name such as {example}")
    return path


def _sync_folder(folder: Path) -> None:
    """Flush a rename to disk (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install(tmp: str | os.PathLike, path: str | os.PathLike, mode: int | None = None) -> None:
    """Give a finished file its final name: flush ``tmp`` to disk, give it ``mode`` (by default
    :func:`new_file_mode` of ``path``), rename it over ``path`` and flush the rename.

    The last step of :func:`atomic_path`, and of writers whose temporary file must keep a fixed
    name between runs (a resumable download's ``.part`` file).

    Raises:
        OSError: If ``tmp`` is a symbolic link or missing, or the rename fails.
    """
    mode = new_file_mode(path) if mode is None else mode
    fd = os.open(tmp, os.O_RDONLY | _NO_FOLLOW)
    try:
        os.fsync(fd)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        else:  # pragma: no cover - Windows before Python 3.13
            os.chmod(tmp, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _sync_folder(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name; when the block
    ends without an exception the file is flushed, given :func:`new_file_mode` and renamed over
    ``path``. On an exception the temporary file is removed and ``path`` is untouched.

    The temporary file is created empty and exclusively (never through a symbolic link). Before
    it is, the temporaries that killed processes left in the folder are removed
    (:func:`remove_stale_temporaries`), so every later write cleans up after a killed one.

    Args:
        path: The target file; its folder is created if missing.
        suffix: See :func:`temporary_name`.

    Raises:
        OSError: If the folder cannot be written, the disk is full, or the rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temporary_name(path, suffix)
    mode = new_file_mode(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o600)
    os.close(fd)
    try:
        yield tmp
        install(tmp, path, mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` when the block
    ends without an exception (see :func:`atomic_path`).

    Args:
        path: The target file.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: Text encoding (ignored for ``"wb"``).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "history.json"
        >>> with atomic_write(target) as handle:
        ...     _ = handle.write("[]\\n")
        >>> target.read_text()
        '[]\\n'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (:func:`atomic_write`).

    Raises:
        DataError: If it cannot be written; the previous file is then kept.
    """
    from .errors import DataError

    try:
        with atomic_write(path) as handle:
            handle.write(text)
    except OSError as exc:
        raise DataError(path, f"could not be written ({exc.strerror or exc}); the previous file is kept") from None


def read_json_object(path: str | os.PathLike, max_bytes: int = 64 << 20) -> dict | None:
    """The JSON object in ``path``, or ``None`` if it is absent, unreadable, larger than
    ``max_bytes``, not JSON, or not an object: what the commands read to recognise their own
    outputs before replacing them (:func:`check_output_file`)."""
    import json

    try:
        if Path(path).stat().st_size > max_bytes:
            return None
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str | os.PathLike, value) -> None:
    """Write ``value`` as indented JSON, atomically (see :func:`write_text`)."""
    import json

    write_text(path, json.dumps(value, indent=2) + "\n")


_OPEN_FLAGS = {
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def open_no_follow(path: str | os.PathLike, mode: str = "ab"):
    """``open(path, mode)`` for writing, refusing to follow a symbolic link at ``path``.

    A new file gets ``0o666`` less the umask, as with :func:`open`; an existing file keeps its mode.

    Args:
        path: The file to create, truncate (``"wb"``) or append to (``"ab"``, ``"a"``).
        mode: ``"wb"``, ``"ab"`` or ``"a"`` (text).

    Raises:
        IsADirectoryError, PermissionError...: As :func:`open`.
        OSError: With ``errno.ELOOP`` if ``path`` is a symbolic link (checked with ``lstat`` and,
            where the platform has it, by ``O_NOFOLLOW``, which closes the race between the two).
    """
    if mode not in _OPEN_FLAGS:
        raise ValueError(f"mode must be one of {', '.join(_OPEN_FLAGS)}, got {mode!r}")
    if os.path.islink(path):
        raise OSError(errno.ELOOP, "is a symbolic link; not following it", os.fspath(path))
    fd = os.open(path, _OPEN_FLAGS[mode] | _NO_FOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (see :func:`temporary_name`) that processes which
    are no longer running left in ``folder`` (killed by SIGKILL or a power loss).

    A process is taken to be running if a process with its id exists on this machine; a folder
    written from two machines at once (a network drive) must not rely on this.

    Returns:
        The paths removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
