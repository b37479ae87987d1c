"""Issue 12, kinds A-D and F: no command writes over what it did not create, a run folder has one
writer, a wrong result is never reported as fine, provenance comes from the data, and every value
is checked with one line naming it. Each test checks the exit status, the one line, and that every
file that existed before is byte-identical afterwards."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from covidseg import notebook
from covidseg.checkpoint import load_checkpoint, save_checkpoint
from covidseg.cli import EXIT_ERROR, build_parser, config_from_args, flag_of, main
from covidseg.config import QUICK_ENV, TrainConfig, preset_from_env
from covidseg.runs import OWNER_NAME
from covidseg.splits import get_split
from covidseg.training import fit

from conftest import REPO, TINY_TRAIN_FLAGS, synthetic_ct, tiny_config, write_nifti, write_tiny_dataset

TRAINING_STUDY = get_split("thesis").train[:1]
"""A study the runs of these tests train on (the thesis split's first training study)."""

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(*folders: Path) -> dict:
    """Every file under ``folders`` and its bytes."""
    return {p: p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("covidseg: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny50, tmp_path_factory) -> Path:
    """A finished one-epoch run on :func:`tiny50`."""
    run = tmp_path_factory.mktemp("trained") / "run"
    fit(tiny_config(max_epochs=1), run, data_dir=tiny50, progress=False)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def train_args(data, out, *extra) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--epochs", "1", *extra]


# --- Kind A: no command writes over a file it did not create -------------------------------------


@pytest.mark.parametrize("target", ["best.pt", "last.pt", "history.json", "config.json", "study"])
def test_evaluate_json_never_writes_over_a_file_it_did_not_write(tiny50, run, tmp_path, target, capsys):
    path = write_nifti(tmp_path / "ct.nii.gz", synthetic_ct()[0]) if target == "study" else run / target
    before = snapshot(run, tmp_path)
    assert main(["evaluate", "--run", str(run), "--data", str(tiny50), "--json", str(path), "--quiet"]) == EXIT_ERROR
    line = one_error_line(capsys)
    assert line == f"covidseg: error: {path}: already exists and was not written by this command; it is left as it is: give a new file name such as scores.json"
    assert snapshot(run, tmp_path) == before


def test_evaluate_json_replaces_its_own_report(tiny50, run, tmp_path, capsys):
    report = tmp_path / "scores.json"
    assert main(["evaluate", "--run", str(run), "--data", str(tiny50), "--json", str(report), "--quiet"]) == 0
    first = json.loads(report.read_text())
    assert first["format"] == "covidseg-evaluation-1"
    assert main(["evaluate", "--run", str(run), "--data", str(tiny50), "--json", str(report), "--part", "val", "--quiet"]) == 0
    assert json.loads(report.read_text())["part"] == "val"
    report.write_text(json.dumps({"part": "test", "notes": "mine"}))  # a JSON of the user's, not a report
    before = snapshot(tmp_path)
    assert main(["evaluate", "--run", str(run), "--data", str(tiny50), "--json", str(report), "--quiet"]) == EXIT_ERROR
    assert "already exists and was not written by this command" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_a_folder_with_best_pt_but_no_last_pt_is_never_overwritten(tiny50, run, resume, capsys):
    (run / "last.pt").unlink()
    before = snapshot(run)
    assert main(train_args(tiny50, run, *(["--resume"] if resume else []))) == EXIT_ERROR
    line = one_error_line(capsys)
    if resume:
        assert line.startswith(f"covidseg: error: {run}: cannot be resumed: it has no last.pt (holds best.pt, config.json")
    else:
        assert line.startswith(f"covidseg: error: {run}: already holds a run; pass --resume to continue it or choose another --out (holds best.pt")
    assert snapshot(run) == before


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_out_dot_never_overwrites_a_projects_own_files(tiny50, tmp_path, monkeypatch, resume, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"name": "my project"}\n')
    (project / "notes.txt").write_text("mine\n")
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert main(train_args(tiny50, ".", *(["--resume"] if resume else []))) == EXIT_ERROR
    line = one_error_line(capsys)
    assert (".: cannot be resumed: it has no last.pt" if resume else ".: already holds a run") in line and "config.json" in line
    assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["config.json", "notes.txt"]


def test_a_folder_of_unrelated_files_is_refused(tiny50, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(out)
    assert main(train_args(tiny50, out)) == EXIT_ERROR
    assert one_error_line(capsys) == (f"covidseg: error: {out}: is not empty (holds holiday.jpg); a new run needs a new or empty "
                                      "folder: choose another --out")
    assert snapshot(out) == before


def test_resume_refuses_a_foreign_config_json(tiny50, run, capsys):
    (run / "config.json").write_text('{"name": "not a run config"}\n')
    before = snapshot(run)
    assert main(train_args(tiny50, run, "--resume")) == EXIT_ERROR
    assert f"{run / 'config.json'}: is not the config of a covidseg run" in one_error_line(capsys)
    assert snapshot(run) == before


def test_a_failed_start_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new-run"
    assert main(train_args(tmp_path / "no-data", out)) == EXIT_ERROR
    capsys.readouterr()
    assert not out.exists()


# --- Kind B: one writer per run folder -----------------------------------------------------------


def test_a_second_train_into_the_same_folder_refuses_at_once(tiny50, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "covidseg", "train", "--data", str(tiny50), "--out", str(out), *TINY_TRAIN_FLAGS]
    first = subprocess.Popen([*command, "--epochs", "100000", "--patience", "100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / OWNER_NAME).is_file():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training never took the run folder"
            time.sleep(0.1)
        before = snapshot(out)
        second = subprocess.run([*command, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == EXIT_ERROR
        lines = second.stderr.strip().splitlines()
        assert lines == [f"covidseg: error: {out}: another covidseg process is writing this run folder (pid {first.pid} on "
                         f"{os.uname().nodename}); wait for it to finish or choose another --out"]
        assert first.poll() is None, "the first training goes on"
        assert all(snapshot(out).get(p) == b for p, b in before.items() if p.suffix != ".pt" and "history" not in p.name)
    finally:
        first.kill()
        first.wait()


# --- Kind C: a wrong result is never reported as fine --------------------------------------------


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_epoch(tiny50, tmp_path, monkeypatch, capsys):
    from covidseg import training

    out = tmp_path / "run"
    assert main(train_args(tiny50, out)) == 0
    capsys.readouterr()
    before = snapshot(out)
    real = training.build_loss

    def nan_loss(name):
        loss = real(name)
        return lambda logits, target: loss(logits, target) * float("nan")

    monkeypatch.setattr(training, "build_loss", nan_loss)
    assert main(train_args(tiny50, out, "--resume", "--epochs", "3")) == EXIT_ERROR
    line = one_error_line(capsys)
    assert line == (f"covidseg: error: {out}: training diverged: the loss became nan at step 1 in epoch 2; nothing of that epoch "
                    f"was saved and {out / 'last.pt'} keeps epoch 1, the last good one (try a smaller --lr than 0.001)")
    assert snapshot(out) == before


def test_a_diverging_lr_stops_with_one_line_and_leaves_nothing(tiny50, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny50, out, "--lr", "1e30", "--epochs", "5")) == EXIT_ERROR
    line = one_error_line(capsys)
    assert f"{out}: training diverged:" in line and "no epoch was saved (try a smaller --lr than 1e+30)" in line
    assert not out.exists()


def _damage_weights(run: Path, value: float) -> str:
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / name)
        key = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][key].view(-1)[0] = value
        state["config"] = state["config"].to_dict()
        state.pop("format")
        save_checkpoint(state, run / name)
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_predict_and_evaluate_refuse_non_finite_weights(tiny50, run, tmp_path, value, capsys):
    key = _damage_weights(run, value)
    study = write_nifti(tmp_path / "ct.nii.gz", synthetic_ct()[0])
    before = snapshot(run, tmp_path)
    expected = (f"covidseg: error: {run / 'best.pt'}: damaged checkpoint: weight {key} holds non-finite values (NaN or infinity): "
                "the run that saved it diverged")
    assert main(["predict", "--run", str(run), str(study), str(tmp_path / "mask.nii.gz"), "--device", "cpu"]) == EXIT_ERROR
    assert one_error_line(capsys) == expected
    assert main(["evaluate", "--run", str(run), "--data", str(tiny50), "--quiet"]) == EXIT_ERROR
    assert one_error_line(capsys) == expected
    assert snapshot(run, tmp_path) == before


# --- Kind D: provenance comes from the data ------------------------------------------------------


def test_resume_on_other_data_is_refused(tiny50, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny50, out)) == 0
    other = tmp_path / "other"
    shutil.copytree(tiny50, other)
    write_tiny_dataset(other, ids=TRAINING_STUDY, shape=(16, 16, 4), registry=False)  # one training study differs
    capsys.readouterr()
    before = snapshot(out)
    assert main(train_args(other, out, "--resume", "--epochs", "2")) == EXIT_ERROR
    line = one_error_line(capsys)
    assert line.startswith(f"covidseg: error: {out / 'last.pt'}: was trained on other data than {other} (data identity ")
    assert line.endswith("resume it with the --data it was trained on, or choose another --out")
    assert snapshot(out) == before
    moved = tmp_path / "moved"
    shutil.copytree(tiny50, moved)  # the same data elsewhere is the same data
    assert main(train_args(moved, out, "--resume", "--epochs", "2")) == 0


def test_train_or_reuse_does_not_reuse_a_run_on_other_data(tiny50, tmp_path, capsys):
    config, run = tiny_config(max_epochs=1), tmp_path / "run"
    notebook.train_or_reuse(config, tiny50, run, progress=False)
    before = snapshot(run)
    other = tmp_path / "other"
    shutil.copytree(tiny50, other)
    write_tiny_dataset(other, ids=TRAINING_STUDY, shape=(16, 16, 4), registry=False)
    used, _ = notebook.train_or_reuse(config, other, run, progress=False)
    assert used != run and "it was trained with other data" in capsys.readouterr().out
    assert snapshot(run) == before


def test_quick_mode_always_uses_the_phantom(tiny50, tmp_path, monkeypatch):
    from covidseg import phantom

    monkeypatch.setattr(phantom, "ensure_phantom", lambda size, progress=True: tmp_path / f"phantom-{size}")
    monkeypatch.setenv("COVIDSEG_DATA", str(tiny50))
    monkeypatch.setenv(QUICK_ENV, "1")
    setup = notebook.choose_setup(progress=False)
    assert setup.preset == "quick" and setup.data_dir == tmp_path / "phantom-128"


@pytest.mark.parametrize("value", ["maybe", "2", "quick"])
def test_an_unknown_quick_value_is_one_line(value, monkeypatch):
    monkeypatch.setenv(QUICK_ENV, value)
    with pytest.raises(ValueError) as info:
        preset_from_env()
    assert str(info.value) == (f"{QUICK_ENV}={value!r} is not understood; use 1, true, yes, on for the quick preset "
                               "or 0, false, no, off (or leave it unset) for the full one")


# --- Kind F: every value checked, one line naming it ---------------------------------------------


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("config.image_size", 0, "invalid config in checkpoint: image_size 0 must be between 16 and 2048"),
        ("config.unet_width", 1024, "invalid config in checkpoint: unet_width 1024 must be between 1 and 256"),
        ("config.seed", -3, "invalid config in checkpoint: seed -3 must be between 0 and 4294967295"),
        ("config.device", "meta", "invalid config in checkpoint: device 'meta' is not a supported device"),
        ("epoch", -5, "damaged checkpoint: epoch -5 must be a whole number of at least 0"),
        ("early_stopping.bad_epochs", "3", "damaged checkpoint: early_stopping bad_epochs '3' must be a int"),
        ("early_stopping.best_score", None, "damaged checkpoint: early_stopping best_score None must be a float"),
        ("early_stopping.best_epoch", 7, "damaged checkpoint: early_stopping"),
    ],
)
def test_checkpoint_values_are_checked(tiny50, run, tmp_path, field, value, problem, capsys):
    state = load_checkpoint(run / "last.pt")
    state["config"] = state["config"].to_dict()
    state.pop("format")
    *parents, key = field.split(".")
    target = state
    for parent in parents:
        target = target[parent]
    target[key] = value
    save_checkpoint(state, run / "last.pt")
    (run / "best.pt").unlink()
    before = snapshot(run)
    assert main(train_args(tiny50, run, "--resume", "--epochs", "3")) == EXIT_ERROR
    line = one_error_line(capsys)
    assert line.startswith(f"covidseg: error: {run / 'last.pt'}: {problem}"), line
    assert snapshot(run) == before
    study = write_nifti(tmp_path / "ct.nii.gz", synthetic_ct()[0])
    assert main(["predict", "--run", str(run), str(study), str(tmp_path / "mask.nii.gz"), "--device", "cpu"]) == EXIT_ERROR
    assert one_error_line(capsys).startswith(f"covidseg: error: {run / 'last.pt'}: {problem}")
    assert snapshot(run) == before and not (tmp_path / "mask.nii.gz").exists()


@pytest.mark.parametrize(
    "command, advice",
    [
        ("predict", "out of GPU memory; try a smaller --batch-size, or --device cpu"),
        ("evaluate", "out of GPU memory; try --device cpu"),
        ("train", "out of GPU memory; try a smaller --batch-size or --image-size, or --device cpu; a run that completed an epoch continues with --resume"),
    ],
)
def test_out_of_memory_names_only_flags_the_command_has(run, tmp_path, command, advice, monkeypatch, capsys):
    from covidseg import evaluation, prediction, training

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(prediction, "predict_file", out_of_memory)
    monkeypatch.setattr(evaluation, "evaluate_run", out_of_memory)
    monkeypatch.setattr(training, "fit", out_of_memory)
    study = write_nifti(tmp_path / "ct.nii.gz", synthetic_ct()[0])
    argv = {
        "predict": ["predict", "--run", str(run), str(study), str(tmp_path / "mask.nii.gz")],
        "evaluate": ["evaluate", "--run", str(run)],
        "train": ["train", "--model", "unet", "--out", str(tmp_path / "new"), "--preset", "quick"],
    }[command]
    assert main(argv) == EXIT_ERROR
    assert one_error_line(capsys) == f"covidseg: error: {advice}"


def test_cpu_out_of_memory_says_what_to_do(run, tmp_path, monkeypatch, capsys):
    from covidseg import prediction

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(prediction, "predict_file", no_memory)
    study = write_nifti(tmp_path / "ct.nii.gz", synthetic_ct()[0])
    assert main(["predict", "--run", str(run), str(study), str(tmp_path / "mask.nii.gz")]) == EXIT_ERROR
    assert one_error_line(capsys) == "covidseg: error: out of CPU memory; try a smaller --batch-size"


# --- the CLI: flags from TrainConfig, and instant help -------------------------------------------


def test_train_help_lists_every_config_field(capsys):
    assert main(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        flag = "--preset" if field.name == "preset" else flag_of(field.name)
        assert flag in shown, f"TrainConfig.{field.name} has no flag {flag}"


def test_every_config_field_is_settable_from_the_command_line():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "unet", "--out", "r", "--preset", "quick", "--patience", "9",
                              "--min-delta", "0.01", "--no-amp", "--max-epochs", "7", "--slices-per-epoch", "all"])
    config = config_from_args(args)
    assert (config.patience, config.min_delta, config.amp, config.max_epochs, config.slices_per_epoch) == (9, 0.01, False, 7, None)
    assert config_from_args(parser.parse_args(["train", "--model", "unet", "--out", "r", "--epochs", "4"])).max_epochs == 4
    assert config_from_args(parser.parse_args(["train", "--model", "unet", "--out", "r"])).amp is True  # the preset's


@pytest.mark.parametrize("command", ["", "phantom", "download", "train", "evaluate", "predict"])
def test_help_imports_nothing_heavy(command):
    """``covidseg [COMMAND] --help`` answers without importing torch, smp, scipy, matplotlib or nibabel."""
    argv = [command, "--help"] if command else ["--help"]
    code = (
        "import sys, contextlib, io\n"
        "from covidseg.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()): status = main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'segmentation_models_pytorch', 'scipy', 'matplotlib', 'nibabel', 'numpy') if m in sys.modules)\n"
        "print(status, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "0 []", result.stderr
