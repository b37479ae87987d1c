"""Training survives interruption: SIGKILL, Ctrl-C, and a kill while a checkpoint is written.

A Colab session that is killed must cost at most the epoch that was running: ``--resume``
continues from the last completed epoch and, on the CPU, gives exactly the history of a run that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import covidseg.training as training
from covidseg.checkpoint import load_checkpoint
from covidseg.cli import EXIT_INTERRUPTED, main

from conftest import REPO, RESUME_CONFIG, TINY_TRAIN_FLAGS, comparable

EPOCHS = RESUME_CONFIG.max_epochs
FLAGS = (*TINY_TRAIN_FLAGS, "--lr", "0.01")
POLL_SECONDS = 0.01
START_TIMEOUT_S = 240  # a cold start on a busy machine: importing torch and decoding the data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler, even where the test runner was started with SIGINT ignored.

    A handled signal is reset to its default in a child process, where Python installs its own
    handler; an ignored one would stay ignored there too.
    """
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def data(tiny50) -> Path:
    return tiny50


def read_history(run: Path) -> list[dict]:
    path = run / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def train_args(data: Path, run: Path, *extra) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), *FLAGS, "--epochs", str(EPOCHS), *extra]


def start_training(data: Path, run: Path, logs: Path) -> subprocess.Popen:
    """``python -m covidseg train`` in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(logs / "stdout.txt", "w") as stdout, open(logs / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "covidseg", *train_args(data, run)], env=env, stdout=stdout, stderr=stderr)


def wait_for_epochs(process: subprocess.Popen, run: Path, count: int, logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(read_history(run)) < count:
        if process.poll() is not None:
            pytest.fail(f"training ended early (exit {process.returncode}): {(logs / 'stderr.txt').read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {count} epochs after {START_TIMEOUT_S} s")
        time.sleep(POLL_SECONDS)


def test_sigkill_mid_epoch_resumes_exactly(data, uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    process = start_training(data, run, tmp_path)
    wait_for_epochs(process, run, 2, tmp_path)
    os.kill(process.pid, signal.SIGKILL)  # the next epoch is running
    assert process.wait(timeout=60) == -signal.SIGKILL

    saved = load_checkpoint(run / "last.pt")  # intact, whatever the moment of the kill
    before = read_history(run)
    assert saved["epoch"] >= 1 and len(saved["history"]) == saved["epoch"] + 1
    assert comparable(before) == comparable(saved["history"])[: len(before)]

    assert main(train_args(data, run, "--resume")) == 0
    after = read_history(run)
    assert comparable(after) == uninterrupted, "the resumed run must continue exactly as an uninterrupted one"
    assert after[: saved["epoch"] + 1] == saved["history"], "completed epochs are kept, not trained again"


def test_ctrl_c_saves_and_exits_cleanly(data, tmp_path, python_sigint):
    run = tmp_path / "run"
    process = start_training(data, run, tmp_path)
    wait_for_epochs(process, run, 1, tmp_path)
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == EXIT_INTERRUPTED
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    saved = load_checkpoint(run / "last.pt")
    assert len(read_history(run)) == saved["epoch"] + 1
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("covidseg: training interrupted during epoch")
    assert f"{run / 'last.pt'} holds epoch {saved['epoch'] + 1}" in message
    assert message.endswith(f": covidseg {' '.join(train_args(data, run))} --resume")


def test_ctrl_c_mid_epoch_writes_nothing_of_that_epoch(data, uninterrupted, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = training.validation_dice
    calls = []

    def interrupted_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 has trained: its weights have moved, but it is not complete
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "validation_dice", interrupted_in_second_epoch)
    assert main(train_args(data, run)) == EXIT_INTERRUPTED
    monkeypatch.undo()
    message = capsys.readouterr().err.strip()
    assert message == (
        f"covidseg: training interrupted during epoch 2; {run / 'last.pt'} holds epoch 1; "
        f"resume to continue from there: covidseg {' '.join(train_args(data, run))} --resume"
    )
    assert load_checkpoint(run / "last.pt")["epoch"] == 0 and len(read_history(run)) == 1
    assert main(train_args(data, run, "--resume")) == 0
    assert comparable(read_history(run)) == uninterrupted


def test_ctrl_c_while_saving_waits_for_the_complete_checkpoint(data, tmp_path, capsys, monkeypatch, python_sigint):
    run = tmp_path / "run"
    real = training.save_checkpoint

    def save_during_ctrl_c(state, path):
        if state["epoch"] == 1 and Path(path).name == "last.pt":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives just as last.pt is being written
        return real(state, path)

    monkeypatch.setattr(training, "save_checkpoint", save_during_ctrl_c)
    assert main(train_args(data, run)) == EXIT_INTERRUPTED
    assert "holds epoch 2;" in capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1, "the epoch that was being saved is complete on disk"
    assert len(read_history(run)) == 2


class _Killed(BaseException):
    """The process dies here (a BaseException: nothing in covidseg handles it)."""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell files apart")
def test_kill_while_writing_a_checkpoint_never_corrupts_last_pt(data, uninterrupted, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(train_args(data, run)[:-2] + ["--epochs", "1"]) == 0
    before = (run / "last.pt").read_bytes()

    from covidseg import files

    class HalfThenDie:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(bytes(data)[: len(data) // 2])
            self.handle.flush()
            raise _Killed

    def half_open(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return HalfThenDie(handle) if Path(file).name.startswith(".last.pt.") else handle

    monkeypatch.setattr(files, "open", half_open, raising=False)  # the open() that atomic_write calls
    with pytest.raises(_Killed):
        main(train_args(data, run, "--resume"))
    monkeypatch.undo()
    assert (run / "last.pt").read_bytes() == before
    assert load_checkpoint(run / "last.pt")["epoch"] == 0

    # A real SIGKILL would also have left the half-written temporary file behind.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / f".last.pt.{dead.pid}.0badc0de.tmp"
    stale.write_bytes(before[: len(before) // 2])
    assert main(train_args(data, run, "--resume")) == 0
    assert not stale.exists(), "a resumed run removes what a killed one left half written"
    assert comparable(read_history(run)) == uninterrupted



def test_kill_between_last_pt_and_best_pt_loses_no_best_model(data, tmp_path, monkeypatch):
    """``last.pt`` is written before ``best.pt``; a resume rebuilds a ``best.pt`` the kill cut off."""
    run = tmp_path / "run"
    real = training.save_checkpoint

    def die_before_best(state, path):
        if Path(path).name == "best.pt" and state["epoch"] >= 1:
            raise _Killed
        return real(state, path)

    monkeypatch.setattr(training, "save_checkpoint", die_before_best)
    with pytest.raises(_Killed):
        main(train_args(data, run))
    monkeypatch.undo()
    last = load_checkpoint(run / "last.pt")
    assert last["early_stopping"]["best_epoch"] == last["epoch"] > load_checkpoint(run / "best.pt")["epoch"]

    epochs_done = str(last["epoch"] + 1)  # resume without training any further epoch
    assert main(train_args(data, run)[:-2] + ["--epochs", epochs_done, "--resume"]) == 0
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == last["epoch"]
    assert all(torch.equal(best["model"][name], value) for name, value in last["model"].items())
