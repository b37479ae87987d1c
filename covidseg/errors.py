"""Exceptions raised by covidseg.

Every error names the file it is about and the problem, on one line, so that the CLI can print
it as ``covidseg: error: <message>`` without a traceback.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["CovidsegError", "DataError", "DownloadError", "CheckpointError", "RunFolderError", "RunMismatchError", "TrainingDiverged", "WeightsUnavailableError"]


class CovidsegError(Exception):
    """Base class: a problem the user can fix, reported on one line.

    Args:
        path: The file or folder the problem is about (``None`` if it is about none).
        problem: What is wrong with it, as a short phrase.
    """

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # always a single line
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class DataError(CovidsegError):
    """A CT study, mask, registry or data folder that cannot be used as it is."""


class DownloadError(CovidsegError):
    """A download that failed or did not verify."""


class CheckpointError(CovidsegError):
    """A checkpoint that is missing, damaged, unsafe or made for another model or config."""


class RunMismatchError(CheckpointError):
    """A run that was made with another config or on other data than asked for."""


class RunFolderError(CovidsegError):
    """A run folder that cannot take this run: another process writes to it, it holds files of
    another run or of the user, or it holds nothing that can be resumed."""


class TrainingDiverged(CovidsegError):
    """Training produced a non-finite loss or non-finite weights; nothing of that epoch is kept."""


class WeightsUnavailableError(CovidsegError):
    """Pretrained encoder weights that cannot be obtained (offline, not cached) or used.

    The message says how to go on: ``encoder_weights=None`` to train from scratch, or a local
    weights file or folder (``--encoder-weights PATH`` on the command line).
    """
