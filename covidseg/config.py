"""The one configuration object behind training, the CLI, the book and the checkpoints.

:class:`TrainConfig` is a frozen dataclass (as nanoGPT's ``GPTConfig``): the CLI flags, the book's
parameters cell and every checkpoint read and write the same fields. Two named presets exist:

- ``thesis``: the thesis' protocol at full size (512 px, Adam 1e-4, Dice loss, early stopping with
  patience 5, up to 100 epochs), for a GPU and the real data;
- ``quick``: small images, a narrow from-scratch U-Net and a few epochs, for CPUs and CI.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "PRESETS", "get_preset", "QUICK_ENV", "preset_from_env"]

QUICK_ENV = "COVIDSEG_QUICK"
"""Environment variable that selects the quick preset (``COVIDSEG_QUICK=1``), as CI sets it."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes are documented inline; ``encoder_weights`` is ``'imagenet'``, ``None`` (random
    initialisation) or a path to local encoder weights.
    """

    model: str = "unet"  # one of covidseg.models.MODEL_NAMES
    encoder_weights: str | None = "imagenet"  # ImageNet weights for smp encoders (ignored by 'unet')
    unet_width: int = 64  # channels of the from-scratch U-Net's first level (thesis: 64)
    image_size: int = 512  # slices are resized to image_size x image_size (MosMedData: 512)
    split: str = "thesis"  # 'thesis' (35/5/10 studies) or 'miniseg-fold-K'
    loss: str = "dice"  # 'dice' (thesis) or 'bce-dice'
    lr: float = 1e-4  # Adam learning rate (thesis)
    batch_size: int = 8  # slices per optimisation step
    max_epochs: int = 100  # upper bound; early stopping usually ends sooner
    slices_per_epoch: int | None = None  # None: every training slice each epoch (thesis); else a seeded random subset
    patience: int = 5  # epochs without validation improvement before stopping (thesis)
    min_delta: float = 1e-4  # smallest validation Dice gain that counts as improvement
    seed: int = 0  # seeds initialisation and the order of training slices
    device: str = "auto"  # 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'mps'
    amp: bool = True  # mixed precision, used on CUDA only
    preset: str = field(default="custom", compare=False)  # name of the preset this came from

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain ``dict`` of the fields (strings, numbers, booleans and ``None`` only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict` output, checking names and types.

        Raises:
            ValueError: On an unknown field or a value of the wrong type.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        for name, value in values.items():
            expected = _NULLABLE.get(name) or type(getattr(cls, name))
            ok = value is None if name in _NULLABLE and value is None else isinstance(value, expected)
            if expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif expected is int:
                ok = ok and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"config field {name!r} has a value of the wrong type: {value!r}")
        return cls(**values)

    def differences(self, other: TrainConfig, ignore=("max_epochs", "device", "preset")) -> list[str]:
        """Names of the fields that differ from ``other``, except those in ``ignore``."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]


_NULLABLE = {"encoder_weights": str, "slices_per_epoch": int}
"""Fields that may be ``None``, with the type of their other values."""

PRESETS = {
    "thesis": TrainConfig(preset="thesis"),
    "quick": TrainConfig(
        encoder_weights=None,
        unet_width=16,
        image_size=128,
        batch_size=8,
        max_epochs=3,
        slices_per_epoch=320,
        patience=5,
        lr=1e-3,
        preset="quick",
    ),
}
"""Named presets. ``quick`` starts smp encoders from random weights (it must run offline, in CI) and uses a
higher learning rate, so that a few CPU epochs show learning. Three epochs of 320 slices (120 steps) are
where the ResNet34 and MobileNetV2 U-Nets reached their best validation Dice when they were given four,
and the VGG19 U-Net's rose from 0 to 0.34; each epoch of VGG19 costs about 3 minutes on 2 cores."""


def get_preset(name: str) -> TrainConfig:
    """Return a named preset.

    Raises:
        ValueError: For an unknown name, listing the valid ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def preset_from_env(default: str = "thesis") -> str:
    """``'quick'`` when :data:`QUICK_ENV` is set to a true value, else ``default``."""
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    return "quick" if value in {"1", "true", "yes", "on"} else default
