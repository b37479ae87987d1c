"""Messy input files, broken run folders and failing disks: each ends in one clear line.

Every case goes through the command line, ``covidseg.cli.main``: a non-zero exit status, exactly
one line on stderr that starts ``covidseg: error:`` and names the file and the problem, no
traceback, and every output and checkpoint that existed before left byte for byte as it was. The
library behind it raises a dedicated :mod:`covidseg.errors` exception. A couple of cases run in a
real ``python -m covidseg`` process, to show that no traceback reaches the terminal there either.
"""

from __future__ import annotations

import ast
import errno
import gzip
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from covidseg.cli import EXIT_ERROR, main
from covidseg.evaluation import evaluate_run
from covidseg.errors import CheckpointError, DataError
from covidseg.models import build_model
from covidseg.mosmed import ANNOTATED_IDS, REGISTRY_NAME, mask_path, study_path
from covidseg.nifti import load_volume
from covidseg.preprocessing import check_binary_mask
from covidseg.prediction import PREDICTION_DESCRIPTION, predict_file
from covidseg.splits import get_split
from covidseg.training import fit

from conftest import LAS_AFFINE, REPO, TINY_SHAPE, TINY_TRAIN_FLAGS, synthetic_ct, tiny_config, write_nifti

SHAPE = TINY_SHAPE
TRAIN_ID = get_split("thesis").train[0]  # in the thesis split's training part
TEST_ID = get_split("thesis").test[0]  # in its test part
TRAIN_REGISTRY_LINE = 2 + ANNOTATED_IDS.index(TRAIN_ID)  # the tiny dataset's registry lists all 50, in order
CONFIG = tiny_config(max_epochs=1)
TRAIN_FLAGS = TINY_TRAIN_FLAGS


pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures: a tiny dataset, a run folder, and helpers ---------------------------------------


@pytest.fixture
def data(tiny50, tmp_path) -> Path:
    """A private copy of the tiny dataset, to damage."""
    return Path(shutil.copytree(tiny50, tmp_path / "mosmed"))


def _run_state(config=CONFIG, epoch=0) -> dict:
    torch.manual_seed(0)
    model = build_model(config.model, encoder_weights=None, width=config.unet_width)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = [{"epoch": 0, "train_loss": 0.9, "val_dice": 0.1, "epoch_seconds": 0.1, "lr": config.lr}]
    return {
        "model_name": config.model,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "epoch": epoch,
        "early_stopping": {"best_score": 0.1, "best_epoch": 0, "bad_epochs": 0},
        "history": history,
        "optimizer": optimizer.state_dict(),
    }


@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    """A run folder as ``covidseg train`` leaves it after one epoch (an untrained model)."""
    import json

    run = tmp_path_factory.mktemp("runs") / "run"
    state = _run_state()
    save_checkpoint(state, run / "last.pt")
    save_checkpoint({k: v for k, v in state.items() if k != "optimizer"}, run / "best.pt")
    (run / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    (run / "history.json").write_text(json.dumps(state["history"]))
    return run


@pytest.fixture
def run(run_template, tmp_path) -> Path:
    return Path(shutil.copytree(run_template, tmp_path / "run"))


def snapshot(*folders: Path) -> dict[Path, bytes]:
    """Every file under ``folders``, with its bytes."""
    return {p: p.read_bytes() for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, args) -> str:
    """Run the CLI; check it failed with exactly one ``covidseg: error:`` line and return it."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == EXIT_ERROR, f"exit {code}; stderr: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("covidseg: error: ") and "Traceback" not in err
    return lines[0]


def assert_names(line: str, path: Path, *problem: str) -> None:
    assert str(path) in line, f"{path} not named in {line!r}"
    for words in problem:
        assert words in line, f"{words!r} not in {line!r}"


# --- ways to damage a NIfTI file ------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_nifti(path: Path) -> None:
    path.write_bytes(gzip.compress(b"study exported as text, not NIfTI\n" * 20))


def two_d(path: Path) -> None:
    write_nifti(path, synthetic_ct(SHAPE)[0][:, :, 0])


def four_d(path: Path) -> None:
    write_nifti(path, np.stack([synthetic_ct(SHAPE)[0]] * 2, axis=-1))


def nan_voxel(path: Path) -> None:
    hu = synthetic_ct(SHAPE)[0].astype(np.float32)
    hu[3, 3, 1] = np.nan
    write_nifti(path, hu)


def inf_voxel(path: Path) -> None:
    hu = synthetic_ct(SHAPE)[0].astype(np.float32)
    hu[3, 3, 1] = np.inf
    write_nifti(path, hu)


def scaled_0_255(path: Path) -> None:
    write_nifti(path, np.random.default_rng(0).integers(0, 256, size=SHAPE).astype(np.uint8))


def scaled_0_1(path: Path) -> None:
    write_nifti(path, np.random.default_rng(0).random(SHAPE).astype(np.float32))


def hu_plus_1024(path: Path) -> None:
    """Stored unsigned, as HU + 1024, without the rescale intercept."""
    write_nifti(path, (synthetic_ct(SHAPE)[0].astype(np.int32) + 1024).astype(np.uint16))


def hu_minus_1024(path: Path) -> None:
    """Shifted down by 1024: air at -2048, soft tissue near -1000."""
    write_nifti(path, synthetic_ct(SHAPE)[0] - 1024)


def hu_minus_1024_padded(path: Path) -> None:
    """Shifted down by 1024, with -3024 padding outside the reconstruction circle on top."""
    hu = synthetic_ct(SHAPE)[0] - 1024
    hu[~reconstruction_circle(SHAPE)] = -3024
    write_nifti(path, hu)


def hu_doubled(path: Path) -> None:
    write_nifti(path, synthetic_ct(SHAPE)[0] * 2)


def reconstruction_circle(shape) -> np.ndarray:
    """Voxels inside the largest circle of each axial slice, the scanner's field of view."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    radius = min(shape[:2]) / 2
    inside = (x - (shape[0] - 1) / 2) ** 2 + (y - (shape[1] - 1) / 2) ** 2 <= radius**2
    return np.broadcast_to(inside[:, :, None], shape)


STUDY_DAMAGE = {
    "hu-plus-1024": (hu_plus_1024, "not Hounsfield units: no air"),
    "hu-minus-1024": (hu_minus_1024, "not Hounsfield units: its air peaks at -20"),
    "hu-minus-1024-padded": (hu_minus_1024_padded, "not Hounsfield units: its air peaks at -20"),
    "hu-doubled": (hu_doubled, "not Hounsfield units: its air peaks at -"),
    "truncated": (truncate, "truncated"),
    "not-nifti": (not_nifti, "not a readable NIfTI file"),
    "2d": (two_d, "expected a 3D volume, found 2D"),
    "4d": (four_d, "expected a 3D volume, found 4D"),
    "nan": (nan_voxel, "1 voxels are NaN or infinite"),
    "inf": (inf_voxel, "1 voxels are NaN or infinite"),
    "hu-0-255": (scaled_0_255, "not Hounsfield units"),
    "hu-0-1": (scaled_0_1, "not Hounsfield units"),
}


def mask_other_shape(path: Path) -> None:
    write_nifti(path, np.zeros(SHAPE[:2] + (SHAPE[2] + 1,), dtype=np.int16))


def mask_moved(path: Path) -> None:
    moved = LAS_AFFINE.copy()
    moved[2, 3] += 4.0  # half a slice
    write_nifti(path, np.zeros(SHAPE, dtype=np.int16), moved)


def mask_labels(path: Path) -> None:
    mask = np.zeros(SHAPE, dtype=np.int16)
    mask[2:5, 2:5, 0] = 2
    write_nifti(path, mask)


def mask_255(path: Path) -> None:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:5, 2:5, 0] = 255
    write_nifti(path, mask)


def mask_just_above_1(path: Path) -> None:
    mask = np.zeros(SHAPE, dtype=np.float32)
    mask[2:5, 2:5, 0] = 1.000002  # beyond float rounding: not a mask value of 1
    write_nifti(path, mask)


def mask_probabilities(path: Path) -> None:
    mask = np.zeros(SHAPE, dtype=np.float32)
    mask[2:5, 2:5, 0] = 0.7
    write_nifti(path, mask)


MASK_DAMAGE = {
    "just-above-1": (mask_just_above_1, "mask values must be 0 or 1, found 1.000002"),
    "probabilities": (mask_probabilities, "mask values must be 0 or 1, found 0.7"),
    "truncated": (truncate, "truncated"),
    "other-shape": (mask_other_shape, f"mask shape {SHAPE[:2] + (SHAPE[2] + 1,)} differs from its study's {SHAPE}"),
    "moved": (mask_moved, "mask affine differs from its study's by up to 4 mm"),
    "labels": (mask_labels, "mask values must be 0 or 1, found 2"),
    "255": (mask_255, "mask values must be 0 or 1, found 255"),
}


# --- train: damaged studies and masks, layouts, run folders ---------------------------------


@pytest.mark.parametrize("case", sorted(STUDY_DAMAGE))
def test_train_refuses_a_damaged_study(case, data, tmp_path, capsys):
    damage, problem = STUDY_DAMAGE[case]
    bad = study_path(data, TRAIN_ID, "CT-1")
    damage(bad)
    before = snapshot(data)
    out = tmp_path / "run"
    with pytest.raises(DataError) as raised:
        fit(CONFIG, out, data_dir=data, progress=False)
    assert raised.value.path == str(bad)
    line = cli_error(capsys, ["train", "--data", data, "--out", out, *TRAIN_FLAGS])
    assert_names(line, bad, problem)
    assert not out.exists(), "a run that could not start must leave no run folder"
    assert snapshot(data) == before


@pytest.mark.parametrize("case", sorted(MASK_DAMAGE))
def test_train_refuses_a_damaged_mask(case, data, tmp_path, capsys):
    damage, problem = MASK_DAMAGE[case]
    bad = mask_path(data, TRAIN_ID)
    damage(bad)
    before = snapshot(data)
    with pytest.raises(DataError):
        fit(CONFIG, tmp_path / "run", data_dir=data, progress=False)
    line = cli_error(capsys, ["train", "--data", data, "--out", tmp_path / "run", *TRAIN_FLAGS])
    assert_names(line, bad, problem)
    assert not (tmp_path / "run").exists()
    assert snapshot(data) == before


def _without_registry(root: Path) -> None:
    (root / REGISTRY_NAME).unlink()


def _mask_missing(root: Path) -> Path:
    _without_registry(root)
    mask_path(root, TRAIN_ID).unlink()
    return mask_path(root, TRAIN_ID)


def _orphan_mask(root: Path) -> Path:
    orphan = mask_path(root, 999)
    shutil.copy(mask_path(root, TRAIN_ID), orphan)
    return orphan


def _registry_names_missing_study(root: Path) -> Path:
    study_path(root, TRAIN_ID, "CT-1").unlink()
    return study_path(root, TRAIN_ID, "CT-1")


def _registry_names_missing_mask(root: Path) -> Path:
    mask_path(root, TRAIN_ID).unlink()
    return mask_path(root, TRAIN_ID)


def _empty_folder(root: Path) -> Path:
    shutil.rmtree(root)
    root.mkdir()
    return root


def _no_such_folder(root: Path) -> Path:
    shutil.rmtree(root)
    return root


def _a_file(root: Path) -> Path:
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root


def _duplicate_study(root: Path) -> Path:
    _without_registry(root)
    twin = study_path(root, TRAIN_ID, "CT-2")
    twin.parent.mkdir(parents=True)
    shutil.copy(study_path(root, TRAIN_ID, "CT-1"), twin)
    return twin


LAYOUT_DAMAGE = {
    "annotated-mask-missing": (_mask_missing, "mask of an annotated study is missing"),
    "mask-without-study": (_orphan_mask, "mask has no matching study"),
    "registry-names-missing-study": (_registry_names_missing_study, f"named by {REGISTRY_NAME} line {TRAIN_REGISTRY_LINE} but missing"),
    "registry-names-missing-mask": (_registry_names_missing_mask, f"named by {REGISTRY_NAME} line {TRAIN_REGISTRY_LINE} but missing"),
    "empty-folder": (_empty_folder, "no MosMedData studies found"),
    "no-such-folder": (_no_such_folder, "data folder not found"),
    "a-file": (_a_file, "is a file; give the MosMedData folder"),
    "study-twice": (_duplicate_study, f"study {TRAIN_ID} appears twice"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_DAMAGE))
def test_train_refuses_a_bad_data_folder(case, data, tmp_path, capsys):
    damage, problem = LAYOUT_DAMAGE[case]
    named = damage(data)
    with pytest.raises(DataError):
        fit(CONFIG, tmp_path / "run", data_dir=data, progress=False)
    line = cli_error(capsys, ["train", "--data", data, "--out", tmp_path / "run", *TRAIN_FLAGS])
    assert_names(line, named, problem)
    assert not (tmp_path / "run").exists()


def test_the_parent_of_the_data_folder_gets_a_hint(data, tmp_path, capsys):
    line = cli_error(capsys, ["train", "--data", data.parent, "--out", tmp_path / "run", *TRAIN_FLAGS])
    assert_names(line, data.parent, "no MosMedData studies found", f"did you mean {data}?")


def test_resume_with_another_model_is_refused(data, run, capsys):
    before = snapshot(run)
    args = ["train", "--data", data, "--out", run, *TRAIN_FLAGS, "--model", "unet-mobilenetv2", "--encoder-weights", "none"]
    args += ["--image-size", "32", "--resume"]  # smp encoders need multiples of 32
    line = cli_error(capsys, args)
    assert_names(line, run / "last.pt", "checkpoint is for model 'unet', not 'unet-mobilenetv2'")
    assert snapshot(run) == before


def test_resume_with_another_config_is_refused(data, run, capsys):
    before = snapshot(run)
    with pytest.raises(CheckpointError):
        fit(CONFIG.replace(lr=0.5), run, data_dir=data, resume=True, progress=False)
    line = cli_error(capsys, ["train", "--data", data, "--out", run, *TRAIN_FLAGS, "--lr", "0.5", "--resume"])
    assert_names(line, run / "last.pt", "checkpoint was made with another config: lr=0.001 (asked 0.5)")
    assert snapshot(run) == before


def test_a_finished_run_is_not_overwritten(data, run, capsys):
    before = snapshot(run)
    line = cli_error(capsys, ["train", "--data", data, "--out", run, *TRAIN_FLAGS])
    assert_names(line, run / "last.pt", "already holds a run; pass --resume")
    assert snapshot(run) == before


def _truncate_last(run: Path) -> None:
    truncate(run / "last.pt")


def _best_as_last(run: Path) -> None:
    shutil.copy(run / "best.pt", run / "last.pt")


def _text_as_last(run: Path) -> None:
    (run / "last.pt").write_text("epoch 3\n")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate_last, "truncated or not a checkpoint"),
        (_text_as_last, "truncated or not a checkpoint"),
        (_best_as_last, "cannot resume from it: it lacks optimizer"),
    ],
    ids=["truncated", "text", "best-as-last"],
)
def test_resume_from_a_damaged_checkpoint_is_refused(damage, problem, data, run, capsys):
    damage(run)
    before = snapshot(run)
    line = cli_error(capsys, ["train", "--data", data, "--out", run, *TRAIN_FLAGS, "--resume"])
    assert_names(line, run / "last.pt", problem)
    assert snapshot(run) == before


def test_missing_encoder_weights_file_is_refused_before_the_data_is_read(tmp_path, capsys):
    weights = tmp_path / "no-such-weights.pth"
    args = ["train", "--data", tmp_path / "no-data-needed", "--out", tmp_path / "run", *TRAIN_FLAGS]
    args += ["--model", "unet-mobilenetv2", "--image-size", "32", "--encoder-weights", weights]
    line = cli_error(capsys, args)
    assert_names(line, weights, "no such weights file or folder")
    assert not (tmp_path / "run").exists()


class _PartialWriter:
    """A binary file whose write stores half the bytes, then fails as a full disk does."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(bytes(data)[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def disk_full_for(monkeypatch, name_part: str, partial: bool = True) -> None:
    """Make writes to temporary files whose name contains ``name_part`` hit a full disk: after
    part of the data (``partial``) or at once. Patches the ``open`` that every atomic write of
    the package goes through (:func:`covidseg.files.atomic_write`)."""
    from covidseg import files

    def full_open(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        if "w" in mode and name_part in Path(file).name:
            if partial and "b" in mode:
                return _PartialWriter(handle)
            handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return handle

    monkeypatch.setattr(files, "open", full_open, raising=False)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(data, run, capsys, monkeypatch):
    before = snapshot(run)
    disk_full_for(monkeypatch, ".last.pt.")
    line = cli_error(capsys, ["train", "--data", data, "--out", run, *TRAIN_FLAGS, "--epochs", "2", "--resume"])
    assert_names(line, run / "last.pt", "could not be written (No space left on device); the previous checkpoint is kept")
    monkeypatch.undo()
    after = snapshot(run)
    assert after[run / "last.pt"] == before[run / "last.pt"]
    assert after[run / "history.json"] == before[run / "history.json"]
    assert not list(run.glob(".*.tmp")), "no temporary file is left behind"


def test_read_only_run_folder_changes_nothing(data, run, capsys, monkeypatch):
    """A folder the user may not write to (simulated: the tests may run as root)."""
    before = snapshot(run)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent == run:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    line = cli_error(capsys, ["train", "--data", data, "--out", run, *TRAIN_FLAGS, "--epochs", "2", "--resume"])
    assert_names(line, run / "config.json", "could not be written (Permission denied)")
    monkeypatch.undo()
    assert snapshot(run) == before


# --- evaluate --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["truncated", "labels", "moved"])
def test_evaluate_refuses_a_damaged_mask(case, data, run, tmp_path, capsys):
    damage, problem = MASK_DAMAGE[case]
    bad = mask_path(data, TEST_ID)
    damage(bad)
    scores = tmp_path / "scores.json"
    scores.write_text("{}\n")
    before = snapshot(run, scores.parent)
    with pytest.raises(DataError):
        evaluate_run(run, data, device="cpu", json_path=scores, progress=False)
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--json", scores, "--quiet", "--device", "cpu"])
    assert_names(line, bad, problem)
    assert snapshot(run, scores.parent) == before


@pytest.mark.parametrize("case", ["hu-0-1", "not-nifti"])
def test_evaluate_refuses_a_damaged_study(case, data, run, capsys):
    damage, problem = STUDY_DAMAGE[case]
    bad = study_path(data, TEST_ID, "CT-1")
    damage(bad)
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--quiet", "--device", "cpu"])
    assert_names(line, bad, problem)


def test_evaluate_refuses_a_registry_naming_a_missing_mask(data, run, capsys):
    mask_path(data, TEST_ID).unlink()
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--quiet", "--device", "cpu"])
    assert_names(line, mask_path(data, TEST_ID), "but missing")


def test_evaluate_refuses_a_missing_data_folder(run, tmp_path, capsys):
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", tmp_path / "nowhere", "--quiet", "--device", "cpu"])
    assert_names(line, tmp_path / "nowhere", "data folder not found")


class _Exploit:
    """Unpickling this would create a file (weights-only loading must refuse it)."""

    def __reduce__(self):
        return (open, ("pwned.txt", "w"))


def _malicious(path: Path) -> None:
    state = _run_state()
    state["payload"] = _Exploit()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)


def _plain_torch(path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


CHECKPOINT_DAMAGE = {
    "truncated": (truncate, "truncated or not a checkpoint"),
    "text": (lambda p: p.write_text("not a checkpoint\n"), "truncated or not a checkpoint"),
    "empty": (_empty, "truncated or not a checkpoint"),
    "plain-torch": (_plain_torch, "not a covidseg checkpoint"),
    "malicious": (_malicious, "refused: not a plain-weights checkpoint"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_DAMAGE))
def test_evaluate_refuses_a_damaged_checkpoint(case, data, run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    damage, problem = CHECKPOINT_DAMAGE[case]
    damage(run / "best.pt")
    before = snapshot(run)
    with pytest.raises(CheckpointError):
        evaluate_run(run, data, device="cpu", progress=False)
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--quiet", "--device", "cpu"])
    assert_names(line, run / "best.pt", problem)
    assert not (tmp_path / "pwned.txt").exists(), "the payload ran"
    assert snapshot(run) == before


def test_evaluate_refuses_a_missing_run_folder(data, tmp_path, capsys):
    line = cli_error(capsys, ["evaluate", "--run", tmp_path / "no-run", "--data", data, "--quiet"])
    assert_names(line, tmp_path / "no-run", "run folder not found")


def test_evaluate_refuses_a_damaged_history(data, run, capsys):
    (run / "history.json").write_text('[{"epoch": 0, ')
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--quiet", "--device", "cpu"])
    assert_names(line, run / "history.json", "unreadable training history")


def test_evaluate_json_output_that_is_a_folder(data, run, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--json", folder, "--quiet"])
    assert_names(line, folder, "is a folder")
    assert list(folder.iterdir()) == []


def test_evaluate_json_on_a_full_disk_keeps_the_previous_file(data, run, tmp_path, capsys, monkeypatch):
    scores = tmp_path / "scores.json"
    scores.write_text('{"mean_dice": 0.5}\n')
    before = snapshot(tmp_path)
    disk_full_for(monkeypatch, ".scores.json.", partial=False)
    line = cli_error(capsys, ["evaluate", "--run", run, "--data", data, "--json", scores, "--quiet", "--device", "cpu"])
    monkeypatch.undo()
    assert_names(line, scores, "could not be written (No space left on device)")
    assert snapshot(tmp_path) == before


# --- predict ---------------------------------------------------------------------------------


@pytest.fixture
def ct(tmp_path) -> Path:
    return write_nifti(tmp_path / "in" / "ct.nii.gz", synthetic_ct((32, 32, 3))[0])


@pytest.fixture
def previous_output(tmp_path) -> Path:
    """A mask an earlier predict wrote, which a failed predict must leave alone."""
    return write_nifti(tmp_path / "out" / "mask.nii.gz", np.ones((4, 4, 2), dtype=np.int16),
                       description=PREDICTION_DESCRIPTION)


@pytest.mark.parametrize("case", sorted(STUDY_DAMAGE))
def test_predict_refuses_a_damaged_input(case, ct, run, previous_output, capsys):
    damage, problem = STUDY_DAMAGE[case]
    damage(ct)
    with pytest.raises(DataError):
        predict_file(run, ct, previous_output, device="cpu")
    before = snapshot(previous_output.parent, run, ct.parent)
    line = cli_error(capsys, ["predict", "--run", run, ct, previous_output, "--device", "cpu"])
    assert_names(line, ct, problem)
    assert snapshot(previous_output.parent, run, ct.parent) == before


@pytest.mark.parametrize("padding", [-3024, -2048, -2000, -32768])
def test_padding_outside_the_field_of_view_is_accepted_and_changes_no_mask(padding, run, tmp_path, capsys):
    """Scanners pad outside the reconstruction circle; clipping makes the padding air (-1000)."""
    hu = synthetic_ct((32, 32, 3))[0]
    outside = ~reconstruction_circle(hu.shape)
    plain, padded = hu.copy(), hu.copy()
    plain[outside], padded[outside] = -1000, padding
    studies = {name: write_nifti(tmp_path / "in" / f"{name}.nii.gz", array) for name, array in (("plain", plain), ("padded", padded))}
    before = snapshot(tmp_path / "in", run)
    printed = {}
    for name, study in studies.items():
        assert main(["predict", "--run", str(run), str(study), str(tmp_path / "out" / f"{name}.nii.gz"), "--device", "cpu"]) == 0
        printed[name] = capsys.readouterr().out.replace(str(study), "STUDY").replace(str(tmp_path / "out" / f"{name}.nii.gz"), "MASK")
    assert snapshot(tmp_path / "in", run) == before
    masks = {name: np.asarray(nib.load(tmp_path / "out" / f"{name}.nii.gz").dataobj) for name in studies}
    assert np.array_equal(masks["padded"], masks["plain"])
    assert printed["padded"] == printed["plain"]


@pytest.mark.parametrize("case", ["uint8-255-slope-1/255", "float32-1.0000001"])
def test_a_mask_equal_to_1_within_float_precision_is_accepted(case, data):
    """Such a mask is binary: its values are 1 to float32 rounding, and they are read as 1."""
    path = mask_path(data, TRAIN_ID)
    original = np.asarray(nib.load(path).dataobj).astype(np.uint8)
    assert original.any()
    if case.startswith("uint8"):
        image = nib.Nifti1Image(original * np.uint8(255), LAS_AFFINE)
        image.header.set_slope_inter(np.float32(1 / 255), 0.0)
    else:
        image = nib.Nifti1Image(original.astype(np.float32) * np.float32(1.0000001), LAS_AFFINE)
    nib.save(image, path)
    volume = load_volume(path)
    assert volume.array.max() != 1, "the file does hold a value that is not exactly 1"
    assert np.array_equal(check_binary_mask(volume.array, path), original)  # stored LAS: no reorientation


def test_predict_refuses_a_missing_input(run, tmp_path, previous_output, capsys):
    before = snapshot(previous_output.parent)
    line = cli_error(capsys, ["predict", "--run", run, tmp_path / "absent.nii.gz", previous_output])
    assert_names(line, tmp_path / "absent.nii.gz", "file not found")
    assert snapshot(previous_output.parent) == before


def test_predict_refuses_a_folder_as_input(run, tmp_path, previous_output, capsys):
    dicom = tmp_path / "dicom-series"
    dicom.mkdir()
    line = cli_error(capsys, ["predict", "--run", run, dicom, previous_output])
    assert_names(line, dicom, "is a folder, not a NIfTI file")


@pytest.mark.parametrize(
    "make_output, problem",
    [
        (lambda tmp: tmp / "out", "is a folder; give a file name"),
        (lambda tmp: tmp / "out" / "mask.png", "must end in .nii.gz or .nii"),
        (lambda tmp: tmp / "in" / "ct.nii.gz", "is the input study"),
    ],
    ids=["folder", "not-nifti-name", "the-input"],
)
def test_predict_refuses_a_bad_output_path(make_output, problem, ct, run, tmp_path, previous_output, capsys):
    output = make_output(tmp_path)
    before = snapshot(tmp_path / "in", tmp_path / "out")
    line = cli_error(capsys, ["predict", "--run", run, ct, output, "--device", "cpu"])
    assert_names(line, output, problem)
    assert snapshot(tmp_path / "in", tmp_path / "out") == before


def test_predict_into_a_read_only_folder(ct, run, previous_output, capsys, monkeypatch):
    before = snapshot(previous_output.parent)

    real_open = os.open

    def denied(path, *args, **kwargs):  # the folder refuses new files (chmod does not stop root)
        if Path(path).parent == previous_output.parent:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    line = cli_error(capsys, ["predict", "--run", run, ct, previous_output, "--device", "cpu"])
    monkeypatch.undo()
    assert_names(line, previous_output, "cannot write here (Permission denied)")
    assert snapshot(previous_output.parent) == before


def test_predict_on_a_full_disk_keeps_the_previous_output(ct, run, previous_output, capsys, monkeypatch):
    before = snapshot(previous_output.parent)

    def half_written(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x1f\x8b" + b"\0" * 100)  # the start of a gzip stream, then no room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", half_written)
    line = cli_error(capsys, ["predict", "--run", run, ct, previous_output, "--device", "cpu"])
    monkeypatch.undo()
    assert_names(line, previous_output, "could not be written (No space left on device); nothing was changed")
    assert snapshot(previous_output.parent) == before, "the old mask is intact and no temporary file is left"


@pytest.mark.parametrize("case", ["truncated", "text", "malicious"])
def test_predict_refuses_a_damaged_checkpoint(case, ct, run, tmp_path, previous_output, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    damage, problem = CHECKPOINT_DAMAGE[case]
    damage(run / "best.pt")
    with pytest.raises(CheckpointError):
        predict_file(run, ct, previous_output, device="cpu")
    before = snapshot(previous_output.parent, run)
    line = cli_error(capsys, ["predict", "--run", run, ct, previous_output, "--device", "cpu"])
    assert_names(line, run / "best.pt", problem)
    assert snapshot(previous_output.parent, run) == before
    assert not (tmp_path / "pwned.txt").exists()


def test_predict_refuses_a_missing_run_folder(ct, tmp_path, capsys):
    line = cli_error(capsys, ["predict", "--run", tmp_path / "no-run", ct, tmp_path / "mask.nii.gz"])
    assert_names(line, tmp_path / "no-run", "run folder not found")


# --- a real process: one line, no traceback --------------------------------------------------


def _covidseg(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "covidseg", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_process_prints_one_line_for_a_file_that_is_not_nifti(ct, run, tmp_path, previous_output):
    not_nifti(ct)
    result = _covidseg("predict", "--run", run, ct, previous_output, "--device", "cpu", cwd=tmp_path)
    assert result.returncode == EXIT_ERROR
    assert result.stderr.splitlines() == [f"covidseg: error: {ct}: not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)"]
    assert result.stdout == ""


def test_process_prints_one_line_for_a_malicious_checkpoint(data, run, tmp_path):
    _malicious(run / "best.pt")
    result = _covidseg("evaluate", "--run", run, "--data", data, "--quiet", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == EXIT_ERROR and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"covidseg: error: {run / 'best.pt'}: refused")
    assert not (tmp_path / "pwned.txt").exists()


# --- the source never unpickles or evaluates untrusted data ----------------------------------


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_loads_checkpoints_with_weights_only_and_never_unpickles():
    offences = []
    for source in sorted((REPO / "covidseg").rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for call, name in _calls(tree):
            where = f"{source.relative_to(REPO)}:{call.lineno}: {name}("
            keywords = {k.arg: k.value for k in call.keywords}
            if name == "torch.load":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offences.append(where + ") without weights_only=True")
            if name in ("eval", "exec", "compile", "__import__") or name.startswith(("pickle.", "marshal.", "dill.", "shelve.")):
                if name != "pickle.UnpicklingError":
                    offences.append(where + ")")
            if name in ("np.load", "numpy.load"):
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    offences.append(where + ") with allow_pickle")
            if name in ("yaml.load", "yaml.unsafe_load", "os.system") or name.startswith("subprocess."):
                offences.append(where + ")")
    assert offences == []


def test_the_source_check_would_catch_an_unsafe_load():
    tree = ast.parse("torch.load(f)\ntorch.load(f, weights_only=False)\nx = pickle.loads(b)\neval('1')\nmodel.eval()")
    names = [name for _, name in _calls(tree)]
    assert names.count("torch.load") == 2 and "pickle.loads" in names and "eval" in names
    assert "model.eval" in names  # a method named eval is not the builtin


# --- predict writes over no file it did not write ---------------------------------------------


def _predict_outputs(tmp_path, ct, run, output, *extra):
    return ["predict", "--run", run, ct, output, "--device", "cpu", *extra]


@pytest.mark.parametrize("victim", ["another-study", "a-user-mask", "the-checkpoint-renamed"])
def test_predict_writes_no_mask_over_a_file_it_did_not_write(victim, ct, run, tmp_path, capsys):
    (tmp_path / "out").mkdir(exist_ok=True)
    other = {
        "another-study": lambda: write_nifti(tmp_path / "in" / "other_ct.nii.gz", synthetic_ct((32, 32, 3), seed=1)[0]),
        "a-user-mask": lambda: write_nifti(tmp_path / "out" / "expert_mask.nii.gz", np.ones((32, 32, 3), dtype=np.int16)),
        "the-checkpoint-renamed": lambda: Path(shutil.copy(next(run.glob("*.pt")), tmp_path / "out" / "best.nii.gz")),
    }[victim]()
    before = snapshot(tmp_path / "in", tmp_path / "out", run)
    line = cli_error(capsys, _predict_outputs(tmp_path, ct, run, other))
    assert_names(line, other, "already exists and was not written by this command; it is left as it is")
    assert snapshot(tmp_path / "in", tmp_path / "out", run) == before


def test_predict_replaces_a_mask_it_wrote(ct, run, previous_output, capsys):
    assert main(_predict_outputs(None, ct, run, previous_output)) == 0
    assert load_volume(previous_output).array.shape == load_volume(ct).array.shape


@pytest.mark.parametrize("flag, victim", [("--json", "checkpoint"), ("--json", "history.json"), ("--lungs-out", "ct")])
def test_predict_extra_outputs_write_over_nothing_of_the_user(flag, victim, ct, run, tmp_path, capsys):
    target = {"ct": ct, "checkpoint": next(run.glob("*.pt"))}.get(victim, run / victim)
    if not target.exists():
        target.write_text("[]\n")
    mask = tmp_path / "out" / "new_mask.nii.gz"
    before = snapshot(tmp_path / "in", run)
    line = cli_error(capsys, _predict_outputs(tmp_path, ct, run, mask, flag, target))
    assert str(target) in line and ("already exists and was not written" in line or "names the study" in line), line
    assert snapshot(tmp_path / "in", run) == before
    assert not mask.exists(), "nothing is written when an output is refused"
