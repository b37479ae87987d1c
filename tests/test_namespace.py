"""``import covidseg``: no cost, no side effects, and a lazy namespace of the first entry points."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

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
