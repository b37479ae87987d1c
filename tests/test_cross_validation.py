"""``covidseg cv``: MiniSeg's five folds trained, resumed after a kill, scored out of fold beside
MiniSeg's per-study scores; the shipped MiniSeg table against its published reference numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import covidseg.cross_validation as cv
import covidseg.training as training
from covidseg.checkpoint import load_checkpoint, save_checkpoint
from covidseg.cli import EXIT_ERROR, EXIT_INTERRUPTED, main
from covidseg.config import get_preset
from covidseg.dataset import SliceDataset
from covidseg.errors import DataError
from covidseg.metrics import dice
from covidseg.mosmed import ANNOTATED_IDS, annotated_studies
from covidseg.phantom import write_phantom
from covidseg.sources import PHANTOM, REAL
from covidseg.splits import MINISEG_FOLDS, mask_facts
from covidseg.training import fit

from conftest import MINISEG_PREDICTIONS, REAL_MASKS, REPO, comparable, write_lesion_everywhere_run
from test_cli import one_error_line
from test_interrupt import read_history, wait_for_epochs
from test_miniseg_conformance import ALL_SLICES_MEAN, EMPTY_PREDICTIONS, FOLD_SLICE_MEANS, LESION_SLICES, PER_STUDY, PLACES, POOLED

SIZE = 32
"""In-plane size of the phantom here: the smallest the phantom writer allows."""

SMALLEST = ("--model", "unet", "--preset", "quick", "--image-size", str(SIZE), "--unet-width", "4",
            "--slices-per-epoch", "16", "--quiet")
"""The smallest settings of ``covidseg cv`` (epochs given per test)."""

CONFIG = get_preset("quick").replace(model="unet", image_size=SIZE, unet_width=4, slices_per_epoch=16)
"""The config those flags make (``max_epochs`` given per test)."""

KILL_EPOCHS = 4
"""Epochs per fold in the kill test: fold 2 is killed after its first, with three left to spare."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """The 50 annotated phantom studies at 32 px (the synthetic data ``covidseg cv`` uses by default)."""
    root = tmp_path_factory.mktemp("phantom") / "mosmed"
    write_phantom(root, size=SIZE, annotated_ids=ANNOTATED_IDS, unannotated=False, progress=False)
    return root


def fingerprint(run: Path) -> dict:
    """Name -> (bytes, mtime) of every file of a run folder: equal before and after means untouched."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- folds and devices


@pytest.mark.parametrize("text, folds", [("1-5", (1, 2, 3, 4, 5)), ("2", (2,)), ("1,3,5", (1, 3, 5)), ("1-2,5", (1, 2, 5)),
                                         (" 4 - 5 ", (4, 5)), ("3,3,2-3", (2, 3))])
def test_parse_folds(text, folds):
    assert cv.parse_folds(text) == folds


@pytest.mark.parametrize("text", ["0-6", "0", "6", "3-1", "1-", "a", "", "1;2", "-1"])
def test_parse_folds_refuses(text):
    with pytest.raises(ValueError, match="folds"):
        cv.parse_folds(text)


@pytest.mark.parametrize("devices", range(1, 8))
def test_each_fold_goes_to_one_device_round_robin(devices):
    shares = cv.assign_folds(cv.FOLDS, devices)
    assert len(shares) == min(devices, 5)
    assert sorted(k for share in shares for k in share) == list(cv.FOLDS)  # every fold exactly once
    assert all(fold in shares[i % devices] for i, fold in enumerate(cv.FOLDS))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # as even as it can be


def test_assignment_examples_and_bad_count():
    assert cv.assign_folds([1, 2, 3, 4, 5], 1) == ((1, 2, 3, 4, 5),)
    assert cv.assign_folds([1, 2, 3, 4, 5], 2) == ((1, 3, 5), (2, 4))
    assert cv.assign_folds([2, 4], 3) == ((2,), (4,))
    with pytest.raises(ValueError, match="at least 1"):
        cv.assign_folds([1], 0)


def test_workers_see_the_gpus_this_process_sees(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [cv._visible_device(i) for i in range(3)] == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert [cv._visible_device(i) for i in range(2)] == ["2", "5"]


# --------------------------------------------------------------------------- bad input


def test_folds_out_of_range_is_one_line(tmp_path, capsys):
    assert main(["cv", "--model", "unet", "--out", str(tmp_path / "cv"), "--folds", "0-6"]) == EXIT_ERROR
    line = one_error_line(capsys)
    assert "cv: argument --folds" in line and "'0-6'" in line and "between 1 and 5" in line
    assert not (tmp_path / "cv").exists()


def test_cv_has_no_split_flag(tmp_path, capsys):
    assert main(["cv", "--model", "unet", "--out", str(tmp_path / "cv"), "--split", "thesis"]) == EXIT_ERROR
    assert "unrecognized arguments: --split" in one_error_line(capsys)


@pytest.mark.parametrize("layout", ["user file", "train run", "stray file in a fold", "report of another command", "out is a file"])
def test_out_holding_something_else_is_refused_and_kept(layout, phantom, tmp_path, capsys):
    out = tmp_path / "cv"
    if layout == "out is a file":
        out.write_text("notes\n")
        kept = out
    else:
        out.mkdir()
        kept = {"user file": out / "notes.txt", "train run": out / "best.pt", "stray file in a fold": out / "fold-2" / "notes.txt",
                "report of another command": out / cv.REPORT_NAME}[layout]
        kept.parent.mkdir(exist_ok=True)
        kept.write_text('{"mean_dice": 0.5}\n' if layout == "report of another command" else "mine\n")
    before = kept.read_bytes()
    assert main(["cv", "--data", str(phantom), "--out", str(out), *SMALLEST, "--max-epochs", "1"]) == EXIT_ERROR
    line = one_error_line(capsys)
    assert str(out) in line and ("choose another --out" in line or "new file name" in line or "must be a folder" in line), line
    assert kept.read_bytes() == before
    assert not any((out / f"fold-{k}" / "last.pt").exists() for k in cv.FOLDS)  # nothing trained


# --------------------------------------------------------------------------- MiniSeg's scores


def test_shipped_miniseg_table_gives_the_published_reference_numbers():
    """The package data alone reproduces every reference score of MiniSeg's predictions."""
    table = cv.miniseg_per_study()
    assert sorted(table) == list(ANNOTATED_IDS)
    assert {k: tuple(i for i in ANNOTATED_IDS if table[i]["fold"] == k) for k in cv.FOLDS} == dict(zip(cv.FOLDS, MINISEG_FOLDS))
    assert {i: row["lesion_slices"] for i, row in table.items()} == {i: f["lesion_slices"] for i, f in mask_facts().items()}
    for row in table.values():
        assert row["dice"] == pytest.approx(dice(row["tp"], row["fp"], row["fn"]), abs=5e-7)
        assert row["tp"] + row["fn"] > 0 and 0 <= row["missed_slices"] <= row["lesion_slices"]
    per_study = np.array([row["dice"] for row in table.values()])
    assert per_study.mean() == pytest.approx(PER_STUDY["mean"], abs=PLACES)
    assert np.median(per_study) == pytest.approx(PER_STUDY["median"], abs=PLACES)
    assert (per_study.min(), per_study.max()) == pytest.approx((PER_STUDY["min"], PER_STUDY["max"]), abs=PLACES)
    everything = cv._miniseg_summary(ANNOTATED_IDS)
    assert everything["lesion_slices"] == LESION_SLICES and everything["lesion_slices_missed"] == EMPTY_PREDICTIONS
    assert everything["pooled_lesion_slices"] == pytest.approx(POOLED, abs=PLACES)
    assert everything["slice_skip"] == pytest.approx(ALL_SLICES_MEAN, abs=PLACES)
    for fold, expected in zip(cv.FOLDS, FOLD_SLICE_MEANS):
        assert cv._miniseg_summary(MINISEG_FOLDS[fold - 1])["slice_skip"] == pytest.approx(expected, abs=PLACES), f"fold {fold}"


@pytest.mark.shared
def test_shipped_miniseg_table_is_what_the_published_predictions_give():
    if not MINISEG_PREDICTIONS.is_dir() or not (REAL_MASKS / "study_0255_mask.nii.gz").is_file():
        pytest.skip("MiniSeg's predictions or the real masks not available (expected ../shared/data beside the repository)")
    shipped = (REPO / "covidseg" / cv.MINISEG_TABLE).read_text(encoding="utf-8")
    assert cv.miniseg_table_text(MINISEG_PREDICTIONS, REAL_MASKS) == shipped  # every count exact, every score to 6 decimals


# --------------------------------------------------------------------------- scoring out of fold


def lesion_everywhere_folds(root: Path, image_size: int = SIZE) -> dict:
    """Fold -> (run, history): a model per fold that calls every voxel lesion (a known answer)."""
    runs = {}
    for fold in cv.FOLDS:
        run = write_lesion_everywhere_run(root / f"fold-{fold}")
        state = {key: value for key, value in load_checkpoint(run / "best.pt").items() if key != "format"}
        state["config"] = state["config"].replace(split=cv.fold_split(fold), image_size=image_size).to_dict()
        save_checkpoint(state, run / "best.pt")
        runs[fold] = (run, [{"epoch": 0, "train_loss": 1.0, "val_dice": 0.25 + fold / 100}])
    return runs


@pytest.fixture(scope="module")
def everywhere_runs(tmp_path_factory) -> dict:
    return lesion_everywhere_folds(tmp_path_factory.mktemp("everywhere"))


def test_out_of_fold_scores_have_the_known_answer(everywhere_runs, phantom):
    report = cv.score_out_of_fold(everywhere_runs, phantom, "cpu", progress=False)
    masks = {entry.study.study_id: entry.masks.astype(bool) for entry in SliceDataset(annotated_studies(phantom), SIZE, progress=False).studies}
    area = SIZE * SIZE
    lesion = {i: m.sum(axis=(1, 2)) for i, m in masks.items()}  # lesion voxels per slice
    found = {i: np.count_nonzero(v) for i, v in lesion.items()}  # lesion slices, all predicted lesion
    # Every voxel called lesion: Dice = 2 T / (T + predicted voxels).
    for i in ANNOTATED_IDS:
        row, truth = report["per_study"][str(i)], int(lesion[i].sum())
        assert row["fold"] == next(k for k, ids in zip(cv.FOLDS, MINISEG_FOLDS) if i in ids)  # the fold that held it out
        assert row["study_lesion_slices"] == pytest.approx(2 * truth / (truth + found[i] * area))
        assert row["study_whole"] == pytest.approx(2 * truth / (truth + masks[i].shape[0] * area))
        assert row["miniseg"] == cv.miniseg_per_study()[i]["dice"]
    ours = report["ours"]
    per_slice = np.concatenate([2 * v[v > 0] / (v[v > 0] + area) for v in lesion.values()])
    total, slices = sum(int(v.sum()) for v in lesion.values()), sum(m.shape[0] for m in masks.values())
    assert ours["slice_skip"] == pytest.approx(per_slice.mean())
    assert ours["slice_one"] == pytest.approx(per_slice.sum() / slices)  # slices without lesion score 0 here
    assert ours["pooled_lesion_slices"] == pytest.approx(2 * total / (total + sum(found.values()) * area))
    assert ours["pooled_whole"] == pytest.approx(2 * total / (total + slices * area))
    values = np.array([report["per_study"][str(i)]["study_lesion_slices"] for i in ANNOTATED_IDS])
    summary = ours["study_lesion_slices"]
    assert (summary["mean"], summary["median"], summary["max"], summary["n"]) == pytest.approx((values.mean(), np.median(values), values.max(), 50))
    assert summary["low"] < summary["mean"] < summary["high"]
    assert ours["lesion_slices_missed"] == 0 and ours["lesion_slices"] == sum(found.values())
    for fold, row in report["folds"].items():
        assert row["test_studies"] == list(MINISEG_FOLDS[int(fold) - 1]) and row["best_val_dice"] == 0.25 + int(fold) / 100
    # On the phantom: MiniSeg's column is there, marked, and no paired test is computed.
    assert report["data"] == PHANTOM and report["paired_test"] is None and "phantom" in report["paired_test_skipped"]
    text = cv.format_report(report)
    assert "NOT COMPARABLE" in text and "paired test not computed" in text
    assert f"{report['miniseg']['study_lesion_slices']['mean']:.3f}" in text and PHANTOM in text
    assert "ours (phantom)     MiniSeg (real data)" in text, "each column of the out-of-fold table names its data"
    assert f"ours on the {PHANTOM}, MiniSeg's on the real data" in text  # and the fold table's footnote
    assert all(protocol in text for protocol in cv.PROTOCOLS.values())


def test_paired_test_on_real_data_pairs_each_study(everywhere_runs, phantom, monkeypatch):
    monkeypatch.setattr(cv, "data_source", lambda data_dir: REAL)  # as if the folder held the real studies
    report = cv.score_out_of_fold({k: everywhere_runs[k] for k in (1, 3)}, phantom, "cpu", progress=False)
    ids = sorted(MINISEG_FOLDS[0] + MINISEG_FOLDS[2])
    ours = [report["per_study"][str(i)]["study_lesion_slices"] for i in ids]
    theirs = [cv.miniseg_per_study()[i]["dice"] for i in ids]
    expected = stats.wilcoxon(ours, theirs)
    paired = report["paired_test"]
    assert (paired["n"], paired["statistic"], paired["p_value"]) == (20, pytest.approx(expected.statistic), pytest.approx(expected.pvalue))
    assert paired["median_difference"] == pytest.approx(np.median(np.subtract(ours, theirs)))
    assert report["miniseg"]["lesion_slices"] == sum(mask_facts()[i]["lesion_slices"] for i in ids)  # the same 20 studies
    text = cv.format_report(report)
    assert "Wilcoxon signed-rank" in text and "NOT COMPARABLE" not in text and "not computed" not in text
    assert "ours (real data)     MiniSeg (real data)" in text


def test_studies_whose_lesions_vanish_at_the_image_size_leave_both_lesion_slice_columns(phantom, tmp_path):
    runs = lesion_everywhere_folds(tmp_path, image_size=16)  # the 32 px phantom at 16 px: small lesions vanish
    report = cv.score_out_of_fold(runs, phantom, "cpu", progress=False)
    vanished = [e.study.study_id for e in SliceDataset(annotated_studies(phantom), 16, progress=False).studies if not e.masks.any()]
    assert vanished and report["without_lesion"] == vanished
    kept = [i for i in ANNOTATED_IDS if i not in vanished]
    assert [i for i in ANNOTATED_IDS if report["per_study"][str(i)]["study_lesion_slices"] is None] == vanished
    assert report["ours"]["study_lesion_slices"]["n"] == report["miniseg"]["study_lesion_slices"]["n"] == len(kept)
    assert report["miniseg"]["lesion_slices"] == sum(mask_facts()[i]["lesion_slices"] for i in kept)  # the same studies
    assert report["ours"]["study_whole"]["n"] == 50
    assert f"{len(vanished)} studies whose lesions all vanish at 16 px ({', '.join(map(str, vanished))})" in cv.format_report(report)


def test_a_run_of_another_split_is_refused(everywhere_runs, phantom):
    runs = {1: everywhere_runs[1], 2: everywhere_runs[3]}
    with pytest.raises(DataError, match="miniseg-fold-3.*not 'miniseg-fold-2'"):
        cv.score_out_of_fold(runs, phantom, "cpu", progress=False)


# --------------------------------------------------------------------------- the command end to end


@pytest.mark.slow
def test_cv_quick_on_the_phantom_trains_five_folds_and_prints_the_table(phantom, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(phantom), "--out", str(out), *SMALLEST, "--max-epochs", "2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / cv.REPORT_NAME).read_text())
    assert report["format"] == cv.REPORT_FORMAT and sorted(map(int, report["per_study"])) == list(ANNOTATED_IDS)
    for fold in cv.FOLDS:
        run = out / f"fold-{fold}"
        assert json.loads((run / "config.json").read_text())["split"] == f"miniseg-fold-{fold}"
        assert (run / "finished.json").is_file() and len(read_history(run)) == 2
        assert report["folds"][str(fold)]["run"] == str(run)
        assert f"{fold:>4}  {10:>12}  {2:>6}" in printed  # its line in the table
    assert "out of fold: 50 studies" in printed and "MiniSeg (real data)" in printed
    assert f"{report['ours']['slice_one']:.3f}" in printed and f"{report['miniseg']['slice_skip']:.3f}" in printed
    assert "NOT COMPARABLE" in printed and "paired test not computed" in printed

    # A rerun reuses every fold (nothing is trained again) and replaces its own report.
    before = {fold: fingerprint(out / f"fold-{fold}") for fold in cv.FOLDS}
    assert main(["cv", "--data", str(phantom), "--out", str(out), *SMALLEST, "--max-epochs", "2"]) == 0
    assert {fold: fingerprint(out / f"fold-{fold}") for fold in cv.FOLDS} == before
    assert json.loads((out / cv.REPORT_NAME).read_text())["per_study"] == report["per_study"]


def test_ctrl_c_says_what_is_kept_and_how_to_continue(phantom, tmp_path, capsys, monkeypatch):
    real, calls = training.validation_dice, []

    def interrupted_in_fold_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # fold 1 has finished its two epochs; fold 2 is in its first
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "validation_dice", interrupted_in_fold_2)
    args = ["cv", "--data", str(phantom), "--out", str(tmp_path / "cv"), *SMALLEST, "--max-epochs", "2"]
    assert main(args) == EXIT_INTERRUPTED
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (f"covidseg: training interrupted during epoch 1; no epoch was completed, so there is nothing to resume; "
                       f"finished folds are kept, and covidseg {' '.join(args)} continues the rest")
    assert (tmp_path / "cv" / "fold-1" / "finished.json").is_file() and not (tmp_path / "cv" / "fold-2" / "last.pt").exists()


def test_time_budget_is_for_the_whole_call_and_nothing_is_scored_before_every_fold_finished(phantom, tmp_path, capsys, monkeypatch):
    # The budget's clock: 1 minute from the start of the call, 1 microsecond of it left when fold 1
    # starts (so its fit stops after one epoch), spent before fold 2 could start.
    clock = iter([0.0, 60.0 - 1e-6])
    monkeypatch.setattr(cv, "_now", lambda: next(clock, 61.0))
    out = tmp_path / "cv"
    args = ["cv", "--data", str(phantom), "--out", str(out), *SMALLEST, "--folds", "1-2", "--max-epochs", "2", "--time-budget", "1"]
    continue_with = f"; continue with: covidseg {' '.join(args)}"
    budget = "the time budget of 1 min ran out before every fold had finished: "
    rest = " not yet (each keeps its last completed epoch); nothing is scored until every fold has finished"

    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{budget}no fold finished, folds 1, 2{rest}{continue_with}"
    assert len(read_history(out / "fold-1")) == 1 and not (out / "fold-1" / "finished.json").exists()
    assert not (out / "fold-2").exists(), "no fold starts once the call's budget is spent"
    assert not (out / cv.REPORT_NAME).exists()

    clock = iter([0.0, 60.0 - 1e-6])  # the same command again: fold 1 resumes and trains its last epoch
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{budget}fold 1 finished, fold 2{rest}{continue_with}"
    assert len(read_history(out / "fold-1")) == 2 and (out / "fold-1" / "finished.json").is_file()
    assert not (out / "fold-2").exists() and not (out / cv.REPORT_NAME).exists()

    finished = fingerprint(out / "fold-1")
    assert main(args[:-2]) == 0  # without a budget: fold 1 is reused, fold 2 trained, and the folds scored
    assert fingerprint(out / "fold-1") == finished
    assert len(read_history(out / "fold-2")) == 2 and sorted(json.loads((out / cv.REPORT_NAME).read_text())["folds"]) == ["1", "2"]


def test_a_budget_spent_before_the_first_fold_still_trains_one_epoch(phantom, tmp_path, capsys, monkeypatch):
    clock = iter([0.0])  # the call starts at 0, and its 1 minute is spent by the time fold 1 could start
    monkeypatch.setattr(cv, "_now", lambda: next(clock, 61.0))
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(phantom), "--out", str(out), *SMALLEST, "--folds", "1-2", "--max-epochs", "2", "--time-budget", "1"]) == 0
    assert "no fold finished, folds 1, 2 not yet" in capsys.readouterr().out
    assert len(read_history(out / "fold-1")) == 1 and not (out / "fold-2").exists(), "one epoch, as covidseg train trains at least one"


def _start_cv(phantom: Path, out: Path, logs: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "covidseg", "cv", "--data", str(phantom), "--out", str(out), *SMALLEST, *extra]
    with open(logs / "stdout.txt", "w") as stdout, open(logs / "stderr.txt", "w") as stderr:
        return subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr)


@pytest.mark.slow
def test_killed_cv_resumes_the_unfinished_fold_and_reuses_the_finished(phantom, tmp_path, capsys):
    out, flags = tmp_path / "cv", ("--folds", "1-2", "--max-epochs", str(KILL_EPOCHS))
    process = _start_cv(phantom, out, tmp_path, *flags)
    wait_for_epochs(process, out / "fold-2", 1, tmp_path)  # the folds run in order: fold 1 has finished
    os.kill(process.pid, signal.SIGKILL)  # fold 2 in its second epoch or later
    assert process.wait(timeout=60) == -signal.SIGKILL
    saved = load_checkpoint(out / "fold-2" / "last.pt")
    assert (out / "fold-1" / "finished.json").is_file()
    assert not (out / "fold-2" / "finished.json").exists() and saved["epoch"] < KILL_EPOCHS - 1, "fold 2 finished before the kill"
    finished = fingerprint(out / "fold-1")

    assert main(["cv", "--data", str(phantom), "--out", str(out), *SMALLEST, *flags]) == 0
    assert fingerprint(out / "fold-1") == finished, "the finished fold is reused, not trained again"
    resumed = read_history(out / "fold-2")
    assert resumed[: saved["epoch"] + 1] == saved["history"], "completed epochs are kept"
    reference = fit(CONFIG.replace(split="miniseg-fold-2", max_epochs=KILL_EPOCHS), tmp_path / "reference", data_dir=phantom, progress=False)
    assert comparable(resumed) == comparable(reference.history), "the resumed fold continues exactly as an uninterrupted one"
    report = json.loads((out / cv.REPORT_NAME).read_text())
    assert sorted(report["folds"]) == ["1", "2"] and len(report["per_study"]) == 20


@pytest.mark.slow
def test_two_worker_processes_on_the_cpu(phantom, tmp_path):
    config = CONFIG.replace(max_epochs=1, device="cpu")
    runs = cv.train_folds(config, tmp_path / "cv", folds=(4, 5), data_dir=phantom, progress=False, devices=2)
    assert {fold: run for fold, (run, _) in runs.items()} == {4: tmp_path / "cv" / "fold-4", 5: tmp_path / "cv" / "fold-5"}
    assert all(len(history) == 1 for _, history in runs.values())
    before = {fold: fingerprint(run) for fold, (run, _) in runs.items()}
    again = cv.train_folds(config, tmp_path / "cv", folds=(4, 5), data_dir=phantom, progress=False, devices=1)
    assert {fold: fingerprint(run) for fold, (run, _) in again.items()} == before  # what the workers trained, one process reuses


@pytest.mark.slow
def test_worker_processes_share_the_budget_and_each_trains_at_least_one_epoch(phantom, tmp_path):
    # 6 ms of budget from the start of the call: spent before a spawned worker has imported torch.
    config = CONFIG.replace(max_epochs=2, device="cpu", time_budget=1e-4)
    assert cv.train_folds(config, tmp_path / "cv", folds=(3, 4, 5), data_dir=phantom, progress=False, devices=2) == {}
    assert [len(read_history(tmp_path / "cv" / f"fold-{fold}")) for fold in (3, 4)] == [1, 1]  # each worker's first fold
    assert not (tmp_path / "cv" / "fold-5").exists(), "worker 1's second fold does not start"
