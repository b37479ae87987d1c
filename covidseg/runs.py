"""Run folders: which files make a run, which folders a new run may use, and one writer at a time.

A run folder (``covidseg train --out``) holds the files of :data:`RUN_FILES` and nothing else
that covidseg writes. A new run needs a new or empty folder, so that no file of another run, or of
the user, is ever written over; ``--resume`` needs a folder holding a resumable run. While a run
trains, it holds an exclusive lock on the folder (:func:`run_lock`, with ``filelock``): a second
``covidseg train`` into the same folder is refused at once, naming the process that holds it.

:func:`folder_lock` is that lock for any folder covidseg writes into: the dataset folder of
``covidseg download`` takes it too (there a second run waits for the first instead).

:func:`train_or_reuse` trains a run, resumes an unfinished one or reuses a finished one, by the
run's identity (its config, its data and the package's code, :func:`code_fingerprint`); the
book's chapters and ``covidseg cv`` train through it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import RunFolderError
from .files import atomic_write, remove_stale_temporaries, write_json

__all__ = ["RUN_FILES", "LOCK_NAME", "OWNER_NAME", "is_run_file", "folder_contents", "folder_lock", "run_lock",
           "code_fingerprint", "train_or_reuse", "is_finished"]

RUN_FILES = ("config.json", "last.pt", "best.pt", "history.csv", "history.json", "finished.json")
"""The files of a run (and ``<part>-scores.json``, see :func:`is_run_file`)."""

LOCK_NAME = ".covidseg.lock"
"""The lock file of a run folder (kept after the run: removing it could let two writers in)."""

OWNER_SUFFIX = ".owner"
"""A lock file ``NAME.lock`` has a companion ``NAME.owner`` naming its holder (process id and
host) while it is held."""

OWNER_NAME = Path(LOCK_NAME).with_suffix(OWNER_SUFFIX).name
"""Names the process that holds a run folder's lock: ``.covidseg.owner``."""


def is_run_file(name: str) -> bool:
    """Whether a file name is one covidseg writes into a run folder."""
    return name in RUN_FILES or (name.endswith("-scores.json") and name.count("-") == 1)


def folder_contents(folder: str | os.PathLike, lock_name: str = LOCK_NAME) -> list[str]:
    """The sorted names in ``folder`` other than the lock file ``lock_name`` and its owner file
    (none if the folder does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = (lock_name, Path(lock_name).with_suffix(OWNER_SUFFIX).name)
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe_contents(names: list[str]) -> str:
    """``'holds best.pt, history.json'``: what a folder holds, run files first."""
    ordered = sorted(names, key=lambda n: (not is_run_file(n), n))
    return f"holds {_listing(ordered)}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, on_busy: Callable[[str], object],
                created: bool = False) -> Iterator[None]:
    """Hold ``folder/name`` (an exclusive ``filelock.FileLock``) while the block runs.

    While it is held, ``name`` with the suffix :data:`OWNER_SUFFIX` names the holder (``pid N on
    HOST``), and stale temporary files of killed writers have been removed from ``folder``. If
    another process holds the lock, ``on_busy(holder)`` is called first with that description: it
    raises to refuse at once, or returns to wait until the lock is free. The lock file is never
    opened through a symbolic link.

    The lock file stays after a block that changed the folder (removing it could let two writers
    in). If the block fails having changed nothing in ``folder``, the lock file this call created
    is removed again, and so is ``folder`` when ``created`` says the caller created it for this
    block: a failed first attempt leaves nothing behind.

    Args:
        folder: An existing folder.
        name: The lock file's name in it, e.g. :data:`LOCK_NAME`.
        on_busy: Called with the holder's description when the lock is taken.
        created: Whether the caller created ``folder`` for this block.

    Raises:
        OSError: If the lock file cannot be created or opened (``errno.ELOOP`` for a symbolic
            link), or whatever ``on_busy`` raises.
    """
    folder = Path(folder)
    lock_path = folder / name
    owner = lock_path.with_suffix(OWNER_SUFFIX)
    if lock_path.is_symlink():  # refused here, whatever the installed filelock release does with links
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(lock_path))
    new_lock = not lock_path.exists()
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        on_busy(_holder(owner))
        lock.acquire()
    failed, before = False, folder_contents(folder, name)
    try:
        with contextlib.suppress(OSError), atomic_write(owner) as handle:  # only for the message
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        remove_stale_temporaries(folder)
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()
        if failed and new_lock:
            with contextlib.suppress(OSError):  # a block that failed before writing anything leaves nothing
                if folder_contents(folder, name) == before:
                    lock_path.unlink()
                    if created:
                        folder.rmdir()


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[bool]:
    """Hold the run folder's lock (:func:`folder_lock`) while the block runs; yield whether the
    folder was created.

    The folder is created if missing; if the block fails before a run file is written, the lock
    file (and the folder) this call created are removed again. Stale temporary files of killed
    writers are removed once the lock is held.

    Raises:
        RunFolderError: If another process holds the lock (the message names it).
        OSError: If the folder cannot be created or written.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)

    def refuse(holder: str):
        raise RunFolderError(run_dir, f"another covidseg process is writing this run folder ({holder}); "
                                      "wait for it to finish or choose another --out")

    with folder_lock(run_dir, LOCK_NAME, refuse, created=created):
        yield created


def _holder(owner: Path) -> str:
    try:
        return owner.read_text(encoding="utf-8").strip() or "pid unknown"
    except (OSError, UnicodeDecodeError):
        return "pid unknown"


def code_fingerprint() -> str:
    """A digest of the package's Python sources, subpackages included: runs trained by other code are not reused."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def train_or_reuse(config, data_dir, run_dir: str | os.PathLike, progress: bool = True, reuse_other_code: bool = False):
    """Train ``config`` on ``data_dir`` unless a finished run of the same config, data and code
    exists; resume an unfinished one.

    A run is identified by its config (less how fast and how long one call trains:
    :meth:`~covidseg.config.TrainConfig.identity`), the identity of its data
    (:func:`covidseg.sources.data_identity`) and the package's code (:func:`code_fingerprint`).
    A run stopped by ``config.time_budget`` is not finished: the next call resumes it.
    No run is ever deleted or written over: if ``run_dir`` holds a run of another identity (or
    files that are no run), it is kept as it is, and the new run is trained beside it, in
    ``<run_dir>-<digest of its identity>``, where the next call finds and reuses it.

    Args:
        config: The run's :class:`~covidseg.config.TrainConfig`.
        data_dir: The dataset folder.
        run_dir: The run folder.
        progress: Progress bars and messages.
        reuse_other_code: Also reuse a finished run of the same config and data that other code
            trained (e.g. a long run made before the package was updated); it says so.

    Returns:
        ``(run_dir, history)``: the folder of the run used, and its history (one dict per
        epoch); :func:`is_finished` tells whether the run ended or its time budget stopped it.

    Raises:
        CovidsegError: As :func:`covidseg.training.fit` (a run folder held by another process,
            a diverged run, data that cannot be read, ...).
        KeyboardInterrupt: On Ctrl-C (:class:`~covidseg.training.TrainingInterrupted`); the
            run keeps its last completed epoch.
    """
    from .errors import RunMismatchError
    from .mosmed import annotated_studies
    from .sources import data_identity
    from .splits import get_split
    from .training import fit

    run_dir = Path(run_dir)
    split = get_split(config.split)
    identity = {
        "config": config.identity(),
        "code": code_fingerprint(),
        "data": data_identity(annotated_studies(data_dir, split.train + split.val)),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    beside = run_dir.with_name(f"{run_dir.name}-{digest}")
    for candidate in (run_dir, beside):
        record = _finished_record(candidate)
        differing = [key for key in identity if record is not None and record.get(key) != identity[key]]
        if record is not None and (not differing or (reuse_other_code and differing == ["code"])):
            if progress:
                note = " (trained by other code, reused as asked)" if differing else ""
                print(f"reusing the finished run in {candidate}{note}")
            return candidate, json.loads((candidate / "history.json").read_text(encoding="utf-8"))

    target = run_dir
    record = _finished_record(run_dir)
    if record is not None:
        why = {"config": "another config", "code": "other code", "data": "other data"}
        made = " and ".join(why[key] for key in identity if record.get(key) != identity[key]) or "an unknown identity"
        target = _beside(run_dir, beside, f"it was trained with {made}")
    elif folder_contents(run_dir) and not (run_dir / "last.pt").is_file():
        target = _beside(run_dir, beside, "it holds files that are not a resumable run")
    try:
        result = fit(config, target, data_dir=data_dir, resume=(target / "last.pt").is_file(), progress=progress)
    except RunMismatchError as exc:
        if target == beside:
            raise
        target = _beside(run_dir, beside, f"its unfinished run does not match ({exc.problem})")
        result = fit(config, target, data_dir=data_dir, resume=(target / "last.pt").is_file(), progress=progress)
    if result.stopped_by_budget:  # not finished: the next call resumes it from last.pt
        if progress:
            print(f"the run in {target} stopped for its time budget; the next call continues it")
        return target, result.history
    write_json(target / "finished.json", {**identity, "best_epoch": result.best_epoch, "card": result.card.to_dict()})
    return target, result.history


def _beside(run_dir: Path, beside: Path, why: str) -> Path:
    print(f"the run in {run_dir} is kept as it is ({why}); training the new run beside it, in {beside}")
    return beside


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a finished run: one :func:`train_or_reuse` trained to its end
    (early stopping or the epoch limit) and recorded in ``finished.json``. A run stopped by its
    time budget, or interrupted, is not finished: its ``last.pt`` resumes it."""
    return _finished_record(Path(run_dir)) is not None


def _finished_record(run_dir: Path) -> dict | None:
    """The ``finished.json`` of a run folder, or ``None`` if it has none (or an unreadable one)."""
    try:
        record = json.loads((run_dir / "finished.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None
