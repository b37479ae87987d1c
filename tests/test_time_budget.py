"""``time_budget``: a call of ``fit`` (``covidseg train --time-budget MINUTES``) ends cleanly between
epochs before the budget is spent, and ``--resume`` continues as if it had never stopped.

The clock of :mod:`covidseg.training` is replaced by one that advances only where these tests say
(one minute per epoch, in validation), so the epoch at which a budget stops a run is exact.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import covidseg.training as training
from covidseg.checkpoint import load_checkpoint
from covidseg.cli import EXIT_ERROR, main
from covidseg.config import ConfigError
from covidseg.training import fit

from conftest import REPO, RESUME_CONFIG, TINY_TRAIN_FLAGS, FakeClock, comparable

CONFIG = RESUME_CONFIG
EPOCHS = CONFIG.max_epochs
EPOCH_SECONDS = 60.0
"""What each epoch costs on the fake clock (added when the epoch's validation runs)."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """``training``'s clock, advancing :data:`EPOCH_SECONDS` in each epoch's validation."""
    fake = FakeClock()
    real = training.validation_dice

    def validation_taking_a_minute(*args, **kwargs):
        fake.now += EPOCH_SECONDS
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_clock", fake)
    monkeypatch.setattr(training, "validation_dice", validation_taking_a_minute)
    return fake


@pytest.mark.parametrize(
    ("minutes", "epochs"),
    [
        (3.5, 3),  # after epoch 3: 3 min spent + 1 min for the next > 3.5: stop
        (4.0, 4),  # after epoch 3: 3 + 1 = 4, not more than 4: go on; after epoch 4: 5 > 4: stop
        (0.5, 1),  # less than one epoch: one epoch is trained all the same
    ],
)
def test_the_budget_stops_after_the_epoch_whose_successor_would_pass_it(tiny50, clock, tmp_path, minutes, epochs):
    run = tmp_path / "run"
    result = fit(CONFIG.replace(time_budget=minutes), run, data_dir=tiny50, progress=False)
    assert result.stopped_by_budget and not result.stopped_early
    assert [row["epoch"] for row in result.history] == list(range(epochs))
    saved = load_checkpoint(run / "last.pt")  # complete and loadable
    assert saved["epoch"] == epochs - 1 and saved["history"] == result.history
    assert json.loads((run / "history.json").read_text()) == result.history
    assert load_checkpoint(run / "best.pt")["epoch"] == result.best_epoch


def test_a_budget_reached_at_the_epoch_cap_is_not_a_budget_stop(tiny50, clock, tmp_path):
    result = fit(CONFIG.replace(max_epochs=3, time_budget=3.5), tmp_path / "run", data_dir=tiny50, progress=False)
    assert len(result.history) == 3 and not result.stopped_by_budget


def test_resuming_with_another_budget_or_none_continues_exactly(tiny50, clock, uninterrupted, tmp_path):
    run = tmp_path / "run"
    first = fit(CONFIG.replace(time_budget=3.5), run, data_dir=tiny50, progress=False)
    assert first.stopped_by_budget and len(first.history) == 3
    second = fit(CONFIG.replace(time_budget=1.5), run, data_dir=tiny50, resume=True, progress=False)  # 1 + 1 > 1.5 after one
    assert second.stopped_by_budget and len(second.history) == 4
    last = fit(CONFIG, run, data_dir=tiny50, resume=True, progress=False)  # no budget: to the epoch cap
    assert not last.stopped_by_budget
    assert comparable(last.history) == uninterrupted, "a run stopped by its budget and resumed equals an uninterrupted one"
    assert last.history[:4] == second.history, "the epochs of the earlier calls are kept, not trained again"


def test_the_budget_is_checked_like_every_config_value(capsys):
    for bad, problem in ((0.0, "must be more than 0"), (-5.0, "must be more than 0"), (float("inf"), "must be a finite number")):
        with pytest.raises(ConfigError, match=problem):
            CONFIG.replace(time_budget=bad)
    assert CONFIG.replace(time_budget=1).time_budget == 1  # whole minutes are fine
    assert CONFIG.replace(time_budget=90.0, fast_gpu=False).differences(CONFIG) == [], "a run may be resumed with another budget"
    assert main(["train", "--out", "unused", *TINY_TRAIN_FLAGS, "--time-budget", "0"]) == EXIT_ERROR
    assert capsys.readouterr().err.strip() == (
        "covidseg: error: train: argument --time-budget: must be more than 0, got 0 (see 'covidseg train --help')")


def _covidseg(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m covidseg ARGS``, as a user runs it, one CPU thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "covidseg", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _printed_resume_command(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("stopped for the time budget after epoch")]
    assert len(lines) == 1, stdout
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[:2] == ["covidseg", "train"] and command[-1] == "--resume"
    return command


def test_the_command_line_prints_a_resume_command_that_works(tiny50, uninterrupted, tmp_path):
    run = tmp_path / "run"
    typed = ["train", "--data", str(tiny50), "--out", str(run), *TINY_TRAIN_FLAGS, "--lr", "0.01", "--epochs", str(EPOCHS),
             "--time-budget", "0.0001"]  # 6 ms: less than any epoch, so each call trains exactly one
    first = _covidseg(typed, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "(time budget)" in first.stdout
    command = _printed_resume_command(first.stdout)
    assert command[1:] == [*typed, "--resume"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 0

    second = _covidseg(command[1:], tmp_path)  # the printed command, as typed
    assert second.returncode == 0, second.stderr
    assert _printed_resume_command(second.stdout) == command, "a resumed call prints the same command, without a second --resume"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    without_budget = [arg for arg in command[1:] if arg not in ("--time-budget", "0.0001")]
    assert main(without_budget) == 0
    assert comparable(json.loads((run / "history.json").read_text())) == uninterrupted


def test_a_chapter_run_stopped_by_its_budget_is_resumed_by_the_next_call_then_reused(tiny50, clock, uninterrupted, tmp_path):
    from covidseg import notebook

    run = tmp_path / "run"
    first_dir, first = notebook.train_or_reuse(CONFIG.replace(time_budget=3.5), tiny50, run, progress=False)
    assert first_dir == run and len(first) == 3
    assert not (run / "finished.json").exists(), "a run stopped by its budget is not finished"
    again_dir, again = notebook.train_or_reuse(CONFIG, tiny50, run, progress=False)  # the cell run again, no budget
    assert again_dir == run and comparable(again) == uninterrupted
    assert (run / "finished.json").is_file()
    # How fast or for how long a call trains is not part of the run's identity: the finished run is
    # reused, not retrained beside it.
    fingerprint = (run / "last.pt").stat().st_mtime_ns
    reused_dir, reused = notebook.train_or_reuse(CONFIG.replace(time_budget=1.0, fast_gpu=False), tiny50, run, progress=False)
    assert reused_dir == run and comparable(reused) == uninterrupted
    assert (run / "last.pt").stat().st_mtime_ns == fingerprint
