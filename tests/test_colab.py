"""Colab for real: a chapter installs the book's release, keeps its data and runs in Google Drive,
shows training progress, and resumes after a disconnect.

The acceptance test executes chapter 5's ``.ipynb`` twin (what the book's Colab button opens) with
nbclient, offline, on stand-ins for what Colab provides:

- *the machine*: a new virtual environment without covidseg (the test environment's packages are
  visible through a ``.pth`` file, as Colab has torch and friends preinstalled; nothing is
  installed into the test environment), and a new, empty working folder in place of ``/content``;
- *google.colab*: a stand-in package, imported as the kernel starts (an IPython startup file), as
  Colab's kernel imports the real one; its ``drive.mount(path)`` makes ``path/MyDrive`` a link to
  a folder that outlives the machine, as Google Drive outlives a Colab session;
- *GitHub*: the setup cell's git URL is redirected (git's ``url.<base>.insteadOf``, from the
  environment) to a bare clone of this working tree, tagged ``v<version>``, served on 127.0.0.1;
  pip installs from it without an index and without build isolation;
- *the data mirror*: tiny studies for all 50 annotated ids, served on 127.0.0.1
  (:func:`conftest.serve_mirror`), with their manifest.

Cells injected into the notebook are marked with :data:`INJECTED`: one, before the parameters cell,
points :func:`covidseg.colab.prepare` at the stand-in ``/content`` and the local data mirror (the
real ones cannot be reached or written here); one, after it, shrinks the training (16 px images,
:data:`EPOCHS` epochs) as papermill-style parameters would; the last prints what the kernel sees.
Every cell of the chapter runs as written.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import NamedTuple

import pytest

import covidseg
from covidseg import colab
from covidseg.mosmed import ANNOTATED_IDS, discover_studies
from covidseg.notebook import RUNS_ENV, choose_setup
from covidseg.sources import REAL

from conftest import REPO, TINY_SETTINGS, serve_http, serve_mirror, write_tiny_dataset

CHAPTER = REPO / "book" / "05_unet.ipynb"
EPOCHS = 5
"""Epochs of the chapter's run here: the kill falls after the first, with four still to go."""
LEARNING_RATE = 1e-2
"""A rate at which the validation Dice moves within these epochs (as in test_interrupt)."""
STUDY_SHAPE = (16, 16, 6)
"""The mirror's studies: tiny, with the six slices the chapter's last figure shows."""
INJECTED = "injected-by-test"
"""Tag of the cells the test adds to the chapter."""
KERNEL = "colab-stand-in"
CELL_TIMEOUT_S = 600
DRIVE_ENV = "COLAB_STAND_IN_DRIVE"
"""Where the stand-in's Google Drive keeps its files (outside the machine's folder)."""
FACTS = "FACTS "

GOOGLE_COLAB = '"""Stand-in for Colab\'s google.colab (tests only): the drive module."""\n\nfrom . import drive  # noqa: F401\n'
GOOGLE_COLAB_DRIVE = f'''"""Stand-in for google.colab.drive (tests only)."""

import os
from pathlib import Path


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    """Make <mountpoint>/MyDrive the user's Drive: the folder ${DRIVE_ENV}, which outlives the machine."""
    my_drive = Path(mountpoint) / "MyDrive"
    my_drive.parent.mkdir(parents=True, exist_ok=True)
    if not my_drive.is_symlink():
        my_drive.symlink_to(os.environ["{DRIVE_ENV}"], target_is_directory=True)
    print(f"Mounted at {{mountpoint}}")
'''
STARTUP = "import google.colab  # as Colab's kernel does when it starts\n"


# --- covidseg.colab in this process ------------------------------------------------------------


def test_the_version_is_written_once_and_the_release_tag_is_derived_from_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "covidseg.__version__"}
    assert project["project"]["urls"]["Homepage"] == colab.REPOSITORY_URL
    assert colab.RELEASE_TAG == f"v{covidseg.__version__}"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """The stand-in google.colab package (``<root>/python``) and an IPython startup file that imports it."""
    root = tmp_path_factory.mktemp("colab-stand-in")
    package = root / "python" / "google" / "colab"  # google: a namespace package, as in Colab
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(GOOGLE_COLAB)
    (package / "drive.py").write_text(GOOGLE_COLAB_DRIVE)
    return root


def _unset(monkeypatch, name: str) -> None:
    """Unset ``name`` now, and give it back its value (or its absence) after the test, whatever the test sets."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


@pytest.fixture
def in_colab(stand_in, monkeypatch, tmp_path):
    """This process as a Colab kernel: ``google.colab`` imported; Drive kept in ``tmp_path/drive-storage``."""
    storage = tmp_path / "drive-storage"
    storage.mkdir()
    monkeypatch.setenv(DRIVE_ENV, str(storage))
    _unset(monkeypatch, RUNS_ENV)
    monkeypatch.syspath_prepend(str(stand_in / "python"))
    before = set(sys.modules)
    __import__("google.colab")
    yield storage
    for name in set(sys.modules) - before:
        if name == "google" or name.startswith("google."):
            del sys.modules[name]


@pytest.fixture(scope="module")
def data_mirror(tmp_path_factory):
    """The data mirror on 127.0.0.1 and a manifest file of its files (path, git blob SHA-1, size)."""
    root = tmp_path_factory.mktemp("data-mirror") / "v1.0"
    write_tiny_dataset(root, ids=ANNOTATED_IDS, shape=STUDY_SHAPE, registry=False)
    manifest = root.parent / "manifest.tsv"
    with serve_mirror(root, prefix="/v1.0/") as mirror:
        manifest.write_text("path\tgit_blob_sha1\tsize\n" + "".join(
            f"{path}\t{sha1}\t{len(mirror.data[path])}\n" for path, sha1 in sorted(mirror.manifest.items())))
        yield mirror, manifest


def test_prepare_keeps_data_and_runs_in_drive_and_a_rerun_fetches_nothing(in_colab, data_mirror, tmp_path, monkeypatch, capsys):
    mirror, manifest = data_mirror
    content = tmp_path / "content"
    prepare = functools.partial(colab.prepare, content=content, mirror=mirror.url, manifest=manifest, progress=False)
    data = prepare(drive=True)
    assert data == content / "drive" / colab.DRIVE_FOLDER / "mosmeddata"
    assert os.environ[RUNS_ENV] == str(content / "drive" / colab.DRIVE_FOLDER / "runs")
    stored = in_colab / "covidseg" / "mosmeddata"
    assert [s.study_id for s in discover_studies(stored)] == list(ANNOTATED_IDS)
    assert "Google Drive mounted" in capsys.readouterr().out
    asked = len(mirror.requests())
    _unset(monkeypatch, RUNS_ENV)
    assert prepare(drive=True, content=tmp_path / "next-machine") == tmp_path / "next-machine" / "drive" / colab.DRIVE_FOLDER / "mosmeddata"
    assert len(mirror.requests()) == asked  # the data are found in Drive, verified, not fetched again


def test_prepare_without_drive_keeps_everything_on_the_machine(in_colab, data_mirror, tmp_path):
    mirror, manifest = data_mirror
    data = colab.prepare(drive=False, content=tmp_path, mirror=mirror.url, manifest=manifest, progress=False)
    assert data == tmp_path / "mosmeddata" and (data / "dataset_registry.csv").is_file()
    assert RUNS_ENV not in os.environ and not (tmp_path / "drive").exists() and not any(in_colab.iterdir())


def test_a_refused_mount_is_one_line_and_the_chapter_goes_on(in_colab, tmp_path, monkeypatch, capsys):
    from google.colab import drive

    def refuse(mountpoint, **options):
        raise RuntimeError("credential propagation was unsuccessful")

    monkeypatch.setattr(drive, "mount", refuse)
    assert colab.prepare(drive=True, fetch=False, content=tmp_path) is None
    assert capsys.readouterr().out.splitlines() == [
        f"Google Drive not mounted at {tmp_path / 'drive'} (credential propagation was unsuccessful): "
        "the data and the runs stay on this machine and end with the session"]
    assert RUNS_ENV not in os.environ


def test_outside_colab_the_drive_switch_is_ignored(tiny50, monkeypatch):
    _unset(monkeypatch, "COVIDSEG_QUICK")
    _unset(monkeypatch, RUNS_ENV)
    monkeypatch.setenv("COVIDSEG_DATA", str(tiny50))
    monkeypatch.setattr(colab, "prepare", lambda *args, **kwargs: pytest.fail("prepare called outside Colab"))
    assert not colab.in_colab()
    setup = choose_setup(progress=False, drive=True)
    assert setup.data_dir == tiny50 and setup.source == REAL and not setup.colab
    assert RUNS_ENV not in os.environ


# --- the chapter in a stand-in Colab -----------------------------------------------------------


class Release(NamedTuple):
    url: str
    commit: str


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _git(*args, cwd: Path, isolated: bool = True) -> str:
    """Run git in ``cwd``; ``isolated``: without the user's and the system's git configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    if isolated:
        env.update({"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "covidseg",
                    "GIT_AUTHOR_EMAIL": "covidseg@localhost", "GIT_COMMITTER_NAME": "covidseg",
                    "GIT_COMMITTER_EMAIL": "covidseg@localhost"})
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """This working tree (its files as they are now, committed or not) as the repository on the day
    of the release: a bare git repository whose tag is :data:`covidseg.colab.RELEASE_TAG`, served on
    127.0.0.1 by git's dumb HTTP protocol."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    root = tmp_path_factory.mktemp("release")
    source = root / "source"
    for name in _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO, isolated=False).split("\0"):
        path = REPO / name
        if name and (path.is_file() or path.is_symlink()):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name, follow_symlinks=False)
    _git("init", "-q", cwd=source)
    _git("add", "-A", cwd=source)
    _git("commit", "-q", "-m", f"covidseg {covidseg.__version__}", cwd=source)
    _git("tag", colab.RELEASE_TAG, cwd=source)
    served = root / "served"
    _git("clone", "-q", "--bare", str(source), str(served / "covidseg.git"), cwd=root)
    _git("update-server-info", cwd=served / "covidseg.git")
    with serve_http(functools.partial(QuietFiles, directory=str(served))) as server:
        yield Release(f"http://127.0.0.1:{server.server_address[1]}/covidseg.git", _git("rev-parse", "HEAD", cwd=source).strip())


@pytest.fixture(scope="module")
def site_packages_view(tmp_path_factory) -> Path:
    """The test environment's installed packages, as links, without covidseg: what a new machine
    has before the setup cell runs (``.pth`` files are left out: nothing runs at start)."""
    view = tmp_path_factory.mktemp("site-packages-view")
    for folder in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        for entry in Path(folder).iterdir():
            name = entry.name.lower()
            if name.startswith(("covidseg", "__editable__")) or name.endswith(".pth") or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return view


class Machine:
    """A new Colab machine: a working folder in place of ``/content``, a Python environment without
    covidseg, and a kernel that imports the stand-in google.colab as it starts."""

    def __init__(self, root: Path, stand_in: Path, view: Path, release: Release):
        self.root, self.content = root, root / "content"
        self.content.mkdir(parents=True)
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True, timeout=300)
        self.python = self.venv / "bin" / "python"
        site = subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, timeout=120).stdout.strip()
        Path(site, "preinstalled.pth").write_text(f"{view}\n")
        spec = root / "jupyter" / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [str(self.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab stand-in", "language": "python"}))
        startup = root / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-google-colab.py").write_text(STARTUP)
        offline = "http://127.0.0.1:9"  # a closed port: anything not on 127.0.0.1 fails at once
        dropped = ("PYTHON", "COVIDSEG_", "PIP_", "GIT_", "VIRTUAL_ENV", "JUPYTER", "IPYTHON", "MPLBACKEND")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(dropped) and not k.lower().endswith("_proxy")}
        self.env.update({
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(stand_in / "python"),
            "IPYTHONDIR": str(root / "ipython"),
            "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1", "PIP_CACHE_DIR": str(root / "pip-cache"),
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{release.url}.insteadOf", "GIT_CONFIG_VALUE_0": colab.REPOSITORY_URL,
            **{name: offline for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",  # the CPU: deterministic
        })

    def run(self, notebook, drive: Path, monkeypatch, kill_when: Path | None = None):
        """Execute ``notebook`` here with ``drive`` as Google Drive; with ``kill_when``, SIGKILL the
        kernel (a lost machine) as soon as that file exists. Returns the notebook with its outputs,
        and whether the kernel was killed."""
        from jupyter_client.manager import AsyncKernelManager
        from nbclient import NotebookClient
        from nbclient.exceptions import DeadKernelError

        monkeypatch.setenv("JUPYTER_PATH", str(self.root / "jupyter"))  # where the kernel spec is found
        client = NotebookClient(notebook, kernel_name=KERNEL, kernel_manager_class=AsyncKernelManager, timeout=CELL_TIMEOUT_S,
                                startup_timeout=300, resources={"metadata": {"path": str(self.content)}})
        killed, finished = threading.Event(), threading.Event()

        def kill_when_it_exists():
            while not finished.wait(0.01):
                provisioner = getattr(client.km, "provisioner", None)
                if kill_when.exists() and getattr(provisioner, "pgid", None):
                    os.killpg(provisioner.pgid, signal.SIGKILL)  # the kernel and anything it started
                    killed.set()
                    return

        watcher = threading.Thread(target=kill_when_it_exists, daemon=True) if kill_when else None
        if watcher:
            watcher.start()
        try:
            client.execute(env={**self.env, DRIVE_ENV: str(drive)})
        except DeadKernelError:
            if not killed.is_set():
                raise
        finally:
            finished.set()
            if watcher:
                watcher.join()
        return notebook, killed.is_set()


def _injected(source: str):
    import nbformat

    return nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED]})


def chapter(content: Path, mirror_url: str, manifest: Path):
    """Chapter 5's twin with the test's cells: the stand-ins' places before the parameters cell,
    smaller training after it, and what the kernel sees at the end."""
    import nbformat

    notebook = nbformat.read(CHAPTER, as_version=4)
    cells = notebook.cells
    at = next(i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", []))
    places = _injected(
        "import functools\nimport covidseg.colab\n\n"
        f"covidseg.colab.prepare = functools.partial(covidseg.colab.prepare, content={str(content)!r}, "
        f"mirror={mirror_url!r}, manifest={str(manifest)!r})")
    smaller = _injected(f"config = config.replace(**{TINY_SETTINGS!r}, max_epochs={EPOCHS}, lr={LEARNING_RATE})")
    facts = _injected(
        "import importlib.metadata, json, os\nimport covidseg\n\n"
        "_dist = importlib.metadata.distribution('covidseg')\n"
        f"print({FACTS!r} + json.dumps({{'version': _dist.version, 'direct_url': json.loads(_dist.read_text('direct_url.json')), "
        f"'module': covidseg.__file__, 'runs': os.environ.get({RUNS_ENV!r}), 'data_dir': str(setup.data_dir), "
        "'source': setup.source, 'colab': setup.colab, 'run_dir': str(run_dir)}))")
    notebook.cells = [*cells[:at], places, cells[at], smaller, *cells[at + 1 :], facts]
    return notebook


def _stdout(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.get("name") == "stdout")


def _facts(notebook) -> dict:
    line = next(line for line in _stdout(notebook.cells[-1]).splitlines() if line.startswith(FACTS))
    return json.loads(line[len(FACTS) :])


def _text(cell) -> str:
    """What a cell shows as text, in order: its printed output and the text of its displays (the
    progress lines of :func:`covidseg.training.fit` are one display, updated in place)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("name") == "stdout":
            parts.append(output.get("text", ""))
        elif output.get("output_type") in ("display_data", "update_display_data"):
            parts.append(output.get("data", {}).get("text/plain", "") + "\n")
    return "".join(parts)


def _training_cell(notebook):
    return next(cell for cell in notebook.cells if "train_or_reuse(" in cell.source and "training" in cell.metadata.get("tags", []))


def _epochs_reported(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\bepoch\s+(\d+)\b", text)]


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text(encoding="utf-8"))


def _without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


@pytest.mark.slow
def test_a_chapter_in_colab_installs_the_release_keeps_drive_shows_progress_and_survives_a_disconnect(
        stand_in, release, site_packages_view, data_mirror, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    from covidseg.checkpoint import load_checkpoint

    mirror, manifest = data_mirror
    view = site_packages_view
    times = {}

    # 1. A whole run: the pinned release is installed, data and runs go to Drive, training shows progress.
    started = time.perf_counter()
    first, drive_a = Machine(tmp_path / "machine-1", stand_in, view, release), tmp_path / "drive-a"
    drive_a.mkdir()
    done, killed = first.run(chapter(first.content, mirror.url, manifest), drive_a, monkeypatch)
    times["whole run (install, download, train)"] = time.perf_counter() - started
    assert not killed
    facts = _facts(done)
    assert facts["version"] == covidseg.__version__
    assert facts["direct_url"] == {"url": colab.REPOSITORY_URL, "vcs_info": {
        "vcs": "git", "requested_revision": colab.RELEASE_TAG, "commit_id": release.commit}}
    assert Path(facts["module"]).is_relative_to(first.venv)
    my_drive = first.content / "drive" / "MyDrive"
    assert facts["colab"] and facts["source"] == REAL
    assert facts["data_dir"] == str(my_drive / "covidseg" / "mosmeddata")
    assert facts["runs"] == str(my_drive / "covidseg" / "runs")
    assert Path(facts["run_dir"]).parent == my_drive / "covidseg" / "runs"
    assert [s.study_id for s in discover_studies(drive_a / "covidseg" / "mosmeddata")] == list(ANNOTATED_IDS)
    reference = _history(drive_a / "covidseg" / "runs" / Path(facts["run_dir"]).name)
    assert len(reference) == EPOCHS
    assert sorted(p.name for p in first.content.iterdir()) == ["drive"]  # nothing kept outside Drive
    printed = _epochs_reported(_text(_training_cell(done)))
    table = [row["epoch"] + 1 for row in reference]  # the chapter's own table at the end of the cell
    assert printed[-EPOCHS:] == table
    assert set(table) <= set(printed[:-EPOCHS]), f"no progress line for some epoch while training: {printed}"

    # 2. A machine lost while training: the kernel dies once an epoch is in last.pt.
    started = time.perf_counter()
    second, drive_b = Machine(tmp_path / "machine-2", stand_in, view, release), tmp_path / "drive-b"
    drive_b.mkdir()
    run_dir = drive_b / "covidseg" / "runs" / Path(facts["run_dir"]).name
    _, killed = second.run(chapter(second.content, mirror.url, manifest), drive_b, monkeypatch, kill_when=run_dir / "last.pt")
    times["run killed after an epoch"] = time.perf_counter() - started
    assert killed
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["epoch"] < EPOCHS - 1 and not (run_dir / "finished.json").exists(), "the kill came after training ended"
    asked = len(mirror.requests())

    # 3. The chapter again, on a new machine with the same Drive: it finds the data and resumes.
    started = time.perf_counter()
    third = Machine(tmp_path / "machine-3", stand_in, view, release)
    done, killed = third.run(chapter(third.content, mirror.url, manifest), drive_b, monkeypatch)
    times["run again after the disconnect"] = time.perf_counter() - started
    assert not killed
    assert len(mirror.requests()) == asked, "the data were fetched again instead of found in Drive"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]  # resumed in place, nothing beside it
    history = _history(run_dir)
    done_before = saved["epoch"] + 1
    assert history[:done_before] == saved["history"], "the epochs in last.pt were trained again"
    assert _without_times(history) == _without_times(reference), "the resumed run differs from an uninterrupted one"
    trained = _text(_training_cell(done))
    assert "resum" in trained.lower()
    assert set(range(done_before + 1, EPOCHS + 1)) <= set(_epochs_reported(trained)[:-EPOCHS]), trained
    print("; ".join(f"{what}: {seconds:.0f} s" for what, seconds in times.items()))
