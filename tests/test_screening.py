"""``covidseg screen``: one row per study, bad studies as rows with their error, resuming, and
``torchrun`` sharding that gives the same CSV as one process."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from covidseg.cli import main
from covidseg.mosmed import REGISTRY_NAME
from covidseg.phantom import write_phantom
from covidseg.screening import COLUMNS, list_studies, read_rows

from conftest import REPO, write_nifti

SIZE = 32
"""Phantom and model size: the screen's mechanics, not its accuracy, are tested here."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(untrained_run) -> Path:
    return untrained_run


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Ten phantom studies (two per category) in MosMedData's layout."""
    root = tmp_path_factory.mktemp("screen") / "phantom"
    write_phantom(root, size=SIZE, annotated_ids=(255, 256), progress=False)
    return root


def with_bad_studies(phantom: Path, folder: Path) -> Path:
    """The phantom plus four bad studies in its registry: missing, unreadable, no lungs, empty."""
    data = Path(shutil.copytree(phantom, folder))
    affine = np.diag([-2.0, 2.0, 8.0, 1.0])
    x, y, z = np.ogrid[:40, :40, :12]
    head = np.full((40, 40, 12), -1000, dtype=np.int16)
    head[(x - 20) ** 2 + (y - 20) ** 2 + ((z - 6) * 3) ** 2 < 17**2] = 40
    write_nifti(data / "studies" / "CT-0" / "study_0002.nii.gz", head, affine)
    write_nifti(data / "studies" / "CT-0" / "study_0003.nii.gz", np.full((40, 40, 12), -1024, dtype=np.int16), affine)
    (data / "studies" / "CT-0" / "study_0004.nii.gz").write_bytes(b"not a nifti file")
    with open(data / REGISTRY_NAME, "a", encoding="utf-8", newline="") as handle:
        for sid in (1, 2, 3, 4):
            handle.write(f"{sid},CT-0,/studies/CT-0/study_{sid:04d}.nii.gz,\r\n")
    return data


def rows_of(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_bad_studies_get_a_row_and_the_rest_are_screened(phantom, run_dir, tmp_path, capsys):
    data = with_bad_studies(phantom, tmp_path / "data")
    out = tmp_path / "out" / "screen.csv"
    assert main(["screen", str(data), "--run", str(run_dir), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    rows = {r["study"]: r for r in rows_of(out)}
    assert list(rows) == sorted(rows) and len(rows) == 14
    assert tuple(rows_of(out)[0]) == COLUMNS
    assert "named by dataset_registry.csv line" in rows["study_0001"]["error"]
    assert "no lungs found" in rows["study_0002"]["error"]
    assert "-1024..-1024" in rows["study_0003"]["error"]  # an empty volume
    assert "not a readable NIfTI file" in rows["study_0004"]["error"]
    for sid in ("study_0001", "study_0002", "study_0003", "study_0004"):
        assert rows[sid]["predicted_category"] == "" and rows[sid]["registry_category"] == "CT-0"
        assert sum(f"{sid}" in line for line in captured.err.splitlines()) == 1, captured.err
    good = [r for r in rows.values() if not r["error"]]
    assert len(good) == 10
    for r in good:
        assert r["predicted_category"] in ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
        total = float(r["lung_ml_total"])
        assert total == pytest.approx(float(r["lung_ml_right"]) + float(r["lung_ml_left"]), abs=0.002)
        assert total > 1000
    assert "14 studies screened, 0 already done, 4 with an error" in captured.out
    assert "registry (rows) against predicted (columns)" in captured.out
    assert "quadratic weighted kappa" in captured.out and "over 10 studies" in captured.out
    assert not list(out.parent.glob("*.part*")), "part files are merged and removed"


def test_a_rerun_screens_only_the_missing_studies(phantom, run_dir, tmp_path, capsys):
    out = tmp_path / "screen.csv"
    args = ["screen", str(phantom), "--run", str(run_dir), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    first = rows_of(out)
    # as a kill leaves it: two rows missing from the CSV, one row in a part file, one cut short
    kept, part_row = first[:7], first[7]
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(",".join(COLUMNS) + "\n")
        csv.DictWriter(handle, COLUMNS, lineterminator="\n").writerows(kept)
    with open(out.with_name(out.name + ".part1.csv"), "w", encoding="utf-8") as handle:
        handle.write(",".join(COLUMNS) + "\n")
        csv.DictWriter(handle, COLUMNS, lineterminator="\n").writerow(part_row)
        handle.write(first[8]["study"] + ",/cut/short")
    capsys.readouterr()
    assert main(args) == 0
    assert "2 studies screened, 8 already done" in capsys.readouterr().out
    again = rows_of(out)
    assert without_seconds(again) == without_seconds(first)
    assert [r["seconds"] for r in again[:8]] == [r["seconds"] for r in first[:8]], "done rows are kept, not recomputed"


def test_a_folder_of_nifti_files(phantom, run_dir, tmp_path, capsys):
    folder = tmp_path / "scans"
    for path in sorted(phantom.glob("studies/CT-[34]/*.nii.gz")):
        (folder / "ward").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / "ward" / path.name)
    shutil.copy(next(phantom.glob("masks/*.nii.gz")), folder / "ward" / "study_0255_mask.nii.gz")
    entries = list_studies(folder)
    assert [e.study for e in entries] == ["ward/study_1071.nii.gz", "ward/study_1098.nii.gz", "ward/study_1109.nii.gz", "ward/study_1110.nii.gz"]
    assert all(e.category == "" for e in entries)
    out = tmp_path / "scans.csv"
    assert main(["screen", str(folder), "--run", str(run_dir), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "no confusion matrix" in capsys.readouterr().out
    assert len(read_rows(out)) == 4


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "no studies found"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a folder"),
    ],
)
def test_bad_data_folder_is_one_error_line(make, message, run_dir, tmp_path, capsys):
    data = make(tmp_path)
    assert main(["screen", str(data), "--run", str(run_dir), "--out", str(tmp_path / "o.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("covidseg: error: ") and message in err[0]


def test_another_csv_is_not_overwritten(phantom, run_dir, tmp_path, capsys):
    out = tmp_path / "mine.csv"
    out.write_text("name,value\nx,1\n")
    assert main(["screen", str(phantom), "--run", str(run_dir), "--out", str(out), "--quiet"]) == 2
    assert "not a screening CSV" in capsys.readouterr().err
    assert out.read_text() == "name,value\nx,1\n"


def torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "covidseg", *args]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_csv_and_resume_after_a_kill(phantom, run_dir, tmp_path):
    single = tmp_path / "single.csv"
    args = ["screen", str(phantom), "--model-run", str(run_dir), "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(single)]) == 0
    reference = without_seconds(rows_of(single))

    out = tmp_path / "ranks.csv"
    process = torchrun([*args, "--out", str(out)])
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("torchrun did not finish in 300 s")
    assert process.returncode == 0, output
    assert without_seconds(rows_of(out)) == reference
    assert "quadratic weighted kappa" in output

    # stop a second run once some rows are written, then rerun: only the missing studies are done
    killed = tmp_path / "killed.csv"
    process = torchrun([*args, "--out", str(killed)])
    deadline = time.monotonic() + 240
    parts = lambda: [r for p in tmp_path.glob("killed.csv.part*.csv") for r in read_rows(p).values()]  # noqa: E731
    while time.monotonic() < deadline and process.poll() is None and len(parts()) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers, as on Ctrl-C
    process.wait(timeout=60)
    before = {r["study"]: r["seconds"] for r in parts()} | {s: r["seconds"] for s, r in read_rows(killed).items()}
    process = torchrun([*args, "--out", str(killed)])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    after = rows_of(killed)
    assert without_seconds(after) == reference
    assert {r["study"]: r["seconds"] for r in after if r["study"] in before} == before
    assert f"{len(reference) - len(before)} studies screened, {len(before)} already done" in output or not before
