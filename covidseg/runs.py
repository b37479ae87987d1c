"""Run folders: which files make a run, which folders a new run may use, and one writer at a time.

A run folder (``covidseg train --out``) holds the files of :data:`RUN_FILES` and nothing else
that covidseg writes. A new run needs a new or empty folder, so that no file of another run, or of
the user, is ever written over; ``--resume`` needs a folder holding a resumable run. While a run
trains, it holds an exclusive lock on the folder (:func:`run_lock`, with ``filelock``): a second
``covidseg train`` into the same folder is refused at once, naming the process that holds it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import RunFolderError
from .files import atomic_write, remove_stale_temporaries

__all__ = ["RUN_FILES", "LOCK_NAME", "OWNER_NAME", "is_run_file", "folder_contents", "run_lock"]

RUN_FILES = ("config.json", "last.pt", "best.pt", "history.csv", "history.json", "finished.json")
"""The files of a run (and ``<part>-scores.json``, see :func:`is_run_file`)."""

LOCK_NAME = ".covidseg.lock"
"""The lock file of a run folder (kept after the run: removing it could let two writers in)."""

OWNER_NAME = ".covidseg.owner"
"""Names the process that holds the lock (process id and host), while it holds it."""


def is_run_file(name: str) -> bool:
    """Whether a file name is one covidseg writes into a run folder."""
    return name in RUN_FILES or (name.endswith("-scores.json") and name.count("-") == 1)


def folder_contents(folder: str | os.PathLike) -> list[str]:
    """The sorted names in ``folder`` other than its lock files (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, OWNER_NAME))


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe_contents(names: list[str]) -> str:
    """``'holds best.pt, history.json'``: what a folder holds, run files first."""
    ordered = sorted(names, key=lambda n: (not is_run_file(n), n))
    return f"holds {_listing(ordered)}"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[bool]:
    """Hold the run folder's lock while the block runs; yield whether the folder was created.

    The folder is created if missing; if the block fails before a run file is written, the lock
    file (and the folder) this call created are removed again. Stale temporary files of killed writers are
    removed once the lock is held.

    Raises:
        RunFolderError: If another process holds the lock (the message names it).
        OSError: If the folder cannot be created or written.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    new_lock = not (run_dir / LOCK_NAME).exists()
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError(run_dir, f"another covidseg process is writing this run folder ({_owner(run_dir)}); "
                                      "wait for it to finish or choose another --out") from None
    failed, before = False, folder_contents(run_dir)
    try:
        with contextlib.suppress(OSError), atomic_write(run_dir / OWNER_NAME) as handle:  # only for the message
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        remove_stale_temporaries(run_dir)
        yield created
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(OSError):
            (run_dir / OWNER_NAME).unlink()
        lock.release()
        if failed and new_lock and folder_contents(run_dir) == before:
            with contextlib.suppress(OSError):  # a run that failed before writing anything leaves nothing
                (run_dir / LOCK_NAME).unlink()
                if created:
                    run_dir.rmdir()


def _owner(run_dir: Path) -> str:
    try:
        return (run_dir / OWNER_NAME).read_text(encoding="utf-8").strip() or "pid unknown"
    except (OSError, UnicodeDecodeError):
        return "pid unknown"
