"""Execute chapters many times through the book's executor, under CPU load, and catch stalls.

``make book`` executes each chapter with myst-nb's ``force`` mode, which calls
``jupyter_cache.executors.utils.single_nb_execution`` and so ``nbclient``. This script does the
same, each round in one child process that executes the chapters one after another (as
``jupyter-book build`` does), while another process keeps the CPU busy. A chapter that has not
finished ``--stall-after`` seconds after the previous one is a stall: the script then records
``py-spy dump`` of the executor and of its kernel (where ``py-spy`` is on ``PATH``), kills both
and goes on with the next round.

    python benchmarks/notebook_stalls.py --chapters book/03_preprocessing.md --repeat 20
    python benchmarks/notebook_stalls.py --all --repeat 3      # with trained runs reused

The chapters run as ``make book`` runs them: in the ``book`` folder, with ``COVIDSEG_RUNS``
(default ``book/runs``, the Makefile's ``RUNS_DIR``) so that finished runs are reused. Each
execution's cells are bounded as the book bounds them (:mod:`book._ext.cell_timeouts`), so a
stall that the bound catches shows up as a failed execution naming its cell, not as a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import REPO, add_results_argument, machine_info, write_results

CHILD = r"""
import json, sys, time
from pathlib import Path
import jupytext
from jupyter_cache.executors.utils import single_nb_execution

ext, timeout, chapters = sys.argv[1], int(sys.argv[2]), [Path(a) for a in sys.argv[3:]]
sys.path.insert(0, ext)
from cell_timeouts import install
install()
def started(cell, cell_index):  # so that a stall names its cell
    print(json.dumps({"cell": cell_index, "source": cell.source.splitlines()[:1]}), flush=True)

for chapter in chapters:  # one after the other in one process, as myst-nb executes a book
    nb = jupytext.read(chapter)
    start = time.perf_counter()
    result = single_nb_execution(nb, cwd=str(chapter.parent), allow_errors=False, timeout=timeout,
                                 meta_override=True, on_cell_start=started)
    error = None
    if result.err is not None:
        lines = str(result.err).strip().splitlines() or [""]
        error = f"{type(result.err).__name__}: {lines[0]} {lines[-1]}"
    print(json.dumps({"chapter": chapter.name, "seconds": time.perf_counter() - start, "error": error}), flush=True)
"""

LOAD = "import numpy as np\na = np.random.rand(1500, 1500)\nwhile True:\n    a @ a\n"


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _dump(pid: int) -> str:
    spy = shutil.which("py-spy")
    if spy is None:
        return "py-spy not on PATH (pip install py-spy): no dump"
    done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    return _portable(done.stdout + done.stderr)


def _portable(text: str) -> str:
    """``text`` with this machine's folders replaced by what they are (results are shared)."""
    for folder, name in ((sys.prefix, "<venv>"), (sys.base_prefix, "<python>"), (str(REPO), "<repository>")):
        text = text.replace(folder, name)
    return text


def execute_in_one_process(chapters: list[Path], stall_after: float, cell_timeout: int, env: dict) -> list[dict]:
    """Execute chapters one after another in one child process (as ``jupyter-book build`` does);
    a chapter that has not finished ``stall_after`` seconds after the previous one is a stall:
    dump the executor and its kernels, kill them, and report the chapters not reached as such."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(REPO / "book" / "_ext"), str(cell_timeout), *map(str, chapters)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    results = []
    for chapter in chapters:
        cell = None
        deadline = time.monotonic() + stall_after
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                kernels = _descendants(child.pid)
                dumps = {"executor": _dump(child.pid), **{f"kernel-{k}": _dump(k) for k in kernels}}
                os.killpg(child.pid, 9)
                child.wait()
                results.append({"chapter": chapter.name, "stalled": True, "seconds": stall_after, "cell": cell, "dumps": dumps})
                return results
            if line.startswith('{"cell"'):
                cell = json.loads(line)
            elif line.startswith("{"):
                break
        results.append({"stalled": False, **json.loads(line)})
    child.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapters", nargs="*", type=Path, default=[])
    parser.add_argument("--all", action="store_true", help="every chapter of _toc.yml, in order")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--stall-after", type=float, default=900.0, help="seconds before an execution counts as stalled")
    parser.add_argument("--timeout", type=int, default=1800, help="the executor's default cell bound (the book's)")
    parser.add_argument("--no-load", action="store_true", help="do not run the CPU-heavy process beside it")
    add_results_argument(parser, "notebook_stalls")
    args = parser.parse_args()

    chapters = [c.resolve() for c in args.chapters]
    if args.all:
        toc = (REPO / "_toc.yml").read_text().splitlines()
        listed = [REPO / f"{line.split(':', 1)[1].strip()}.md" for line in toc if line.strip().startswith(("root:", "- file:"))]
        chapters += [c for c in listed if "kernelspec:" in c.read_text()]  # notebooks, not text pages
    if not chapters:
        parser.error("name --chapters or --all")
    env = {**os.environ, "MPLBACKEND": "Agg", "COVIDSEG_RUNS": os.environ.get("COVIDSEG_RUNS", str(REPO / "book" / "runs")),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    machine = machine_info()
    load = None if args.no_load else subprocess.Popen([sys.executable, "-c", LOAD], env={**env, "OMP_NUM_THREADS": "1"})
    runs = []
    try:
        for round_ in range(args.repeat):
            for result in execute_in_one_process(chapters, args.stall_after, args.timeout, env):
                result["round"] = round_ + 1
                runs.append(result)
                state = f"STALL in cell {result['cell']}" if result["stalled"] else (result.get("error") or f"{result['seconds']:.1f} s")
                print(f"round {round_ + 1:2d} {result['chapter']}: {state}", flush=True)
                for process, dump in result.get("dumps", {}).items():
                    print(f"--- py-spy dump of the {process}\n{dump}", flush=True)
    finally:
        if load is not None:
            load.kill()
    stalls = [r for r in runs if r["stalled"]]
    errors = [r for r in runs if not r["stalled"] and r.get("error")]
    print(f"{len(runs)} executions, {len(stalls)} stalls, {len(errors)} errors")
    write_results(args.results_name, {
        "settings": {"repeat": args.repeat, "stall_after_s": args.stall_after, "cell_timeout_s": args.timeout,
                     "cpu_load_process": not args.no_load, "chapters": [c.name for c in chapters]},
        "executions": len(runs),
        "stalls": len(stalls),
        "errors": len(errors),
        "runs": runs,
    }, machine)


if __name__ == "__main__":
    main()
