"""What ``fit(progress=True)`` shows: a time estimate, one line per epoch, and one bar per call that
does not multiply a notebook's outputs epoch by epoch."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import covidseg.training as training
from covidseg.training import fit

from conftest import RESUME_CONFIG, FakeClock

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = RESUME_CONFIG  # 6 epochs of 64 slices in batches of 16: 4 steps per epoch
EPOCHS = CONFIG.max_epochs
WARMUP_S, STEP_S, PREDICT_S = 4.0, 0.25, 0.5
"""Fake seconds of the first training step, of every other step, and of a prediction call (one
per validation study; tiny50's 5 validation studies have 3 slices each). Binary fractions, so
the sums below are exact."""


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """``training``'s clock, advancing by the seconds above in each training step and prediction."""
    fake = FakeClock()
    real_loss, real_predict = training.build_loss, training.predict_probabilities
    steps = []

    def timed_loss(name):
        loss = real_loss(name)

        def call(logits, target):
            fake.now += WARMUP_S if not steps else STEP_S
            steps.append(1)
            return loss(logits, target)

        return call

    def timed_predict(*args, **kwargs):
        fake.now += PREDICT_S
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(training, "_clock", fake)
    monkeypatch.setattr(training, "build_loss", timed_loss)
    monkeypatch.setattr(training, "predict_probabilities", timed_predict)
    return fake


def test_the_estimate_leaves_out_the_warm_up_and_counts_validation(tiny50, clock, tmp_path, capsys):
    result = fit(CONFIG, tmp_path / "run", data_dir=tiny50, progress=True)
    lines = capsys.readouterr().out.splitlines()
    # 4 steps of 0.25 s (the 4 s warm-up left out) and 5 studies of 0.5 s, for each of 6 epochs
    assert lines[0] == "estimate: 3.5 s per epoch (1.0 s of 4 training steps, 2.5 s of validation); at most 21 s for 6 epochs (early stopping usually ends sooner)"
    # the first epoch holds the warm-up and the estimate's own prediction of one study, twice (a warm-up batch, then timed)
    assert [row["epoch_seconds"] for row in result.history] == [WARMUP_S + 3 * STEP_S + 2 * PREDICT_S + 5 * PREDICT_S] + [3.5] * (EPOCHS - 1)


def test_each_epoch_line_says_loss_dice_time_and_the_best_so_far(tiny50, clock, tmp_path, capsys):
    result = fit(CONFIG, tmp_path / "run", data_dir=tiny50, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == len(result.history) == EPOCHS
    pattern = re.compile(r"epoch (\d+)/(\d+)  train loss ([\d.]+)  val Dice ([\d.]+)  ([\d.]+) s  best ([\d.]+) \(epoch (\d+)\)")
    dice_so_far = []
    for line, row in zip(lines, result.history):
        number, cap, loss, dice, seconds, best, best_epoch = pattern.fullmatch(line).groups()
        assert (int(number), int(cap)) == (row["epoch"] + 1, EPOCHS)
        assert float(loss) == pytest.approx(row["train_loss"], abs=5e-5) and float(dice) == pytest.approx(row["val_dice"], abs=5e-5)
        assert float(seconds) == pytest.approx(row["epoch_seconds"], abs=0.051)
        dice_so_far.append(row["val_dice"])
        assert 1 <= int(best_epoch) <= int(number)
        assert float(best) == pytest.approx(dice_so_far[int(best_epoch) - 1], abs=5e-5)
        assert float(best) >= max(dice_so_far) - CONFIG.min_delta - 5e-5
    assert max(dice_so_far) > 0, "a run whose Dice never moves would not test the best-so-far column"
    assert lines[-1].endswith(f"best {result.best_val_dice:.4f} (epoch {result.best_epoch + 1})")


NOTEBOOK_CELL = """\
import torch
torch.set_num_threads(1)
from covidseg.config import get_preset
from covidseg.training import fit
config = get_preset("quick").replace(model="unet", image_size=16, unet_width=4, batch_size=16, slices_per_epoch=64, max_epochs={epochs})
result = fit(config, {run!r}, data_dir={data!r}, progress=True)
"""


def _executed_outputs(data: Path, run: Path, epochs: int) -> list[dict]:
    """The outputs of one cell calling ``fit(progress=True)``, executed by nbclient as the book's
    executor (jupyter-book, myst-nb) runs it: a kernel with ipywidgets, no front end."""
    cell = nbformat.v4.new_code_cell(NOTEBOOK_CELL.format(epochs=epochs, run=str(run), data=str(data)))
    notebook = nbformat.v4.new_notebook(cells=[cell])
    NotebookClient(notebook, kernel_name="python3", timeout=600).execute()
    return notebook.cells[0].outputs


def test_an_executed_notebook_keeps_one_bar_and_one_text_output_whatever_the_epochs(tiny50, tmp_path):
    epochs = 5
    outputs = _executed_outputs(tiny50, tmp_path / "run", epochs)
    kinds = [sorted(output.get("data", {})) or [output.output_type] for output in outputs]
    widgets = [output for output in outputs if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    texts = [output for output in outputs if output.output_type == "stream" or list(output.get("data", {})) == ["text/plain"]]
    # two bars of decoding (train, validation), the training bar, and the lines: not one output per epoch
    assert len(outputs) <= 4 and len(widgets) <= 3, kinds
    assert len(texts) == 1, kinds
    text = texts[0].text if texts[0].output_type == "stream" else texts[0].data["text/plain"]
    lines = text.splitlines()
    assert lines[0].startswith("estimate: ") and f"for {epochs} epochs" in lines[0]
    assert [line.split("  ")[0] for line in lines[1:]] == [f"epoch {k}/{epochs}" for k in range(1, epochs + 1)]
    assert all(output.output_type != "error" for output in outputs)
    assert len(text) < 200 * (epochs + 1), "one line per epoch, not a bar redrawn at each step"
