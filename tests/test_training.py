import json

import pytest

from covidseg.errors import RunFolderError, RunMismatchError
from covidseg.training import EarlyStopping, fit

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert stopper.update(0.5, 0) and not stopper.should_stop
    assert not stopper.update(0.505, 1)  # below min_delta
    assert stopper.update(0.6, 2) and stopper.bad_epochs == 0
    assert not stopper.update(0.1, 3) and not stopper.update(0.2, 4)
    assert stopper.should_stop and (stopper.best_epoch, stopper.best_score) == (2, 0.6)
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop


def test_fit_writes_a_complete_run(tiny50, tmp_path):
    result = fit(tiny_config(max_epochs=3), tmp_path / "run", data_dir=tiny50, progress=False)
    run = tmp_path / "run"
    assert {"config.json", "last.pt", "best.pt", "history.csv", "history.json"} <= {p.name for p in run.iterdir()}
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert set(result.history[0]) == {"epoch", "train_loss", "val_dice", "epoch_seconds", "lr"}
    assert json.loads((run / "config.json").read_text())["unet_width"] == 4
    assert result.best_val_dice == max(row["val_dice"] for row in result.history)
    assert result.card.epochs == 3 and result.card.image_size == 16
    assert (run / "history.csv").read_text().splitlines()[0] == "epoch,train_loss,val_dice,epoch_seconds,lr"


def test_early_stopping_ends_a_run_that_does_not_improve(tiny50, tmp_path):
    """With a zero learning rate nothing changes, so the second epoch is no improvement."""
    result = fit(tiny_config(lr=0.0, patience=1, max_epochs=10), tmp_path / "run", data_dir=tiny50, progress=False)
    assert len(result.history) == 2 and result.stopped_early and result.best_epoch == 0


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny50, tmp_path):
    full = fit(tiny_config(max_epochs=4), tmp_path / "full", data_dir=tiny50, progress=False)
    fit(tiny_config(max_epochs=2), tmp_path / "split", data_dir=tiny50, progress=False)
    resumed = fit(tiny_config(max_epochs=4), tmp_path / "split", data_dir=tiny50, resume=True, progress=False)
    strip = lambda history: [(r["epoch"], r["train_loss"], r["val_dice"]) for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_existing_run_is_not_overwritten_and_config_must_match(tiny50, tmp_path):
    fit(tiny_config(max_epochs=1), tmp_path / "run", data_dir=tiny50, progress=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        fit(tiny_config(max_epochs=1), tmp_path / "run", data_dir=tiny50, progress=False)
    with pytest.raises(RunMismatchError, match="another config: lr"):
        fit(tiny_config(max_epochs=2, lr=0.5), tmp_path / "run", data_dir=tiny50, resume=True, progress=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_a_finished_run_is_reused_only_with_the_same_config_and_code(tiny50, tmp_path, monkeypatch, capsys):
    from covidseg import notebook, runs

    config, run = tiny_config(max_epochs=1), tmp_path / "run"
    notebook.train_or_reuse(config, tiny50, run, progress=False)
    trained = (run / "best.pt").read_bytes()

    _, history = notebook.train_or_reuse(config, tiny50, run, progress=True)
    assert "reusing the finished run" in capsys.readouterr().out and len(history) == 1
    assert (run / "best.pt").read_bytes() == trained

    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    monkeypatch.setattr(runs, "code_fingerprint", lambda: "other code")
    beside, history = notebook.train_or_reuse(config.replace(max_epochs=2), tiny50, run, progress=False)
    out = capsys.readouterr().out
    assert f"the run in {run} is kept as it is (it was trained with another config and other code)" in out
    assert beside.parent == run.parent and beside.name.startswith("run-") and str(beside) in out
    assert len(history) == 2 and json.loads((beside / "finished.json").read_text())["code"] == "other code"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # the finished run is never touched
    again, history = notebook.train_or_reuse(config.replace(max_epochs=2), tiny50, run, progress=True)
    assert again == beside and len(history) == 2 and f"reusing the finished run in {beside}" in capsys.readouterr().out
    # Asked to, it reuses a run of the same config and data that other code trained, and says so.
    monkeypatch.setattr(runs, "code_fingerprint", lambda: "newer code")
    again, _ = notebook.train_or_reuse(config, tiny50, run, progress=True, reuse_other_code=True)
    assert again == run and "trained by other code, reused as asked" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_the_code_fingerprint_follows_the_package_sources(tmp_path, monkeypatch):
    from covidseg import runs

    assert runs.code_fingerprint() == runs.code_fingerprint()
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(runs, "__file__", str(tmp_path / "runs.py"))
    before = runs.code_fingerprint()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert runs.code_fingerprint() != before


def test_scores_are_reused_until_the_checkpoint_changes(tiny50, tmp_path, monkeypatch):
    from covidseg import evaluation, notebook

    run = tmp_path / "run"
    notebook.train_or_reuse(tiny_config(max_epochs=1), tiny50, run, progress=False)
    calls = []
    real = evaluation.evaluate_run
    monkeypatch.setattr(evaluation, "evaluate_run", lambda *a, **k: calls.append(a) or real(*a, **k))

    first = notebook.evaluate_or_reuse(run, tiny50)
    again = notebook.evaluate_or_reuse(run, tiny50)
    assert len(calls) == 1 and again == first and (run / "test-scores.json").is_file()
    assert first["mean_dice"] == real(run, tiny50, progress=False)["mean_dice"]

    (run / "best.pt").write_bytes((run / "best.pt").read_bytes())  # a new checkpoint: scored again
    notebook.evaluate_or_reuse(run, tiny50)
    (run / "test-scores.json").write_text("{not json")  # a damaged file is replaced, not trusted
    notebook.evaluate_or_reuse(run, tiny50)
    assert len(calls) == 3 and json.loads((run / "test-scores.json").read_text())["report"]["part"] == "test"
