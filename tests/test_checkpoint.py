import os
import pickle

import pytest
import torch

from covidseg.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from covidseg.config import get_preset
from covidseg.errors import CheckpointError


def _state(config=None):
    config = config or get_preset("quick")
    return {
        "model_name": config.model,
        "config": config.to_dict(),
        "model": {"weight": torch.arange(6.0).reshape(2, 3)},
        "epoch": 3,
        "history": [{"epoch": 0, "val_dice": 0.5}],
    }


def test_round_trip(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    state = load_checkpoint(path, model_name="unet", config=get_preset("quick").replace(max_epochs=50))
    assert state["format"] == CHECKPOINT_FORMAT and state["epoch"] == 3
    assert state["config"] == get_preset("quick")
    torch.testing.assert_close(state["model"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file is left behind"


def test_other_model_or_config_is_refused(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt: checkpoint is for model 'unet', not 'unet-vgg19'"):
        load_checkpoint(path, model_name="unet-vgg19")
    with pytest.raises(CheckpointError, match="c.pt: checkpoint was made with another config: lr=0.001"):
        load_checkpoint(path, config=get_preset("quick").replace(lr=0.5))


def test_truncated_and_foreign_files(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "c.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a covidseg checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="absent.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


class _Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = _state()
    state["payload"] = _Exploit()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp_path / "evil.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="evil.pt: refused: not a plain-weights checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned.txt").exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    newer = _state()
    newer["epoch"] = 4
    with pytest.raises(CheckpointError, match="last.pt: could not be written \\(No space left on device\\)"):
        save_checkpoint(newer, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_read_only_folder(tmp_path, monkeypatch):
    """A folder the user cannot write to (simulated: tests may run as root, who can write anywhere)."""
    from covidseg import files

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "temporary_name", denied)
    with pytest.raises(CheckpointError, match="last.pt: could not be written \\(Permission denied\\)"):
        save_checkpoint(_state(), tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists()
