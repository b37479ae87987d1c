"""Running a trained model: on stacks of slices, on whole studies, and on NIfTI files.

``covidseg predict`` reads any CT study in HU, resamples its slices to the model's size, predicts,
resamples the probabilities back, thresholds at 0.5 and writes an int16 mask with the input's
affine and header geometry, so it overlays the study in ITK-SNAP or 3D Slicer. The way from HU to
the model's input and back is :mod:`covidseg.preprocessing`'s, the one training takes. With
``--lungs-box`` it predicts only inside the box around the lungs (:mod:`covidseg.lung_box`): faster,
but not the same mask, because the networks' receptive fields span the whole slice.

On the CPU, inference runs under ``torch.inference_mode`` on a copy of the model with batch norm
folded into the convolutions, in channels-last layout: :mod:`covidseg.fast_inference` describes
these speed-ups and their measured gains.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .devices import resolve_device
from .errors import CheckpointError
from .fast_inference import inference_model
from .lung_box import lung_box
from .metrics import THRESHOLD
from .models import build_model
from .nifti import OUTPUT_DESCRIPTION_PREFIX, load_volume, save_volume
from .preprocessing import check_hu_range, hu_to_slices, slices_to_volume

__all__ = [
    "load_trained_model",
    "predict_probabilities",
    "predict_study",
    "predict_file",
    "lesion_volume_ml",
]

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


def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> np.ndarray:
    """Lesion probabilities for a stack of preprocessed slices.

    Runs under :func:`torch.inference_mode`, in eval mode (restored afterwards), and on the CPU
    through a channels-last copy of the model (:func:`covidseg.fast_inference.inference_model`).

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
        runner = inference_model(model, device)
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
    (:func:`covidseg.lung_box.lung_box`), with a margin of context, and everything outside it is
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
    slices = hu_to_slices(hu_volume, image_size)
    rows, cols = lung_box(slices) if lungs_box else (slice(None), slice(None))
    probabilities = np.zeros(slices.shape, dtype=np.float32)
    probabilities[:, rows, cols] = predict_probabilities(model, slices[:, rows, cols], batch_size)
    return (slices_to_volume(probabilities, hu_volume.shape) >= THRESHOLD).astype(np.uint8)


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

    Example::

        >>> from covidseg.prediction import predict_file
        >>> # runs/resnet34: a run of `covidseg train --model unet-resnet34 --out runs/resnet34`
        >>> ml = predict_file("runs/resnet34", "study_0255.nii.gz", "study_0255_lesions.nii.gz")  # doctest: +SKIP
        >>> print(f"lesions: {ml:.1f} mL")  # doctest: +SKIP
    """
    model, config = load_trained_model(run_dir, device)
    volume = load_volume(in_path)
    check_hu_range(volume.array, volume.path)
    mask = predict_study(model, volume.array, config.image_size, batch_size, lungs_box)
    save_volume(mask.astype(np.int16), volume, out_path, description=PREDICTION_DESCRIPTION)
    return lesion_volume_ml(mask, volume.voxel_volume_mm3)
