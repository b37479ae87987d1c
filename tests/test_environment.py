"""The locked environment: the lock covers what pyproject.toml asks for, and make install installs
exactly the lock; the package builds quietly into a wheel that carries its data."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    """``{normalised name: version}`` of every package pinned in the lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[_normalise(match[1])] = match[2]
    return pins


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in requirements}


def test_lock_pins_every_requirement_with_hashes():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"])
    for extra in ("book", "test"):
        wanted |= _requirement_names(project["optional-dependencies"][extra])
    pins = locked_versions()
    assert wanted <= set(pins), f"not in the lock (run make lock): {sorted(wanted - set(pins))}"
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 1)[1] if LOCK.read_text().startswith("#") else LOCK.read_text())
    unhashed = [e.split("==")[0] for e in entries if "==" in e and "--hash=sha256:" not in e]
    assert not unhashed, f"pins without hashes: {unhashed}"


@pytest.mark.skipif(os.environ.get("COVIDSEG_LOCKED") != "1", reason="only in the environment make install builds from the lock")
def test_installed_versions_equal_the_lock():
    pins = locked_versions()
    installed = {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    differ = {name: (version, installed.get(name)) for name, version in pins.items() if installed.get(name) != version}
    assert not differ, f"installed versions differ from the lock (locked, installed): {differ}"


@pytest.mark.slow
def test_wheel_carries_package_data_and_builds_without_warnings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "covidseg", source / "covidseg", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = "from setuptools import build_meta; print(build_meta.build_wheel(%r))" % str(out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # else a notice that it is
    done = subprocess.run([sys.executable, "-W", "default", "-c", build], cwd=source, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings[:20])
    wheel = next(out.glob("covidseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "covidseg" / "data").iterdir() if p.is_file())
    assert shipped, "covidseg/data holds no files"
    for name in shipped:
        assert f"covidseg/data/{name}" in names, f"{name} missing from the wheel"
