"""The four segmentation models of the thesis, from one factory.

Every model takes one CT slice as a 1-channel image (HU clipped to [-1000, 1000] and divided by
1000, :func:`covidseg.preprocessing.hu_to_slices`) and returns one map of logits of the same height
and width; ``sigmoid(logits) >= 0.5`` (:data:`covidseg.metrics.THRESHOLD`) is the lesion mask.

- ``unet``: the U-Net of Ronneberger et al. (MICCAI 2015), as in thesis ch. 6, trained from
  scratch (:class:`UNet`).
- ``unet-vgg19``, ``unet-resnet34``, ``unet-mobilenetv2``: ``segmentation_models_pytorch.Unet``
  with a VGG19 (without batch norm, as in the thesis), ResNet34 or MobileNetV2 encoder, by default
  initialised with ImageNet weights.

ImageNet weights come from the Hugging Face Hub (smp 0.6 repos ``smp-hub/<encoder>.imagenet``)
or from the local Hugging Face cache. Offline, and not cached, :func:`build_model` fails at once
with :class:`~covidseg.errors.WeightsUnavailableError` instead of retrying for half a minute. A
local weights file or folder can be given instead; its first convolution is adapted from RGB to
one channel with smp's own rule (see :func:`load_encoder_weights`).
"""

from __future__ import annotations

import math
import os
import threading
import urllib.request
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsUnavailableError

__all__ = [
    "MODEL_NAMES",
    "ENCODERS",
    "UNet",
    "build_model",
    "output_head",
    "LESION_PRIOR",
    "load_encoder_weights",
    "count_parameters",
]

from .config import MODEL_NAMES  # noqa: E402  (their one home, importable without torch)

ENCODERS = {"unet-vgg19": "vgg19", "unet-resnet34": "resnet34", "unet-mobilenetv2": "mobilenet_v2"}
"""smp encoder behind each pretrained-encoder model."""

LESION_PRIOR = 0.01
"""Lesion probability that a newly built model predicts everywhere: its output bias is
``logit(LESION_PRIOR)``.

Lesions cover about 0.2 % of the voxels of the 50 annotated studies. A head that starts at
probability 0.5 everywhere fills the soft Dice's denominator with false positives, and the first
epochs go into lowering the background. Starting near a small prior (Lin et al., "Focal Loss for
Dense Object Detection", ICCV 2017) points the Dice gradient at the lesions from the first step
(``benchmarks/head_prior.py`` measures the difference)."""

IN_CHANNELS = 1  # one CT slice
CLASSES = 1  # one logit map: lesion vs. background
HUB_PROBE_TIMEOUT_S = 3.0  # how long to wait for huggingface.co (DNS included) before failing
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WEIGHTS_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")  # looked for in a folder, in order
_HUB_FILES = ("config.json", "model.safetensors")  # what smp 0.6 downloads for an encoder
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads HF_HUB_OFFLINE


# --------------------------------------------------------------------------------------------
# The from-scratch U-Net
# --------------------------------------------------------------------------------------------


class _DoubleConv(nn.Sequential):
    """Two (3x3 conv, padding 1 -> batch norm -> ReLU) blocks: the unit of every U-Net level."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    """Transposed-conv up-sampling (x2, channels halved), skip concatenation, double conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = _DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), as used in thesis ch. 6.

    The contracting path applies a double 3x3 convolution (each followed by batch norm and ReLU)
    and a 2x2 max-pool at each of ``depth`` levels, doubling the channels from ``width``; a
    double convolution forms the bottleneck. The expanding path up-samples with a 2x2 transposed
    convolution that halves the channels, concatenates the skip connection from the same level,
    and applies a double convolution. A 1x1 convolution gives the logits. Unlike the original
    paper, convolutions are padded, so the output has the size of the input, and batch norm is
    added after each convolution. With ``width=64, depth=4`` this is the classic ~31 M-parameter
    network.

    Args:
        in_channels: Channels of the input image.
        classes: Channels of the output logits.
        width: Channels of the first level; level ``i`` has ``width * 2**i``.
        depth: Number of poolings (the bottleneck is at ``1 / 2**depth`` of the input size).

    Shape:
        - Input: ``(N, in_channels, H, W)``, with H and W divisible by ``2**depth``
          (16 for the default depth).
        - Output: ``(N, classes, H, W)``, logits.

    Raises:
        ValueError: From :meth:`forward`, if H or W is not divisible by ``2**depth``
            (the input is not padded: pad or crop it yourself).
    """

    def __init__(self, in_channels: int = IN_CHANNELS, classes: int = CLASSES, width: int = 64,
                 depth: int = 4):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"UNet needs width, depth >= 1, got width={width}, depth={depth}")
        self.depth = depth
        channels = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList([_DoubleConv(in_channels, channels[0])])
        self.down.extend(_DoubleConv(channels[i], channels[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.up = nn.ModuleList(_Up(channels[i + 1], channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch of images (see the class docstring for shapes)."""
        multiple = 2**self.depth
        height, width = x.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"UNet of depth {self.depth} needs H and W divisible by {multiple}, "
                f"got {height}x{width}"
            )
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()  # the bottleneck
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def build_model(name: str, encoder_weights: str | os.PathLike | None = "imagenet",
                width: int = 64) -> nn.Module:
    """Build one of the thesis' models, for 1-channel input and 1 output logit map.

    Args:
        name: One of :data:`MODEL_NAMES`.
        encoder_weights: For the three pretrained-encoder models: ``"imagenet"`` (from the local
            Hugging Face cache, else downloaded by smp), ``None`` (random initialisation), or the
            path of a weights file or folder holding the encoder's RGB state dict (see
            :func:`load_encoder_weights`). Ignored by ``unet``, which has no pretrained encoder.
        width: Channels of the first level of ``unet``; ignored by the other models (so that one
            config can drive all four).

    Returns:
        The model, in training mode, on the CPU, its output bias set so that it predicts
        :data:`LESION_PRIOR` everywhere.

    Shape:
        - Input: ``(N, 1, H, W)``, H and W divisible by 16 (``unet``) or 32 (the others).
        - Output: ``(N, 1, H, W)``, logits.

    Raises:
        ValueError: If ``name`` is not one of :data:`MODEL_NAMES` (the message lists them).
        WeightsUnavailableError: If ImageNet weights are neither cached nor downloadable (the
            check takes at most a few seconds), or a weights file is missing or unusable.

    Example::

        >>> import torch
        >>> from covidseg.models import build_model, count_parameters
        >>> model = build_model("unet-resnet34", encoder_weights=None)  # random weights, no download
        >>> count_parameters(model)  # the thesis' 24.4 M
        24430097
        >>> slices = torch.zeros(2, 1, 64, 64)  # 2 preprocessed slices (HU / 1000) of 64 x 64
        >>> with torch.no_grad():
        ...     logits = model.eval()(slices)
        >>> logits.shape  # one logit map per slice
        torch.Size([2, 1, 64, 64])
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    model = UNet(IN_CHANNELS, CLASSES, width=width) if name == "unet" else _smp_unet(name, encoder_weights)
    nn.init.constant_(output_head(model).bias, math.log(LESION_PRIOR / (1 - LESION_PRIOR)))
    return model


def output_head(model: nn.Module) -> nn.Conv2d:
    """The 1x1 convolution that gives the logits of a model built by :func:`build_model`."""
    return model.head if isinstance(model, UNet) else model.segmentation_head[0]


def _smp_unet(name: str, encoder_weights) -> nn.Module:
    """``segmentation_models_pytorch.Unet`` with the encoder of ``name`` and its weights."""
    import segmentation_models_pytorch as smp  # heavy: imported only when needed

    encoder = ENCODERS[name]
    if encoder_weights is None:
        return smp.Unet(encoder, encoder_weights=None, in_channels=IN_CHANNELS, classes=CLASSES)
    if isinstance(encoder_weights, str) and encoder_weights in _hub_settings(encoder):
        _ensure_hub_weights(encoder, encoder_weights)
        try:
            return smp.Unet(encoder, encoder_weights=encoder_weights, in_channels=IN_CHANNELS,
                            classes=CLASSES)
        except OSError as err:  # huggingface_hub's HTTP and cache errors are OSErrors
            raise WeightsUnavailableError(
                None, f"could not download {encoder_weights} weights for {encoder}: "
                f"{type(err).__name__}; {_HOW_TO_PROCEED}") from err
    # Built for RGB, loaded as the weights were made, then given one input channel by smp's own
    # rule (the same the Hub path above applies); the decoder does not depend on the input channels.
    model = smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=CLASSES)
    load_encoder_weights(model.encoder, encoder_weights)
    model.encoder.set_in_channels(IN_CHANNELS, pretrained=True)
    return model


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of ``model`` (trainable or not; buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------------
# Pretrained weights: the Hugging Face Hub and its cache
# --------------------------------------------------------------------------------------------

_HOW_TO_PROCEED = (
    "pass encoder_weights=None to train from scratch, or a local weights file or folder "
    "(--encoder-weights PATH on the command line)"
)


def _hub_settings(encoder: str) -> dict:
    """smp's ``pretrained_settings`` of ``encoder``: weights name -> {repo_id, revision, ...}."""
    from segmentation_models_pytorch.encoders import encoders

    return encoders[encoder]["pretrained_settings"]


def _ensure_hub_weights(encoder: str, weights: str) -> None:
    """Return if smp can get ``weights`` for ``encoder``; raise at once if it cannot.

    smp 0.6 (``encoders.get_encoder``) calls ``hf_hub_download`` for ``config.json`` and
    ``model.safetensors`` of the repo at a pinned commit. With both in the cache, that needs no
    network. Otherwise the Hub must answer one short request (:func:`_hub_reachable`), instead
    of ``hf_hub_download`` retrying for about 25 seconds before it fails.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    settings = _hub_settings(encoder)[weights]
    repo_id, revision = settings["repo_id"], settings["revision"]
    cached = all(
        isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
        for filename in _HUB_FILES
    )
    if cached:
        return
    where = f"{weights} weights for {encoder} (Hugging Face repo {repo_id})"
    offline = constants.is_offline_mode() or any(
        os.environ.get(variable, "").upper() in _TRUE_VALUES
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline:
        raise WeightsUnavailableError(
            None,
            f"{where} are not in the local cache and HF_HUB_OFFLINE is set; {_HOW_TO_PROCEED}")
    probe_url = f"{constants.ENDPOINT}/{repo_id}/resolve/{revision}/{_HUB_FILES[0]}"
    if not _hub_reachable(probe_url):
        raise WeightsUnavailableError(
            None, f"{where} are not in the local cache and {constants.ENDPOINT} cannot be reached; "
            f"{_HOW_TO_PROCEED}")


def _hub_reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP ``HEAD`` of ``url`` succeeds (2xx or 3xx) within about ``timeout`` seconds.

    This is the request ``hf_hub_download`` starts with, made once, without retries; urllib
    honours the usual proxy variables. A TCP probe alone is not enough: some sandboxes accept
    connections to any address. The name lookup cannot be given a timeout and may hang without
    a network, so the probe runs in a daemon thread that is abandoned after ``timeout`` seconds.
    """
    result = []

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                result.append(True)
        except (OSError, ValueError):  # URLError, HTTPError (4xx/5xx), timeouts, bad URLs
            result.append(False)

    thread = threading.Thread(target=probe, name="covidseg-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result) and result[0]


# --------------------------------------------------------------------------------------------
# Local weights files
# --------------------------------------------------------------------------------------------


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Load an encoder's RGB state dict from a file or folder into an RGB ``encoder``.

    The file is a torch state dict (``.pth``, ``.pt``, ``.bin``, loaded with
    ``weights_only=True``) or a ``.safetensors`` file, holding the encoder's weights as made for
    3-channel input (for instance ``model.safetensors`` of an ``smp-hub/<encoder>.imagenet``
    snapshot, or torchvision's ImageNet weights, whose classifier smp's encoders drop). A folder
    must contain ``model.safetensors`` or ``pytorch_model.bin``, or a single weights file.

    :func:`build_model` then gives the encoder one input channel with smp's
    ``set_in_channels(1)`` (``encoders._utils.patch_first_conv``), which sums the first
    convolution's RGB kernel over its input channels: a grey image ``g`` seen as RGB
    ``(g, g, g)`` gives exactly the same response.

    Args:
        encoder: An smp encoder built with ``in_channels=3``, modified in place.
        path: The weights file, or a folder containing it.

    Raises:
        WeightsUnavailableError: If the path does not exist, holds no weights file, cannot be
            read as a state dict, or does not match the encoder's keys and shapes (the message
            names the file).
    """
    file = _weights_file(Path(path))
    state_dict = _read_state_dict(file)
    try:
        encoder.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        problem = " ".join(str(err).split())
        if len(problem) > 300:
            problem = problem[:300] + " ..."
        raise WeightsUnavailableError(
            file, f"does not fit the {type(encoder).__name__}: {problem}") from err


def _weights_file(path: Path) -> Path:
    """The weights file ``path`` names, or the one in folder ``path``."""
    if path.is_dir():
        for name in WEIGHTS_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
        if len(found) == 1:
            return found[0]
        raise WeightsUnavailableError(
            path, f"folder holds {'no' if not found else len(found)} weights files "
            f"(looked for {', '.join(WEIGHTS_FILE_NAMES)} or a single "
            f"{'/'.join(WEIGHTS_SUFFIXES)} file); {_HOW_TO_PROCEED}")
    if not path.is_file():
        raise WeightsUnavailableError(path, f"no such weights file or folder; {_HOW_TO_PROCEED}")
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise WeightsUnavailableError(
            path, f"not a weights file (expected {', '.join(WEIGHTS_SUFFIXES)})")
    return path


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from a safetensors or (weights-only) torch file."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(file), device="cpu")
        else:
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, safetensors and I/O errors alike
        raise WeightsUnavailableError(
            file, f"cannot be read as a state dict ({type(err).__name__})") from err
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in state_dict.items()):
        raise WeightsUnavailableError(file, "is not a state dict (a mapping of names to tensors)")
    return dict(state_dict)
