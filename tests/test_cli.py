"""The ``covidseg`` command end to end on a tiny dataset, and its argument handling."""

from __future__ import annotations

import argparse
import json
import re
import tempfile

import nibabel as nib
import numpy as np
import pytest
import torch

import covidseg.training as training
from covidseg.cli import EXIT_BUG, EXIT_ERROR, build_parser, config_from_args, main
from covidseg.config import PRESETS, get_preset
from covidseg.splits import get_split

from conftest import TINY_TRAIN_FLAGS, synthetic_ct, write_nifti

TRAIN = TINY_TRAIN_FLAGS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tiny50):
    return tiny50


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("covidseg: error: ") and "Traceback" not in err, err
    return lines[0]


def test_train_evaluate_predict(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "best validation per-study Dice" in out and "run card" in out
    assert {"config.json", "last.pt", "best.pt", "history.csv", "history.json"} <= {p.name for p in run.iterdir()}

    scores = tmp_path / "scores" / "test.json"
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--json", str(scores), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(scores.read_text())
    assert {"per_study", "mean_dice", "max_dice", "pooled_dice", "run_card"} <= set(report)
    assert sorted(map(int, report["per_study"])) == sorted(get_split("thesis").test)
    dice = list(report["per_study"].values())
    assert report["mean_dice"] == pytest.approx(np.mean(dice)) and report["max_dice"] == max(dice)
    card = report["run_card"]
    assert {"data", "device", "epochs", "image_size", "seconds"} <= set(card)
    assert (card["epochs"], card["image_size"], card["model"]) == (2, 16, "unet")
    assert card["device"].startswith("cpu") and card["seconds"] > 0
    assert f"mean {report['mean_dice']:.3f} / max {report['max_dice']:.3f}" in printed

    # A study of another size and orientation (RAS) than the training data.
    ras = np.diag([0.8, 0.8, 5.0, 1.0])
    ras[:3, 3] = (-12.0, 30.0, -70.0)
    study = write_nifti(tmp_path / "new" / "ct.nii.gz", synthetic_ct((40, 32, 3), seed=9)[0], ras)
    mask_file = tmp_path / "masks" / "ct_mask.nii.gz"
    assert main(["predict", "--run", str(run), str(study), str(mask_file), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    written, source = nib.load(mask_file), nib.load(study)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.shape == source.shape and written.get_data_dtype() == np.int16
    mask = np.asanyarray(written.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    volume_ml = float(re.search(r"lesion volume (\d+\.\d) mL", printed).group(1))
    assert volume_ml == pytest.approx(mask.sum() * 0.8 * 0.8 * 5.0 / 1000, abs=0.05)
    assert str(mask_file) in printed


def _train_args(*extra):
    return build_parser().parse_args(["train", "--model", "unet-resnet34", "--out", "run", *extra])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_encoder_weights_flag(preset):
    config = lambda *flag: config_from_args(_train_args("--preset", preset, "--image-size", "64", *flag))  # noqa: E731
    assert config("--encoder-weights", "none").encoder_weights is None
    assert config("--encoder-weights", "None").encoder_weights is None
    assert config("--encoder-weights", "imagenet").encoder_weights == "imagenet"
    assert config("--encoder-weights", "weights/resnet34.pth").encoder_weights == "weights/resnet34.pth"
    assert config().encoder_weights == get_preset(preset).encoder_weights  # no flag: the preset decides


def test_flags_reach_the_config():
    args = _train_args("--preset", "quick", "--image-size", "64", "--unet-width", "8", "--epochs", "3", "--lr", "0.01")
    config = config_from_args(args)
    assert (config.image_size, config.unet_width, config.max_epochs, config.lr) == (64, 8, 3, 0.01)
    assert config_from_args(_train_args("--preset", "quick", "--slices-per-epoch", "all")).slices_per_epoch is None
    assert config_from_args(_train_args("--preset", "quick", "--slices-per-epoch", "48")).slices_per_epoch == 48


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def test_no_flag_parses_with_bool():
    """``type=bool`` turns the string 'False' into True; flags must be store_true or choices."""
    actions = list(_actions(build_parser()))
    assert len(actions) > 30
    assert [a.dest for a in actions if a.type is bool] == []


@pytest.mark.parametrize(
    "args, problem",
    [
        ([], "the following arguments are required: COMMAND"),
        (["train", "--model", "unet", "--out", "r", "--epochs", "0"], "train: argument --epochs: must be between 1 and 100000, got 0"),
        (["train", "--model", "unet", "--out", "r", "--lr", "fast"], "train: argument --lr: expected a number, got 'fast'"),
        (["train", "--model", "unet-2000", "--out", "r"], "train: argument --model: invalid choice: 'unet-2000'"),
        (["train", "--model", "unet", "--out", "r", "--device", "tpu"], "train: argument --device: is not a supported device; use auto, cpu, cuda, cuda:N or mps, got tpu"),
        *[(["train", "--model", "unet", "--out", "r", "--device", d], f"train: argument --device: is not a supported device; use auto, cpu, cuda, cuda:N or mps, got {d}")
          for d in ("meta", "xpu", "hpu", "cuda:x")],
        (["predict", "--run", "r", "a.nii.gz", "b.nii.gz", "--device", "meta"], "predict: argument --device: is not a supported device"),
        (["train", "--model", "unet", "--out", "r", "--seed", "99999999999999999999"],
         "train: argument --seed: must be between 0 and 4294967295, got 99999999999999999999"),
        (["train", "--model", "unet", "--out", "r", "--seed", "-1"], "train: argument --seed: must be between 0 and 4294967295, got -1"),
        (["phantom", "p", "--seed", "99999999999999999999"], "phantom: argument --seed: must be between 0 and 4294967295"),
        (["train", "--model", "unet", "--out", "r", "--unet-width", "1024"], "train: argument --unet-width: must be between 1 and 256, got 1024"),
        (["train", "--model", "unet", "--out", "r", "--image-size", "0"], "train: argument --image-size: must be between 16 and 2048, got 0"),
        (["train", "--model", "unet", "--out", "r", "--lr", "nan"], "train: argument --lr: must be a finite number, got nan"),
        (["train", "--model", "unet", "--out", "r", "--lr", "-1"], "train: argument --lr: must be at least 0.0, got -1"),
        (["train", "--model", "unet", "--out", "r", "--min-delta", "-1"], "train: argument --min-delta: must be between 0.0 and 1.0, got -1"),
        (["train", "--model", "unet", "--out", "r", "--patience", "0"], "train: argument --patience: must be between 1 and 100000, got 0"),
        (["train", "--model", "unet", "--out", "r", "--loss", "focal"], "train: argument --loss: invalid choice: 'focal'"),
        (["predict", "--run", "r", "in.nii.gz"], "predict: the following arguments are required: OUT.nii.gz"),
        (["evaluate", "--run", "r", "--part", "holdout"], "evaluate: argument --part: invalid choice: 'holdout'"),
    ],
    ids=["no-command", "zero-epochs", "lr-word", "unknown-model", "unknown-device", "meta", "xpu", "hpu", "cuda-x", "predict-meta",
         "huge-seed", "negative-seed", "phantom-seed", "huge-width", "zero-size", "nan-lr", "negative-lr", "negative-min-delta",
         "zero-patience", "unknown-loss", "missing-output", "unknown-part"],
)
def test_usage_errors_are_one_line(args, problem, capsys):
    assert main(args) == EXIT_ERROR
    line = one_error_line(capsys)
    assert problem in line and "--help" in line


@pytest.mark.parametrize("model, size, multiple", [("unet", "24", 16), ("unet-resnet34", "48", 32)])
def test_image_size_must_suit_the_model(model, size, multiple, tmp_path, capsys):
    assert main(["train", "--model", model, "--out", str(tmp_path / "run"), "--image-size", size]) == EXIT_ERROR
    assert f"--image-size {size} must be a multiple of {multiple}" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out


def test_an_unexpected_error_is_one_line_with_the_traceback_saved(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nat line two")

    monkeypatch.setattr(training, "fit", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["train", "--model", "unet", "--out", str(tmp_path / "run"), "--preset", "quick"]) == EXIT_BUG
    line = one_error_line(capsys)
    saved = next(tmp_path.glob("covidseg-traceback-*.txt"))
    assert line == f"covidseg: error: unexpected RuntimeError: boom at line two (a bug in covidseg? please report it; the traceback is in {saved})"
    assert "Traceback" in saved.read_text() and "in broken" in saved.read_text()


def test_out_of_gpu_memory_says_what_to_do(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "fit", out_of_memory)
    assert main(["train", "--model", "unet", "--out", str(tmp_path / "run"), "--preset", "quick"]) == EXIT_ERROR
    assert "out of GPU memory; try a smaller --batch-size or --image-size" in one_error_line(capsys)
