"""Colab setup: what a chapter of the book does in Google Colab, and only there.

A chapter opened from the book's Colab button runs on a fresh machine that has neither the
package nor the data, and that Colab takes back when the session ends (a free session lasts a
few hours at most, and less when the browser is idle). Three things let a chapter finish anyway:

1. Its ``.ipynb`` twin asks Colab for a GPU: the notebook metadata :data:`NOTEBOOK_METADATA`, as
   Colab itself writes it, sits in the front matter of every chapter that trains (jupytext
   carries it into the twin).
2. Its first cell, :data:`SETUP_CELL` (the same in every chapter), installs the release the book
   was built from: :data:`INSTALL_REQUIREMENT`, the git tag ``v{covidseg.__version__}``.
3. Its parameters cell, ``setup = choose_setup(drive=True)``
   (:func:`covidseg.notebook.choose_setup`), calls :func:`prepare`. With the Drive switch on,
   Google Drive is mounted and the data and the training runs are kept in
   ``MyDrive/covidseg/``: running the chapter again after a disconnect finds the data (verified,
   not fetched again) and resumes an unfinished run from its ``last.pt``
   (:func:`covidseg.runs.train_or_reuse`); a finished run is reused, never deleted.

Nothing happens at import. Outside Colab (:func:`in_colab` is false) nothing here is called.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import __version__

__all__ = [
    "REPOSITORY_URL",
    "RELEASE_TAG",
    "INSTALL_REQUIREMENT",
    "SETUP_CELL",
    "NOTEBOOK_METADATA",
    "CONTENT",
    "DRIVE_FOLDER",
    "in_colab",
    "prepare",
]

REPOSITORY_URL = "https://github.com/covidseg/covidseg"
"""The public repository; the book's ``_config.yml`` and ``pyproject.toml`` name the same one."""

RELEASE_TAG = f"v{__version__}"
"""The git tag of this release, derived from ``covidseg.__version__`` (the one place the version
is written). The chapters install from it, so it must be pushed to :data:`REPOSITORY_URL` when
the book is published: ``git tag v<version> && git push origin v<version>``."""

INSTALL_REQUIREMENT = f"covidseg @ git+{REPOSITORY_URL}@{RELEASE_TAG}"
"""What :data:`SETUP_CELL` asks pip for: this release, from its tag (not a branch that moves)."""

SETUP_CELL = (
    "# Setup: in Colab, installs the covidseg release this book was built from; elsewhere, nothing.\n"
    "import sys\n"
    "\n"
    'if "google.colab" in sys.modules:\n'
    f'    %pip install --quiet "{INSTALL_REQUIREMENT}"'
)
"""The first code cell of every chapter, word for word. It cannot import covidseg (it installs
it), so it only installs; :func:`prepare` does the rest, from the parameters cell."""

NOTEBOOK_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}
"""Notebook metadata with which Colab opens a notebook on a GPU runtime (a T4, the GPU of free
sessions): what Colab writes after *Runtime > Change runtime type > T4 GPU*."""

CONTENT = Path("/content")
"""Colab's working folder; it goes with the machine when the session ends."""

DRIVE_FOLDER = Path("MyDrive") / "covidseg"
"""Where the data (``mosmeddata/``) and the runs (``runs/``) are kept, inside mounted Google Drive."""


def in_colab() -> bool:
    """Whether this runs in Google Colab, whose kernel imports ``google.colab`` at start (the
    test the chapters' setup cell makes too)."""
    return "google.colab" in sys.modules


def prepare(drive: bool = True, fetch: bool = True, progress: bool = True, *, content: str | os.PathLike = CONTENT,
            mirror: str | None = None, manifest: str | os.PathLike | None = None) -> Path | None:
    """Make a Colab session ready for a chapter: Google Drive, the runs folder and the real data.

    With ``drive``, Google Drive is mounted at ``<content>/drive`` (Colab asks for permission once
    per session) and everything is kept in ``<content>/drive/``:data:`DRIVE_FOLDER`: the data in
    ``mosmeddata/``, the runs in ``runs/`` (through ``COVIDSEG_RUNS``,
    :data:`covidseg.notebook.RUNS_ENV`, unless it is set already). If the mount fails (permission
    refused), one line says so and the session goes on without Drive. Without Drive, the data go
    to ``<content>/mosmeddata`` and the runs to ``runs`` in the current folder, and both are lost
    with the session. (Colab uploads what is written to Drive a little later: a ``last.pt`` written
    just before the machine is lost may be lost with it, and the run then resumes from an earlier
    epoch.)

    With ``fetch``, the 50 annotated studies are downloaded and verified
    (:func:`covidseg.download.download`): files already there and intact are not fetched again, a
    file cut off by a disconnect is resumed, a damaged one is fetched anew.

    Args:
        drive: Keep the data and the runs in Google Drive.
        fetch: Download (or verify) the data.
        progress: Progress bars for the download.
        content: Colab's working folder (:data:`CONTENT`).
        mirror: Base URL of the data mirror (default :data:`covidseg.download.DEFAULT_MIRROR`).
        manifest: A manifest file in place of the packaged one (see :func:`covidseg.download.download`).

    Returns:
        The data folder, or ``None`` if ``fetch`` is false.

    Raises:
        DownloadError: As :func:`covidseg.download.download`, on one line naming the file.
    """
    from .download import CREDIT, DEFAULT_MIRROR, download
    from .notebook import RUNS_ENV

    content = Path(content)
    root = content
    if drive:
        mount = content / "drive"
        try:
            from google.colab import drive as google_drive

            google_drive.mount(str(mount))
        except Exception as exc:  # e.g. permission refused; the chapter still runs, without Drive
            print(f"Google Drive not mounted at {mount} ({' '.join(str(exc).split()) or type(exc).__name__}): "
                  "the data and the runs stay on this machine and end with the session")
        else:
            root = mount / DRIVE_FOLDER
            os.environ.setdefault(RUNS_ENV, str(root / "runs"))
            print(f"Google Drive mounted: data in {root / 'mosmeddata'}, runs in {os.environ[RUNS_ENV]} "
                  "(kept after the session; run the chapter again to continue)")
    if not fetch:
        return None
    data = root / "mosmeddata"
    files = download(data, mirror=mirror or DEFAULT_MIRROR, manifest=manifest, progress=progress)
    print(CREDIT)
    print(f"{len(files)} files of MosMedData verified in {data}")
    return data
