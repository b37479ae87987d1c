"""The docstring examples of the public entry points run as written, and the first ones a reader
calls have one."""

from __future__ import annotations

import doctest
import importlib

import pytest

import covidseg

WITH_EXAMPLE = ("build_model", "evaluate_studies", "load_volume", "fit", "predict_file")
"""Entry points whose docstring must show an ``Example::``."""

def doctests(name: str) -> list[doctest.DocTest]:
    """The doctests of entry point ``name`` (and, for a class, of its methods)."""
    module = importlib.import_module(f"covidseg.{covidseg._ENTRY_POINTS[name]}")
    obj = getattr(module, name)
    if not callable(obj):  # a constant: its docstring is its type's
        return []
    return doctest.DocTestFinder(exclude_empty=True).find(obj, name, module=module)


@pytest.mark.parametrize("name", sorted(covidseg._ENTRY_POINTS))
def test_the_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    for test in doctests(name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("name", WITH_EXAMPLE)
def test_first_entry_points_show_an_example(name):
    tests = doctests(name)
    assert "Example::" in (tests[0].docstring if tests else ""), f"{name} has no Example:: section"
    assert any(test.examples for test in tests)
