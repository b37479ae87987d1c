"""Wall time of ``make book`` and ``make test``, and of each chapter within them.

Run after installation (``make install``; this script runs it first, untimed, unless
``--no-install``). Then, for each target:

- ``make book`` (after ``make clean``, so that every chapter executes): total wall time, and each
  chapter's execution time as myst-nb records it in Sphinx's environment
  (``_build/.doctrees/environment.pickle``: ``nb_metadata[doc]["exec_data"]["runtime"]``).
- ``make test`` (unit tests, then every chapter through nbval, quick mode): total wall time, and
  per test file the sum of pytest's per-item durations (``--durations=0`` through
  ``PYTEST_ADDOPTS``): one entry per chapter notebook (its cells) and per unit-test module.

``make test-unit`` and ``make test-notebooks`` may be timed alone (``--targets``); ``--chapters``
restricts the notebook tests to some chapters (passed as ``CHAPTERS=`` to make).

Usage::

    python benchmarks/book.py                                # make book, make test
    python benchmarks/book.py --targets test-notebooks --chapters book/02_dataset.md
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import _common

TARGETS = ("book", "test", "test-unit", "test-notebooks")
TARGET_SECONDS = {"book": 600.0, "test": 1200.0}
STAMP = ".venv/.covidseg-installed"  # the Makefile's install stamp (VENV=.venv)
DURATION_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s+(setup|call|teardown)\s+(\S+?)::(.*)$")
SESSION_LINE = re.compile(r"=+ (.*?) in (\d+(?:\.\d+)?)s")


def per_file_durations(log: str) -> dict[str, float]:
    """Sum of pytest's ``--durations=0`` lines per test file (notebook or module), in seconds."""
    totals: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        match = DURATION_LINE.match(line)
        if match:
            totals[match.group(3)] += float(match.group(1))
    return {name: round(seconds, 2) for name, seconds in sorted(totals.items())}


def pytest_sessions(log: str) -> list[dict]:
    """The closing line of each pytest session in ``log`` (counts and its own wall time)."""
    return [{"summary": m.group(1).strip("= "), "seconds": float(m.group(2))} for m in SESSION_LINE.finditer(log)]


def chapter_runtimes(build_dir: Path) -> dict[str, float | None]:
    """Execution time of each executed document of a Jupyter Book build, from myst-nb's metadata."""
    pickled = build_dir / ".doctrees" / "environment.pickle"
    if not pickled.is_file():
        return {}
    with open(pickled, "rb") as handle:
        env = pickle.load(handle)
    out = {}
    for doc, data in sorted(getattr(env, "nb_metadata", {}).items()):
        exec_data = data.get("exec_data") or {}
        runtime = exec_data.get("runtime")
        out[doc] = None if runtime is None else round(float(runtime), 2)
    return out


def make(target: str, args, extra_env: dict | None = None) -> tuple[float, int, str]:
    """Run ``make TARGET`` at the repository root; returns (wall seconds, exit status, output)."""
    command = ["make", target]
    if args.no_install:
        command[1:1] = ["-o", STAMP, "-o", "install"]
    if args.chapters and target in ("test", "test-notebooks"):
        command.append("CHAPTERS=" + " ".join(str(Path(c).resolve()) for c in args.chapters))
    command += args.make_var
    env = {**os.environ, **(extra_env or {})}
    print(f"$ {' '.join(command)}", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    done = subprocess.run(command, cwd=_common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return time.perf_counter() - tic, done.returncode, done.stdout


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["book", "test"], choices=TARGETS)
    parser.add_argument("--chapters", nargs="*", default=None, help="chapter .md files for the notebook tests (default: all)")
    parser.add_argument("--no-install", action="store_true", help="do not run make install first (the venv must be complete)")
    parser.add_argument("--no-clean", action="store_true", help="keep _build (chapters already built are not re-executed)")
    parser.add_argument("--make-var", action="append", default=[], metavar="NAME=VALUE", help="passed to make (e.g. NOTEBOOK_DIR=...)")
    parser.add_argument("--log-dir", type=Path, default=None, help="where the make logs go (default: a work folder)")
    _common.add_results_argument(parser, "book")
    args = parser.parse_args(argv)
    machine = _common.machine_info()
    logs = args.log_dir or _common.work_dir("book-logs")
    logs.mkdir(parents=True, exist_ok=True)

    results: dict = {"settings": {"targets": args.targets, "chapters": [Path(c).name for c in args.chapters] if args.chapters else "all", "clean_build": not args.no_clean}}
    if not args.no_install:
        seconds, status, output = make("install", args)
        (logs / "install.log").write_text(output)
        results["install"] = {"seconds": round(seconds, 1), "exit_status": status}
        if status != 0:
            raise SystemExit(f"make install failed; see {logs / 'install.log'}")

    timed = {}
    for target in args.targets:
        env = {}
        if target == "book" and not args.no_clean:
            make("clean", args)
        if target != "book":
            env["PYTEST_ADDOPTS"] = (os.environ.get("PYTEST_ADDOPTS", "") + " --durations=0 --durations-min=0").strip()
        seconds, status, output = make(target, args, env)
        (logs / f"{target}.log").write_text(output)
        entry = {"seconds": round(seconds, 1), "minutes": round(seconds / 60, 2), "exit_status": status, "log": f"{target}.log"}
        if target == "book":
            entry["chapter_execution_s"] = chapter_runtimes(_common.REPO / "_build")
        else:
            durations = per_file_durations(output)
            entry["notebook_s"] = {k: v for k, v in durations.items() if k.endswith(".ipynb")}
            entry["unit_test_module_s"] = {k: v for k, v in durations.items() if not k.endswith(".ipynb")}
            entry["pytest_sessions"] = pytest_sessions(output)
        if target in TARGET_SECONDS:
            entry["target_s"] = TARGET_SECONDS[target]
            entry["met"] = status == 0 and seconds <= TARGET_SECONDS[target]
        timed[target] = entry
        print(f"make {target}: {seconds:.0f} s (exit {status})", file=sys.stderr)
    results["make"] = timed
    _common.write_results(args.results_name, results, machine)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
