import pytest

from covidseg.config import PRESETS, TrainConfig, get_preset, preset_from_env


def test_thesis_preset_has_the_thesis_hyperparameters():
    thesis = get_preset("thesis")
    assert (thesis.lr, thesis.loss, thesis.patience, thesis.image_size, thesis.max_epochs) == (1e-4, "dice", 5, 512, 100)
    assert thesis.encoder_weights == "imagenet"
    quick = get_preset("quick")
    assert quick.image_size < thesis.image_size and quick.max_epochs < thesis.max_epochs and quick.unet_width < 64
    assert quick.encoder_weights is None, "quick runs offline (CI), so encoders start from random weights"
    assert thesis.slices_per_epoch is None and quick.slices_per_epoch < 1428


def test_config_is_frozen_and_round_trips():
    config = PRESETS["quick"].replace(model="unet-resnet34", encoder_weights=None)
    with pytest.raises(Exception):
        config.lr = 1.0
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_and_mistyped_fields():
    with pytest.raises(ValueError, match="unknown config fields: evil"):
        TrainConfig.from_dict({"evil": "__import__('os')"})
    with pytest.raises(ValueError, match="lr '1e-4' has the wrong type: expected float"):
        TrainConfig.from_dict({"lr": "1e-4"})
    with pytest.raises(ValueError, match="amp 'yes' has the wrong type: expected bool"):
        TrainConfig.from_dict({"amp": "yes"})


def test_differences_ignore_epochs():
    a = get_preset("quick")
    assert a.differences(a.replace(max_epochs=99)) == []
    assert a.differences(a.replace(lr=0.5, model="unet-vgg19")) == ["model", "lr"]


def test_unknown_preset_and_env(monkeypatch):
    with pytest.raises(ValueError, match="valid presets: thesis, quick"):
        get_preset("fast")
    monkeypatch.setenv("COVIDSEG_QUICK", "1")
    assert preset_from_env() == "quick"
    monkeypatch.setenv("COVIDSEG_QUICK", "0")
    assert preset_from_env() == "thesis"
