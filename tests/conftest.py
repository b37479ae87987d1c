"""Shared fixtures: small NIfTI studies written with nibabel, tiny training settings, and the real data in ../shared."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg.config import TrainConfig, get_preset
from covidseg.mosmed import ANNOTATED_IDS, Study, mask_path, study_path, write_registry

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_MASKS = SHARED_DATA / "mosmed-masks"
MINISEG_PREDICTIONS = SHARED_DATA / "miniseg-mosmed-predictions"

LAS_AFFINE = np.array(
    [[-0.75, 0, 0, 190.0], [0, 0.75, 0, -190.0], [0, 0, 8.0, -300.0], [0, 0, 0, 1]], dtype=np.float64
)


@pytest.fixture
def real_masks() -> Path:
    """The 50 real MosMedData masks, or a skip where ../shared is absent."""
    if not (REAL_MASKS / "study_0255_mask.nii.gz").is_file():
        pytest.skip("real masks not available (expected ../shared/data/mosmed-masks beside the repository)")
    return REAL_MASKS


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LAS_AFFINE, description: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if description is not None:
        image.header["descrip"] = description.encode()
    nib.save(image, path)
    return path


def synthetic_ct(shape=(32, 32, 6), seed=0, lesion=True) -> tuple[np.ndarray, np.ndarray]:
    """A tiny HU volume (air, body, a lung, a lesion) and its mask, for I/O tests."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[4:-4, 4:-4, :] = 40
    hu[8:-8, 8:-8, :] = -850
    hu += rng.integers(-10, 10, size=shape, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.int16)
    if lesion:
        mask[10:14, 12:16, 2:4] = 1
        hu[mask == 1] = -500
    return hu, mask


def write_tiny_dataset(root: Path, ids=(255, 256, 257), shape=(32, 32, 6), registry=True) -> list[Study]:
    """A MosMedData-layout folder of tiny CT-1 studies with masks."""
    studies = []
    for i, sid in enumerate(ids):
        hu, mask = synthetic_ct(shape, seed=sid)
        image = write_nifti(study_path(root, sid, "CT-1"), hu)
        masks = write_nifti(mask_path(root, sid), mask)
        studies.append(Study(sid, "CT-1", image, masks))
    if registry:
        write_registry(root, studies)
    return studies


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    root = tmp_path / "mosmed"
    write_tiny_dataset(root)
    return root


TINY_SHAPE = (16, 16, 3)
"""Studies so small that the whole thesis split decodes in a fraction of a second."""

TINY_TRAIN_FLAGS = ("--model", "unet", "--preset", "quick", "--image-size", "16", "--unet-width", "4",
                    "--batch-size", "16", "--slices-per-epoch", "64", "--quiet")
"""``covidseg train`` flags for the settings of :func:`tiny_config`."""


def write_lesion_everywhere_run(run: Path) -> Path:
    """A run folder holding ``best.pt`` of a width-4 U-Net (32 px) whose head says lesion everywhere."""
    from covidseg.checkpoint import save_checkpoint
    from covidseg.models import build_model

    config = get_preset("quick").replace(model="unet", unet_width=4, image_size=32)
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(20.0)
    save_checkpoint({"model_name": "unet", "config": config.to_dict(), "model": model.state_dict(), "epoch": 0, "history": []}, run / "best.pt")
    return run


def tiny_config(**changes) -> TrainConfig:
    """The quick preset shrunk to 16 px images and a width-4 U-Net: an epoch takes about a second."""
    values = dict(image_size=16, unet_width=4, batch_size=16, slices_per_epoch=64)
    return get_preset("quick").replace(**{**values, **changes})


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread: tiny models run faster without thread hand-offs, and a shared CPU is not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny50(tmp_path_factory) -> Path:
    """All 50 annotated ids as tiny studies (:data:`TINY_SHAPE`), so the thesis split trains in seconds."""
    root = tmp_path_factory.mktemp("tiny50") / "mosmed"
    write_tiny_dataset(root, ids=ANNOTATED_IDS, shape=TINY_SHAPE)
    return root


class ThresholdModel(torch.nn.Module):
    """Calls lesion every voxel above ``hu`` HU (its input is HU / 1000): a model with a known answer."""

    def __init__(self, hu: float):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(1000.0)
            self.conv.bias.fill_(-hu)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A run folder holding an untrained width-4 U-Net at 32 px (seeded): for commands whose
    mechanics, not accuracy, are tested."""
    from covidseg.checkpoint import save_checkpoint
    from covidseg.models import build_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("untrained") / "run"
    config = get_preset("quick").replace(model="unet", image_size=32, unet_width=4)
    model = build_model("unet", encoder_weights=None, width=4)
    save_checkpoint({"model_name": "unet", "config": config.to_dict(), "model": model.state_dict(), "epoch": 0, "history": []}, run / "best.pt")
    return run
