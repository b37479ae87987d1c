"""Per-cell time bounds for executing the chapters, in ``make book`` and in ``make test``.

A stalled cell must fail within minutes, naming its chapter and cell, while a cell that trains a
model may take much longer. Cells tagged ``training`` (``:tags: [training]`` on a ``code-cell``)
get :data:`TRAINING_CELL_TIMEOUT_S`; every other cell gets :data:`CELL_TIMEOUT_S`. The
environment variables ``COVIDSEG_CELL_TIMEOUT`` and ``COVIDSEG_TRAINING_CELL_TIMEOUT`` override
them (seconds).

Two executors use it:

- ``jupyter-book build`` (myst-nb, then nbclient): this module is a Sphinx extension
  (``_config.yml``, ``sphinx.local_extensions``) that sets nbclient's ``timeout_func``, the trait
  nbclient provides for per-cell bounds;
- nbval under pytest (``make test``): this module is also a pytest plugin (``-p cell_timeouts``)
  that sets nbval's cell timeout for each cell before it runs.
"""

from __future__ import annotations

import os

CELL_TIMEOUT_S = 300
"""Bound for a cell that does not train: a few minutes on a loaded 2-core machine."""

TRAINING_CELL_TIMEOUT_S = 2400
"""Bound for a cell tagged ``training``: the quick VGG19 U-Net trains in about 10 minutes on
2 idle cores (benchmarks/README.md); four times that leaves room for a loaded machine."""

TRAINING_TAG = "training"

OUTPUT_FLUSH_TIMEOUT_S = 60
"""How long nbval may wait for a cell's remaining outputs once the kernel has replied. nbval's own
bound is 5 s (``IPyNbCell.output_timeout``, fixed in its code); a cell that trained for minutes
on a loaded 2-core machine, updating its progress display, once took longer than that to flush
them (chapter 11, five folds), and nbval then failed the finished cell. A cell that never replies
is still bounded by :func:`timeout_for`."""


def _seconds(variable: str, default: int) -> int:
    text = os.environ.get(variable)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r}: expected a whole number of seconds") from None
    if value < 1:
        raise ValueError(f"{variable}={text!r}: must be at least 1 second")
    return value


def timeout_for(cell) -> int:
    """The bound in seconds for one notebook cell (an nbformat cell), from its tags."""
    if TRAINING_TAG in cell.get("metadata", {}).get("tags", []):
        return _seconds("COVIDSEG_TRAINING_CELL_TIMEOUT", TRAINING_CELL_TIMEOUT_S)
    return _seconds("COVIDSEG_CELL_TIMEOUT", CELL_TIMEOUT_S)


def install() -> None:
    """Make every ``nbclient.NotebookClient`` created from now on in this process use
    :func:`timeout_for` (its ``timeout_func`` trait) unless given one explicitly."""
    from nbclient import NotebookClient

    if getattr(NotebookClient.__init__, "_covidseg_cell_timeouts", False):
        return
    original = NotebookClient.__init__

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("timeout_func", timeout_for)
        original(self, *args, **kwargs)

    __init__._covidseg_cell_timeouts = True
    NotebookClient.__init__ = __init__


def setup(app):
    """Sphinx entry point: install the per-cell bounds before myst-nb executes the chapters."""
    install()
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def pytest_runtest_call(item):
    """nbval reads its cell timeout when the cell runs: set it from the cell's tags, and give the
    cell :data:`OUTPUT_FLUSH_TIMEOUT_S` to flush its outputs after the kernel's reply."""
    cell = getattr(item, "cell", None)
    if cell is not None and hasattr(item.config.option, "nbval_cell_timeout"):
        item.config.option.nbval_cell_timeout = timeout_for(cell)
        if hasattr(item, "output_timeout"):
            item.output_timeout = OUTPUT_FLUSH_TIMEOUT_S
