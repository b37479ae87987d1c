"""Running a trained model: on stacks of slices, on whole studies, and on NIfTI files.

``covidseg predict`` reads any CT study in HU, resamples its slices to the model's size, predicts,
resamples the probabilities back, thresholds at 0.5 and writes an int16 mask with the input's
affine and header geometry, so it overlays the study in ITK-SNAP or 3D Slicer. With
``--lungs-box`` it predicts only inside the box around the lungs (:mod:`covidseg.roi`): faster, but
not the same mask, because the networks' receptive fields span the whole slice.

On the CPU, inference runs under ``torch.inference_mode`` on a copy of the model with batch norm
folded into the convolutions, in channels-last layout (oneDNN's fast convolutions); the masks equal
those of a plain forward to within float rounding. ``benchmarks/predict.py`` measures each step,
and the candidates that were rejected: bfloat16 (emulated, and much slower, on CPUs without native
support), other batch sizes (no consistent gain), and skipping whole slices without lungs (the
benchmark study has none to skip).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .dataset import from_slices, resize_slices, to_slices
from .devices import resolve_device
from .errors import CheckpointError
from .models import build_model
from .nifti import OUTPUT_DESCRIPTION_PREFIX, load_volume, save_volume
from .preprocessing import check_hu_range, preprocess_hu
from .roi import lung_box

__all__ = [
    "THRESHOLD",
    "load_trained_model",
    "fold_batch_norm",
    "predict_probabilities",
    "predict_study",
    "predict_file",
    "lesion_volume_ml",
]

THRESHOLD = 0.5
"""Probability at or above which a voxel is called lesion."""

PREDICTION_DESCRIPTION = OUTPUT_DESCRIPTION_PREFIX + "lesion mask (GGO + consolidation)"


def load_trained_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """Load the best checkpoint of a run (``best.pt``, else ``last.pt``) into a fresh model.

    Raises:
        CheckpointError: If the run holds no usable checkpoint.
    """
    run_dir = Path(run_dir)
    path = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    if not run_dir.is_dir():
        raise CheckpointError(run_dir, "run folder not found (train one with 'covidseg train')")
    state = load_checkpoint(path)
    config: TrainConfig = state["config"]
    model = build_model(state["model_name"], encoder_weights=None, width=config.unet_width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit model {state['model_name']!r} ({str(exc).splitlines()[0]})") from None
    device = resolve_device(device) if isinstance(device, str) else device
    return model.to(device).eval(), config


def fold_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d into that convolution.

    Pairs are ``nn.Sequential`` neighbours (smp's decoder blocks, MobileNetV2's layers, the
    U-Net's double convolutions, ResNet's downsampling shortcuts) and torchvision's
    ``convN``/``bnN`` attributes (ResNet's basic blocks, which apply ``bnN`` right after
    ``convN``). In eval mode batch norm is an affine map per channel, so the folded convolution
    computes the same function, to within float rounding, with one pass over memory instead of two
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`). ``torch.fx.experimental.optimization.fuse``
    would find the pairs from the traced graph, but it cannot trace :class:`~covidseg.models.UNet`,
    whose input-size check is Python control flow.

    Args:
        model: A model in eval mode.

    Returns:
        ``model``, folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(model.modules()):
        names = list(parent._modules)
        if isinstance(parent, nn.Sequential):
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(name, "bn" + name[4:]) for name in names if name.startswith("conv") and "bn" + name[4:] in parent._modules]
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return model


def _inference_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to run for inference on ``device``: on the CPU, a copy of ``model`` with batch
    norm folded into the convolutions, in channels-last layout.

    In channels-last (NHWC) layout PyTorch's CPU convolutions use oneDNN's blocked kernels. On a
    2-core AVX2 machine, a 512 x 512 ResNet34 U-Net ran 1.29x faster than a plain forward in
    channels-last layout and 1.47x faster with batch norm folded as well, with identical masks
    (``benchmarks/predict.py``). The copy leaves ``model`` untouched (training may go on with it).
    On CUDA and MPS, ``model`` itself is returned.

    Args:
        model: The model, in eval mode, on ``device``.
        device: Where it runs.

    Returns:
        A module computing the same function as ``model``.
    """
    if device.type != "cpu":
        return model
    with torch.no_grad():
        return fold_batch_norm(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)


def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> np.ndarray:
    """Lesion probabilities for a stack of preprocessed slices.

    Runs under :func:`torch.inference_mode`, in eval mode (restored afterwards), and on the CPU
    through a channels-last copy of the model (:func:`_inference_model`).

    Args:
        model: A model returning one logit map per slice.
        images: float32 ``(Z, H, W)`` preprocessed slices.
        batch_size: Slices per forward pass.
        device: Where to run (default: the model's device).
        amp: Use mixed precision (CUDA only; bfloat16 on CPUs without native support is slower).

    Returns:
        float32 ``(Z, H, W)`` probabilities.

    Shape:
        - images: ``(Z, H, W)``, H and W as the model accepts (divisible by 16 or 32).
        - output: ``(Z, H, W)``.
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    try:
        runner = _inference_model(model, device)
        memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        out = np.empty(images.shape, dtype=np.float32)
        autocast = torch.autocast("cuda") if (amp and device.type == "cuda") else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for start in range(0, images.shape[0], batch_size):
                chunk = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
                if not chunk.flags.writeable:  # e.g. a read-only memory map of the slice cache
                    chunk = chunk.copy()
                batch = torch.from_numpy(chunk)[:, None].to(device, non_blocking=True).contiguous(memory_format=memory_format)
                logits = runner(batch)
                out[start : start + batch.shape[0]] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    finally:
        model.train(was_training)
    return out


def predict_study(model: torch.nn.Module, hu_volume: np.ndarray, image_size: int, batch_size: int = 8, lungs_box: bool = False) -> np.ndarray:
    """Binary lesion mask of a whole study.

    With ``lungs_box`` the model runs only on the box around the lungs
    (:func:`covidseg.roi.lung_box`), with a margin of context, and everything outside it is
    background. That is an approximation: a ResNet34 U-Net's deepest features see the whole
    slice, so what lies beyond the box changes predictions inside it. On the 512 x 512 phantom
    study of ``benchmarks/predict.py`` the box is 46 % of the slice; ``covidseg predict`` took
    22 s instead of 36 s on 2 cores, and its mask had a Dice of 0.976 with the whole-slice mask.

    Args:
        model: The trained model (on its device).
        hu_volume: ``(X, Y, Z)`` intensities in HU, in the working orientation.
        image_size: The in-plane size the model was trained at.
        batch_size: Slices per forward pass.
        lungs_box: Predict only inside the box around the lungs (faster, approximate).

    Returns:
        uint8 ``(X, Y, Z)`` mask in {0, 1}, on the input's grid.
    """
    slices = to_slices(preprocess_hu(hu_volume))
    native = slices.shape[1:]
    slices = resize_slices(slices, image_size, "bilinear")
    rows, cols = lung_box(slices) if lungs_box else (slice(None), slice(None))
    probabilities = np.zeros(slices.shape, dtype=np.float32)
    probabilities[:, rows, cols] = predict_probabilities(model, slices[:, rows, cols], batch_size)
    probabilities = resize_slices(probabilities, native, "bilinear")
    return from_slices((probabilities >= THRESHOLD).astype(np.uint8))


def lesion_volume_ml(mask: np.ndarray, spacing_mm) -> float:
    """Volume of a binary mask in millilitres (1 mL = 1000 mm³).

    Args:
        mask: The mask; every non-zero voxel counts.
        spacing_mm: The voxel size in mm along the three axes, or the voxel volume in mm³
            (:attr:`covidseg.nifti.Volume.voxel_volume_mm3`, which is right for sheared grids too).
    """
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_mm)) / 1000.0


def predict_file(run_dir: str | os.PathLike, in_path: str | os.PathLike, out_path: str | os.PathLike, batch_size: int = 8, device: str = "auto", lungs_box: bool = False) -> float:
    """Segment a CT study file and write its mask.

    Args:
        run_dir: A training run (``covidseg train --out``).
        in_path: CT study, NIfTI in HU, any in-plane size and orientation.
        out_path: Where to write the int16 mask (atomically).
        batch_size: Slices per forward pass.
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'mps'``.
        lungs_box: Predict only inside the box around the lungs (faster, approximate).

    Returns:
        The predicted lesion volume in mL.

    Raises:
        DataError: For an unreadable or non-HU input, or an unwritable output.
        CheckpointError: For a bad run.
    """
    model, config = load_trained_model(run_dir, device)
    volume = load_volume(in_path)
    check_hu_range(volume.array, volume.path)
    mask = predict_study(model, volume.array, config.image_size, batch_size, lungs_box)
    save_volume(mask.astype(np.int16), volume, out_path, description=PREDICTION_DESCRIPTION)
    return lesion_volume_ml(mask, volume.voxel_volume_mm3)
