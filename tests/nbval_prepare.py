"""Turn the MyST chapters into notebooks for nbval, with the recorded outputs of checked cells.

nbval compares a cell's new output with the output stored in the notebook, but the chapters are
text files (jupytext MyST) that store no outputs. This script converts each chapter to ``.ipynb``
and fills in, for every cell tagged ``nbval-check-output`` (nbval's own cell tag, which the published
pages do not show), the output recorded in
``book/expected_outputs/<chapter>.json`` (keyed by the cell's source), so that ``pytest --nbval-lax``
really compares them. A checked cell without a recorded output is an error.

    python tests/nbval_prepare.py OUT_DIR book/*.md            # convert, with expected outputs
    python tests/nbval_prepare.py --record OUT_DIR book/*.md   # execute (quick mode) and record them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import jupytext
import nbformat

TAG = "nbval-check-output"
"""nbval's cell tag for a cell whose output is compared under ``--nbval-lax``."""
EXPECTED_DIR = Path(__file__).resolve().parents[1] / "book" / "expected_outputs"


def cell_key(source: str) -> str:
    return hashlib.sha1(source.strip().encode()).hexdigest()[:16]


def checked_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code" and TAG in c.metadata.get("tags", [])]


def _portable(outputs: list) -> list:
    """Keep stream and text outputs only (figures are not compared)."""
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream":
            kept.append({"output_type": "stream", "name": out["name"], "text": out["text"]})
        elif out.get("output_type") in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
            kept.append({"output_type": out["output_type"], "data": {"text/plain": out["data"]["text/plain"]}, "metadata": {},
                         **({"execution_count": 1} if out["output_type"] == "execute_result" else {})})
    return kept


def convert(chapter: Path, out_dir: Path) -> Path:
    notebook = jupytext.read(chapter)
    expected_file = EXPECTED_DIR / f"{chapter.stem}.json"
    expected = json.loads(expected_file.read_text()) if expected_file.is_file() else {}
    missing = []
    for count, cell in enumerate(checked_cells(notebook), start=1):
        key = cell_key(cell.source)
        if key not in expected:
            missing.append(cell.source.strip().splitlines()[0][:60])
            continue
        cell.outputs = [nbformat.from_dict(o) for o in expected[key]]
        cell.execution_count = count
    if missing:
        sys.exit(f"{chapter}: no recorded output for checked cell(s) starting {missing}; run: make record-outputs")
    target = out_dir / f"{chapter.stem}.ipynb"
    nbformat.write(notebook, target)
    return target


def record(chapter: Path, out_dir: Path) -> None:
    from nbclient import NotebookClient

    notebook = jupytext.read(chapter)
    if not checked_cells(notebook):
        return
    os.environ.setdefault("COVIDSEG_QUICK", "1")
    last = max(i for i, c in enumerate(notebook.cells) if c in checked_cells(notebook))
    notebook.cells = notebook.cells[: last + 1]  # what follows the last checked cell cannot change its output
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
    from cell_timeouts import timeout_for  # the bounds make book and make test use

    NotebookClient(notebook, timeout_func=timeout_for, kernel_name="python3",
                   resources={"metadata": {"path": str(out_dir)}}).execute()
    outputs = {cell_key(c.source): _portable(c.outputs) for c in checked_cells(notebook)}
    EXPECTED_DIR.mkdir(exist_ok=True)
    (EXPECTED_DIR / f"{chapter.stem}.json").write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(outputs)} checked cell(s) of {chapter.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="execute the chapters and record the checked cells' outputs")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("chapters", type=Path, nargs="+")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for chapter in args.chapters:
        record(chapter, args.out_dir) if args.record else convert(chapter, args.out_dir)


if __name__ == "__main__":
    main()
