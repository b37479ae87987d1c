"""``import covidseg``: no cost, no side effects, and a lazy namespace of the first entry points."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import covidseg

PROBE = r"""
import json, sys, warnings
before = set(sys.modules)
filters = list(warnings.filters)
import covidseg
new = sorted(m for m in set(sys.modules) - before if m.startswith("covidseg") or m.split(".")[0] in
             ("torch", "numpy", "scipy", "matplotlib", "nibabel", "segmentation_models_pytorch", "ipywidgets"))
print(json.dumps({"new": new, "filters_changed": list(warnings.filters) != filters}))
"""


def test_import_loads_no_submodule_and_changes_no_global_state():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(done.stdout)
    assert probe["new"] == ["covidseg"], probe["new"]
    assert not probe["filters_changed"]


@pytest.mark.parametrize("name", sorted(covidseg._ENTRY_POINTS))
def test_entry_point_is_the_module_attribute(name):
    module = importlib.import_module(f"covidseg.{covidseg._ENTRY_POINTS[name]}")
    assert name in module.__all__
    assert getattr(covidseg, name) is getattr(module, name)
    assert name in dir(covidseg)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'build_modle'"):
        covidseg.build_modle  # noqa: B018


CONCEPTS = {
    "HU windowing", "the split", "Dice per study", "ImageNet weights", "NIfTI orientation", "early stopping",
    "phantom lesions", "checkpoint resume", "bootstrap/paired tests", "slice grid", "lung box",
    "download verification", "run card", "Colab setup", "batch-norm folding",
}
"""The concepts a newcomer looks for first: each must be listed in the package docstring."""

PACKAGE = Path(covidseg.__file__).parent


def concept_map() -> dict[str, tuple[str, list[str]]]:
    """The package docstring's table: concept -> (file, names defined there)."""
    table = re.search(r"define\s+it::\n\n((?: {4}.*\n)+)", covidseg.__doc__)
    assert table, "the package docstring has no concept table"
    rows = {}
    for line in table.group(1).splitlines():
        concept, file, *names = re.split(r"\s{2,}", line.strip())
        rows[concept] = (file, [n.strip() for n in names[0].split(",")] if names else [])
    return rows


def top_level_names(path: Path) -> set[str]:
    """Names a module defines at top level (functions, classes, assignments; not imports), read
    without importing it."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_docstring_lists_every_concept_once():
    assert set(concept_map()) == CONCEPTS


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_each_concept_lives_where_the_docstring_says(concept):
    file, names = concept_map()[concept]
    path = PACKAGE / file
    assert path.is_file(), f"{concept}: covidseg/{file} does not exist"
    assert names, f"{concept}: no name listed"
    missing = [name for name in names if name not in top_level_names(path)]
    assert not missing, f"{concept}: covidseg/{file} does not define {missing}"
