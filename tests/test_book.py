"""The book's structure, checked without executing anything.

Every chapter of ``_toc.yml`` is a MyST notebook with an output-free ``.ipynb`` twin in sync with
it (the Colab button opens the twin), follows the common skeleton, starts with the Colab setup cell
that installs this release from the repository ``_config.yml`` names, asks Colab for a GPU where it
trains, and marks at least one deterministic cell for nbval.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

jupytext = pytest.importorskip("jupytext")
yaml = pytest.importorskip("yaml")

from covidseg import __version__, colab  # noqa: E402

COLAB = "https://colab.research.google.com"
CHECK_OUTPUT = "nbval-check-output"
"""nbval's cell tag (cell metadata, so the published code shows no marker)."""
NO_CHECK_OUTPUT = re.compile(r"^% no nbval-check-output: \S.*$", re.MULTILINE)
"""How a chapter without deterministic cells says why: a MyST comment line (not rendered)."""

MUST_CHECK_OUTPUT = ("book/02_dataset", "book/03_preprocessing", "book/04_segmentation_and_dice")
"""Chapters that have deterministic cells (Table 3.1, preprocessing statistics, toy metrics)."""

PAGES = ("book/course",)
"""Pages of ``_toc.yml`` that are not notebook chapters (no code, no twin)."""

INSTALL = re.compile(r'^\s*%pip install\b.*"(?P<requirement>covidseg @ [^"]+)"', re.MULTILINE)

TRAINING = "training"
"""The tag of the cells that train or score a model: a chapter with one asks Colab for a GPU."""


def _load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


def _chapters() -> list[str]:
    """Chapter paths without suffix, as ``_toc.yml`` lists them (the root first)."""
    toc = _load_yaml("_toc.yml")
    files = [toc["root"]] + [entry["file"] for entry in toc.get("chapters", [])]
    return [f for f in files if f not in PAGES]


CHAPTERS = _chapters()


@pytest.fixture(scope="module")
def config() -> dict:
    return _load_yaml("_config.yml")


def _read(chapter: str, suffix: str):
    path = REPO / f"{chapter}{suffix}"
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO)} is missing")
    return jupytext.read(path)


def _code(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _trains(chapter: str) -> bool:
    return any(TRAINING in cell.metadata.get("tags", []) for cell in _code(_read(chapter, ".md")))


def _comparable(notebook) -> list:
    """Cells as (type, source, metadata), without the ids jupytext draws at random."""
    return [(cell.cell_type, cell.source, dict(cell.metadata)) for cell in notebook.cells]


# --------------------------------------------------------------------------- _config.yml


def test_config_points_colab_at_the_main_branch_and_hides_the_twins(config):
    assert config["repository"]["branch"] == "main"  # the theme defaults to master
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", config["repository"]["url"])
    assert config["launch_buttons"]["colab_url"].rstrip("/") == COLAB
    assert "**.ipynb" in config["exclude_patterns"]  # the .md files are the sources; no page twice
    assert config["execute"]["execute_notebooks"] == "force"
    assert config["execute"]["allow_errors"] is False


def test_toc_lists_unique_chapters_under_book():
    assert len(set(CHAPTERS)) == len(CHAPTERS)
    assert all(re.fullmatch(r"book/\d\d_\w+", chapter) for chapter in CHAPTERS)


def test_toc_has_the_course_page_and_the_extensions_are_configured(config):
    toc = _load_yaml("_toc.yml")
    assert "book/course" in [entry["file"] for entry in toc.get("chapters", [])]
    assert (REPO / "book" / "course.md").is_file()
    assert "sphinx_exercise" in config["sphinx"]["extra_extensions"]
    assert all((REPO / path).is_file() for path in config["bibtex_bibfiles"])


def test_exercise_labels_are_unique_across_the_book():
    labels = [label for chapter in CHAPTERS for label in
              re.findall(r"^:label: (\S+)$", (REPO / f"{chapter}.md").read_text(encoding="utf-8"), re.MULTILINE)]
    assert len(labels) == len(set(labels))


# --------------------------------------------------------------------------- the twins


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_has_an_output_free_ipynb_twin_with_the_same_code(chapter):
    source, twin = _read(chapter, ".md"), _read(chapter, ".ipynb")
    assert [cell.source for cell in _code(twin)] == [cell.source for cell in _code(source)]
    for cell in _code(twin):
        assert cell.get("outputs", []) == [], f"{chapter}.ipynb holds outputs"
        assert cell.get("execution_count") is None, f"{chapter}.ipynb holds execution counts"
    assert source.metadata["jupytext"]["formats"] == "ipynb,md:myst"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_twin_is_what_jupytext_makes_from_the_chapter(chapter, tmp_path):
    """Regenerating the twin from the .md (``jupytext --sync``) must change nothing."""
    source = REPO / f"{chapter}.md"
    if not source.is_file():
        pytest.fail(f"{chapter}.md is missing")
    regenerated = tmp_path / f"{source.stem}.ipynb"
    jupytext.write(jupytext.read(source), regenerated, fmt="ipynb")
    twin = _read(chapter, ".ipynb")
    fresh = jupytext.read(regenerated)
    assert _comparable(twin) == _comparable(fresh), f"{chapter}.ipynb is out of date: run make sync-notebooks"
    assert twin.metadata.get("kernelspec") == fresh.metadata.get("kernelspec")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_colab_button_opens_a_twin_in_the_repository(chapter, config):
    """The URL sphinx-book-theme builds: <colab>/github/<org>/<repo>/blob/<branch>/<path>.ipynb,
    where .ipynb replaces .md only if the twin exists beside the source."""
    org, repo = config["repository"]["url"].rstrip("/").split("/")[-2:]
    branch = config["repository"]["branch"]
    prefix = config["repository"].get("path_to_book", "").strip("/")
    page = f"{prefix}/{chapter}" if prefix else chapter
    suffix = ".ipynb" if (REPO / page).with_suffix(".ipynb").is_file() else ".md"
    url = f"{COLAB}/github/{org}/{repo}/blob/{branch}/{page}{suffix}"
    assert url == f"{COLAB}/github/{org}/{repo}/blob/main/{chapter}.ipynb"
    target = REPO / url.split(f"/blob/{branch}/", 1)[1]
    assert target.is_file()
    if shutil.which("git") and (REPO / ".git").exists():  # an ignored twin would never be pushed
        ignored = subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=REPO)
        assert ignored.returncode == 1, f"{target.relative_to(REPO)} is ignored by git"


# --------------------------------------------------------------------------- the skeleton


def test_the_setup_cell_installs_this_release_from_the_configured_repository(config):
    assert colab.REPOSITORY_URL == config["repository"]["url"].rstrip("/")
    assert colab.INSTALL_REQUIREMENT == f"covidseg @ git+{colab.REPOSITORY_URL}@v{__version__}"
    assert INSTALL.findall(colab.SETUP_CELL) == [colab.INSTALL_REQUIREMENT]
    assert 'if "google.colab" in sys.modules:' in colab.SETUP_CELL


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_setup_cell_is_the_colab_setup_cell(chapter):
    setup = _code(_read(chapter, ".md"))[0].source
    assert INSTALL.findall(setup) == [colab.INSTALL_REQUIREMENT], (
        f"{chapter}: the setup cell must install {colab.INSTALL_REQUIREMENT!r} (covidseg.colab.INSTALL_REQUIREMENT)")
    assert setup == colab.SETUP_CELL, f"{chapter}: the first code cell must be covidseg.colab.SETUP_CELL, word for word"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_training_chapters_ask_colab_for_a_gpu(chapter):
    """Colab reads the runtime type from the notebook metadata of the twin it opens; the .md carries
    it in its front matter, and its jupytext filter keeps it there through ``jupytext --sync``."""
    source, twin = _read(chapter, ".md"), _read(chapter, ".ipynb")
    keys = set(colab.NOTEBOOK_METADATA)
    if not _trains(chapter):
        assert not keys & set(twin.metadata), f"{chapter} trains nothing, so it should not ask for a GPU"
        return
    for name, notebook in ((".md", source), (".ipynb", twin)):
        found = {key: notebook.metadata.get(key) for key in keys}
        assert found == colab.NOTEBOOK_METADATA, f"{chapter}{name}: notebook metadata {found}, not {colab.NOTEBOOK_METADATA}"
    rewritten = jupytext.reads(jupytext.writes(source, fmt="md:myst"), fmt="md:myst")
    assert {key: rewritten.metadata.get(key) for key in keys} == colab.NOTEBOOK_METADATA, (
        f"{chapter}.md: jupytext drops the Colab metadata when it rewrites the file; "
        "add 'notebook_metadata_filter: accelerator,colab' to its jupytext front matter")


def test_the_chapters_that_train_are_found_by_their_tag():
    trains = [chapter for chapter in CHAPTERS if _trains(chapter)]
    assert "book/05_unet" in trains and "book/01_introduction" not in trains


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_training_shows_progress(chapter):
    calls = [line for cell in _code(_read(chapter, ".md")) for line in cell.source.splitlines() if "train_or_reuse(" in line]
    assert all("progress=True" in line for line in calls), f"{chapter}: train with progress=True: {calls}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_follows_the_skeleton(chapter):
    text = (REPO / f"{chapter}.md").read_text(encoding="utf-8")
    notebook = _read(chapter, ".md")
    number = int(Path(chapter).name[:2])
    assert re.search(rf"^# {number}\. \S", text, re.MULTILINE), f"{chapter}: title '# {number}. ...' missing"
    landmarks = [":::{admonition} What you will learn", "## Setup", "## Parameters", "## Summary", "## Exercises"]
    positions = [text.find(landmark) for landmark in landmarks]
    assert all(p >= 0 for p in positions), f"{chapter}: missing {[m for m, p in zip(landmarks, positions) if p < 0]}"
    assert positions == sorted(positions), f"{chapter}: skeleton out of order"
    assert ":class: tip" in text[positions[0] : positions[0] + 80]
    exercises = text[positions[-1] :]
    labels = re.findall(r"^:::\{exercise\}\n:label: (\S+)$", exercises, re.MULTILINE)
    solved = re.findall(r"^::::\{solution\} (\S+)\n:class: dropdown$", exercises, re.MULTILINE)
    assert labels, f"{chapter}: no sphinx-exercise exercises"
    assert solved == labels, f"{chapter}: every exercise needs a hideable (dropdown) solution, in order"
    assert "{dropdown} Solution" not in exercises, f"{chapter}: solutions belong in {{solution}} directives"

    parameters = [cell for cell in _code(notebook) if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and "choose_setup(drive=True)" in parameters[0].source
    assert sum("print(versions())" in cell.source for cell in _code(notebook)) == 1


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_checks_deterministic_output_or_says_why_not(chapter):
    notebook = _read(chapter, ".md")
    checked = [cell for cell in _code(notebook) if CHECK_OUTPUT in cell.metadata.get("tags", [])]
    in_source = [cell for cell in _code(notebook) if "NBVAL" in cell.source.upper()]
    assert not in_source, f"{chapter}: mark cells for nbval with the {CHECK_OUTPUT!r} tag, not a comment"
    if chapter in MUST_CHECK_OUTPUT:
        assert checked, f"{chapter} has deterministic cells but none tagged {CHECK_OUTPUT}"
    else:
        text = (REPO / f"{chapter}.md").read_text(encoding="utf-8")
        assert checked or NO_CHECK_OUTPUT.search(text), (
            f"{chapter}: tag a deterministic cell {CHECK_OUTPUT}, or say why there is none "
            "in a line '% no nbval-check-output: <reason>'"
        )
