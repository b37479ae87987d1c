"""The one configuration object behind training, the CLI, the book and the checkpoints.

:class:`TrainConfig` is a frozen dataclass (as nanoGPT's ``GPTConfig``): the CLI flags, the book's
parameters cell and every checkpoint read and write the same fields. Each field carries its help
text and its valid values in ``dataclasses.field(metadata=...)`` (as Hugging Face's
``HfArgumentParser`` reads them), so ``covidseg train`` builds one flag per field and every value,
from a flag, a checkpoint or code, is checked in one place (:meth:`TrainConfig.__post_init__`).

This module imports nothing heavy (no torch), so that the CLI can list names and check flags at
once. Two named presets exist:

- ``thesis``: the thesis' protocol at full size (512 px, Adam 1e-4, Dice loss, early stopping with
  patience 5, up to 100 epochs), for a GPU and the real data;
- ``quick``: small images, a narrow from-scratch U-Net and a few epochs, for CPUs and CI.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .devices import DEVICE_FORMS, check_device_name
from .splits import SPLIT_NAMES

__all__ = [
    "TrainConfig",
    "ConfigError",
    "PRESETS",
    "get_preset",
    "QUICK_ENV",
    "preset_from_env",
    "MODEL_NAMES",
    "LOSS_NAMES",
    "LUNG_METHOD_NAMES",
    "MODEL_SIZE_MULTIPLE",
    "SEED_RANGE",
    "RESUMABLE_CHANGES",
    "EXECUTION_SETTINGS",
]

MODEL_NAMES = ("unet", "unet-vgg19", "unet-resnet34", "unet-mobilenetv2")
"""Names accepted by :func:`covidseg.models.build_model`."""

LOSS_NAMES = ("dice", "bce-dice")
"""Names accepted by :func:`covidseg.losses.build_loss`."""

LUNG_METHOD_NAMES = ("classical", "lungmask")
"""Lung segmentation methods of :mod:`covidseg.lungs` (``--lungs``)."""

MODEL_SIZE_MULTIPLE = {"unet": 16}
"""In-plane sizes must be a multiple of this (the U-Net's 4 poolings); smp's encoders (5 stages) need 32."""

SEED_RANGE = (0, 2**32 - 1)
"""Valid seeds: what NumPy accepts, and small enough that ``seed * 1_000_003 + epoch`` fits torch's
64-bit generator seed."""

QUICK_ENV = "COVIDSEG_QUICK"
"""Environment variable that selects the quick preset (``COVIDSEG_QUICK=1``), as CI sets it."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class ConfigError(ValueError):
    """A config value out of its range or of the wrong type.

    Attributes:
        name: The field.
        value: The value given.
        problem: What is wrong, e.g. ``'must be between 1 and 256'``.
    """

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(self.describe(name))

    def describe(self, label: str) -> str:
        """The message with the field called ``label`` (e.g. a flag, ``'--image-size'``)."""
        return f"{label} {self.value!r} {self.problem}"


def _help(text: str, **checks) -> dict:
    return {"help": text, **checks}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Each field's ``metadata`` holds its ``help`` and its valid values: ``choices``, or ``min`` and
    ``max`` (inclusive) or ``above`` (exclusive); ``none`` names the word that stands for ``None``
    on the command line. ``encoder_weights`` is ``'imagenet'``, ``None`` (random initialisation) or
    a path to local encoder weights.

    Two fields say how a run is executed, not what it learns, so a run may be resumed with
    other values (:data:`RESUMABLE_CHANGES`): ``fast_gpu`` (the tuned CUDA path of
    :func:`covidseg.training.plan_training`; off, CUDA training uses float16 autocast with loss
    scaling and nothing else) and ``time_budget`` (minutes; ``None``: no budget).
    The budget counts from the start of :func:`covidseg.training.fit`, data loading included.
    After each epoch, with ``elapsed`` the minutes since then and ``last`` that epoch's minutes,
    training stops if ``elapsed + last > time_budget``: a next epoch as long as the last one would
    end past the budget. It never stops inside an epoch, so at least one epoch is trained and
    ``last.pt`` always holds the last epoch trained.
    """

    model: str = field(default="unet", metadata=_help("the network", choices=MODEL_NAMES))
    encoder_weights: str | None = field(
        default="imagenet",
        metadata=_help("encoder initialisation of the smp models: imagenet, none (random) or the path of local weights; ignored by 'unet'",
                       none="none", metavar="imagenet|none|PATH"),
    )
    unet_width: int = field(default=64, metadata=_help("channels of the first level of 'unet'", min=1, max=256))
    image_size: int = field(default=512, metadata=_help("in-plane size, in pixels, slices are resized to", min=16, max=2048))
    split: str = field(default="thesis", metadata=_help("the split of the 50 annotated studies into train/val/test", choices=SPLIT_NAMES))
    loss: str = field(default="dice", metadata=_help("the training loss", choices=LOSS_NAMES))
    lr: float = field(default=1e-4, metadata=_help("Adam learning rate (0 leaves the weights as they are)", min=0.0))
    batch_size: int = field(default=8, metadata=_help("slices per optimisation step", min=1, max=4096))
    max_epochs: int = field(default=100, metadata=_help("maximum epochs; early stopping usually ends sooner", min=1, max=100_000))
    slices_per_epoch: int | None = field(
        default=None,
        metadata=_help("training slices drawn per epoch: all (the thesis), or a seeded random subset of N", min=1, none="all", metavar="N|all"),
    )
    patience: int = field(default=5, metadata=_help("epochs without validation improvement before stopping", min=1, max=100_000))
    min_delta: float = field(default=1e-4, metadata=_help("smallest validation Dice gain that counts as an improvement", min=0.0, max=1.0))
    seed: int = field(default=0, metadata=_help("seeds initialisation and the order of training slices", min=SEED_RANGE[0], max=SEED_RANGE[1]))
    device: str = field(default="auto", metadata=_help(f"where to run: {DEVICE_FORMS}", metavar="DEVICE"))
    amp: bool = field(default=True, metadata=_help("mixed precision (used on CUDA only)"))
    fast_gpu: bool = field(
        default=True,
        metadata=_help("on CUDA: channels-last layout, cuDNN autotuning, bfloat16 autocast where the GPU has it natively "
                       "(else float16 with loss scaling), fused Adam, batches loaded by worker processes and validation "
                       "in 4x larger batches; no effect on the CPU or MPS"),
    )
    time_budget: float | None = field(
        default=None,
        metadata=_help("minutes for this call: after each epoch, training stops if the minutes since the call began (data "
                       "loading included) plus that epoch's minutes exceed MINUTES, as the next epoch would likely end past "
                       "them; at least one epoch is trained, last.pt holds the last one and --resume continues; none: no budget",
                       above=0.0, none="none", metavar="MINUTES"),
    )
    preset: str = field(default="custom", compare=False, metadata=_help("name of the preset this came from"))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        multiple = MODEL_SIZE_MULTIPLE.get(self.model, 32)
        if self.image_size % multiple:
            raise ConfigError("image_size", self.image_size, f"must be a multiple of {multiple} for model {self.model!r}")

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``).

        Raises:
            ConfigError: If a value is invalid.
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain ``dict`` of the fields (strings, numbers, booleans and ``None`` only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict` output, checking names, types and ranges.

        Raises:
            ValueError: On an unknown field; :class:`ConfigError` (a ``ValueError``) on a value
                of the wrong type or out of range.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**values)

    def identity(self) -> dict:
        """:meth:`to_dict` without :data:`EXECUTION_SETTINGS`: what identifies the trained run."""
        return {name: value for name, value in self.to_dict().items() if name not in EXECUTION_SETTINGS}

    def differences(self, other: TrainConfig, ignore=None) -> list[str]:
        """Names of the fields that differ from ``other``, except those in ``ignore`` (default
        :data:`RESUMABLE_CHANGES`: the fields a resumed run may change)."""
        ignore = RESUMABLE_CHANGES if ignore is None else ignore
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


EXECUTION_SETTINGS = ("fast_gpu", "time_budget")
"""Fields that say how fast and for how long one call trains, not what the run learns: left out of
a run's identity (:meth:`TrainConfig.identity`), so a finished run is reused whatever they were."""

RESUMABLE_CHANGES = ("max_epochs", "device", "preset", *EXECUTION_SETTINGS)
"""Fields a run may be resumed with other values of: how long, where and how fast it trains, not
what it trains (checked by :meth:`TrainConfig.differences` against a checkpoint's config)."""

_NULLABLE = {"encoder_weights": str, "slices_per_epoch": int, "time_budget": float}
"""Fields that may be ``None``, with the type of their other values."""


def field_type(name: str) -> type:
    """The type of a field's values other than ``None``: ``str``, ``int``, ``float`` or ``bool``."""
    return _NULLABLE.get(name) or type(_FIELDS[name].default)


def check_value(name: str, value):
    """Check one field's value against its type and its ``metadata``; return it.

    Raises:
        ConfigError: If it is of the wrong type or out of range.
    """
    f = _FIELDS[name]
    meta = f.metadata
    if value is None:
        if "none" in meta:
            return value
        raise ConfigError(name, value, "must not be None")
    kind = field_type(name)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(name, value, f"has the wrong type: expected {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(name, value, "must be a finite number")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(name, value, f"is not one of {', '.join(meta['choices'])}")
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(name, value, _range(low, high))
    if "above" in meta and value <= meta["above"]:
        raise ConfigError(name, value, f"must be more than {meta['above']:g}")
    if name == "device":
        problem = check_device_name(value)
        if problem:
            raise ConfigError(name, value, problem)
    if kind is str and not value.strip():
        raise ConfigError(name, value, "must not be empty")
    return value


def _range(low, high) -> str:
    return f"must be at least {low}" if high is None else f"must be between {low} and {high}"


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
    """``'quick'`` when :data:`QUICK_ENV` is set to a true value (1, true, yes, on), else ``default``.

    Raises:
        ValueError: If the variable holds anything else than a true or false value (0, false,
            no, off, empty), naming the variable, its value and the values allowed.
    """
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(
            f"{QUICK_ENV}={os.environ[QUICK_ENV]!r} is not understood; use {', '.join(_TRUE)} for the quick preset "
            f"or {', '.join(v for v in _FALSE if v)} (or leave it unset) for the full one"
        )
    return "quick" if value in _TRUE else default
