"""Chapters cannot hang silently: every cell is bounded, in jupyter-book's executor and in nbval."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
EXT = REPO / "book" / "_ext"
sys.path.insert(0, str(EXT))
import cell_timeouts  # noqa: E402

HANG = "import time\ntime.sleep(600)  # a cell that never answers in time"
CHAPTER = textwrap.dedent(
    f"""\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
    kernelspec:
      display_name: Python 3
      language: python
      name: python3
    ---
    # A chapter with a stalled cell

    ```{{code-cell}} ipython3
    x = 1
    ```

    ```{{code-cell}} ipython3
    {HANG.replace(chr(10), chr(10) + "    ")}
    ```
    """
)


def _cell(source="x = 1", tags=()):
    return nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)} if tags else {})


def test_training_cells_get_the_longer_bound(monkeypatch):
    monkeypatch.delenv("COVIDSEG_CELL_TIMEOUT", raising=False)
    monkeypatch.delenv("COVIDSEG_TRAINING_CELL_TIMEOUT", raising=False)
    assert cell_timeouts.timeout_for(_cell()) == cell_timeouts.CELL_TIMEOUT_S
    assert cell_timeouts.timeout_for(_cell(tags=["training"])) == cell_timeouts.TRAINING_CELL_TIMEOUT_S
    assert cell_timeouts.CELL_TIMEOUT_S <= 300 < cell_timeouts.TRAINING_CELL_TIMEOUT_S


def test_bounds_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("COVIDSEG_CELL_TIMEOUT", "7")
    monkeypatch.setenv("COVIDSEG_TRAINING_CELL_TIMEOUT", "70")
    assert cell_timeouts.timeout_for(_cell()) == 7
    assert cell_timeouts.timeout_for(_cell(tags=["training"])) == 70
    monkeypatch.setenv("COVIDSEG_CELL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"COVIDSEG_CELL_TIMEOUT='soon'"):
        cell_timeouts.timeout_for(_cell())


def test_nbval_cells_get_the_bounds_and_time_to_flush_their_outputs(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("COVIDSEG_TRAINING_CELL_TIMEOUT", raising=False)
    option = SimpleNamespace(nbval_cell_timeout=2000)
    item = SimpleNamespace(cell=_cell(tags=["training"]), config=SimpleNamespace(option=option), output_timeout=5)
    cell_timeouts.pytest_runtest_call(item)
    assert option.nbval_cell_timeout == cell_timeouts.TRAINING_CELL_TIMEOUT_S
    assert item.output_timeout == cell_timeouts.OUTPUT_FLUSH_TIMEOUT_S > 5


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDSEG_")}
    env.update(MPLBACKEND="Agg", **extra)
    return env


@pytest.mark.slow
def test_stalled_cell_fails_in_jupyter_book_naming_chapter_and_cell(tmp_path):
    book = tmp_path / "book"
    book.mkdir()
    (book / "stalled_chapter.md").write_text(CHAPTER)
    (book / "_toc.yml").write_text("format: jb-book\nroot: stalled_chapter\n")
    (book / "_config.yml").write_text(
        textwrap.dedent(
            f"""\
            title: timeout test
            execute:
              execute_notebooks: force
              timeout: 2400
            sphinx:
              local_extensions:
                cell_timeouts: {EXT}
              config:
                nb_execution_raise_on_error: true
            """
        )
    )
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    start = time.monotonic()
    done = subprocess.run([str(jupyter_book), "build", str(book)], capture_output=True, text=True,
                          env=_env(COVIDSEG_CELL_TIMEOUT="5"), timeout=300)
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert elapsed < 240  # the 600 s cell was cut at its 5 s bound
    assert "stalled_chapter" in output, output[-3000:]
    assert "timed out" in output and "time.sleep(600)" in output, output[-3000:]


@pytest.mark.slow
def test_stalled_cell_fails_under_nbval_naming_notebook_and_cell(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[_cell(), _cell(HANG)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "stalled_chapter.ipynb")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "cell_timeouts", "--nbval-lax",
         "-o", "addopts=", "-o", "testpaths=", "stalled_chapter.ipynb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=_env(COVIDSEG_CELL_TIMEOUT="5", PYTHONPATH=str(EXT)),
    )
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert elapsed < 240
    assert "stalled_chapter.ipynb::Cell 1" in output, output[-3000:]
    assert "Timeout of 5 seconds exceeded" in output, output[-3000:]


LONG_CALLS = ("train_or_reuse(", "evaluate_or_reuse(")


NOTEBOOK_CHAPTERS = sorted(p for p in (REPO / "book").glob("*.md") if "kernelspec:" in p.read_text())


@pytest.mark.parametrize("chapter", NOTEBOOK_CHAPTERS, ids=lambda p: p.name)
def test_cells_that_train_or_score_models_are_tagged_training(chapter):
    import jupytext

    for index, cell in enumerate(jupytext.read(chapter).cells):
        if cell.cell_type == "code" and any(call in cell.source for call in LONG_CALLS):
            assert cell_timeouts.TRAINING_TAG in cell.metadata.get("tags", []), (
                f"{chapter.name}, cell {index}: trains or scores a model but is not tagged training")
