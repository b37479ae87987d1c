"""Prediction: the fast CPU path computes what the plain forward does, and files keep their geometry."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg import fast_inference, prediction
from covidseg.config import get_preset
from covidseg.models import MODEL_NAMES, build_model
from covidseg.metrics import THRESHOLD
from covidseg.prediction import lesion_volume_ml, predict_file, predict_probabilities

from conftest import ThresholdModel, synthetic_ct, write_lesion_everywhere_run, write_nifti

PROBABILITY_TOLERANCE = 1e-4  # channels-last reorders float sums; differences are rounding only


def naive_probabilities(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The reference: one plain forward of the whole stack, default layout, no_grad."""
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(images)[:, None]))[:, 0].numpy()


# Building the VGG19 U-Net takes seconds (torchvision initialises VGG's 120 M-parameter classifier
# before smp drops it), so that case is marked slow.
FAST_PATH_CASES = [pytest.param(name, marks=pytest.mark.slow) if name == "unet-vgg19" else name for name in MODEL_NAMES]


@pytest.mark.parametrize("name", FAST_PATH_CASES)
def test_fast_path_equals_the_naive_forward(name):
    torch.manual_seed(0)
    model = build_model(name, encoder_weights=None, width=4)
    for module in model.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    images = np.random.default_rng(1).uniform(-1, 1, size=(3, 32, 32)).astype(np.float32)
    before = copy.deepcopy(model.state_dict())
    model.train()  # predict_probabilities must switch to eval itself, then restore the mode

    fast = predict_probabilities(model, images, batch_size=2)  # 2 + 1: a short last batch

    assert model.training
    for key, value in model.state_dict().items():  # no side effect: same values, same layout
        assert torch.equal(value, before[key]), key
        assert value.is_contiguous(), key
    reference = naive_probabilities(model.eval(), images)
    assert fast.shape == images.shape and fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, rtol=0, atol=PROBABILITY_TOLERANCE)
    decided = np.abs(reference - THRESHOLD) > PROBABILITY_TOLERANCE  # voxels rounding cannot flip
    assert np.array_equal((fast >= THRESHOLD)[decided], (reference >= THRESHOLD)[decided])


@pytest.mark.parametrize("name", FAST_PATH_CASES)
def test_batch_norm_is_folded_away_in_every_model(name):
    model = build_model(name, encoder_weights=None, width=4).eval()
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    folded = fast_inference.fold_batch_norm(copy.deepcopy(model))

    assert batch_norms > 0 or name == "unet-vgg19"  # VGG19's encoder has none; its decoder has
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in folded.modules()) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def test_lesion_volume_in_millilitres():
    mask = np.zeros((4, 4, 3), dtype=np.uint8)
    mask[1:3, 1:3, 1] = 1  # 4 voxels of 0.5 x 0.5 x 5 mm = 1.25 mm³ each: 5 mm³ = 0.005 mL
    assert lesion_volume_ml(mask, (0.5, 0.5, 5.0)) == pytest.approx(0.005)
    assert lesion_volume_ml(np.zeros_like(mask), (0.5, 0.5, 5.0)) == 0.0


RAS_AFFINE = np.array([[0.7, 0, 0, -120.0], [0, 0.8, 0, -100.0], [0, 0, 5.0, 30.0], [0, 0, 0, 1]])


def test_predict_file_keeps_the_affine_and_writes_the_known_mask(tmp_path, monkeypatch):
    hu, _ = synthetic_ct(shape=(32, 32, 6), seed=3)  # air, body, a lung, a lesion at -500 HU
    study = write_nifti(tmp_path / "ct.nii.gz", hu, RAS_AFFINE)  # stored RAS; covidseg works in LAS
    config = get_preset("quick").replace(image_size=32)
    monkeypatch.setattr(prediction, "load_trained_model", lambda run_dir, device="cpu": (ThresholdModel(-600.0).eval(), config))

    volume = predict_file(tmp_path / "run", study, tmp_path / "mask.nii.gz", batch_size=4, device="cpu")

    written = nib.load(tmp_path / "mask.nii.gz")
    expected = (hu > -600).astype(np.int16)  # in the file's own (RAS) orientation
    assert np.array_equal(written.affine, nib.load(study).affine)
    assert written.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(written.dataobj), expected)
    assert volume == pytest.approx(expected.sum() * 0.7 * 0.8 * 5.0 / 1000.0)


def test_predict_file_with_a_saved_run(tmp_path):
    """Through a real checkpoint: a U-Net whose head says 'lesion' everywhere."""
    hu, _ = synthetic_ct(shape=(32, 32, 4), seed=4)
    study = write_nifti(tmp_path / "ct.nii.gz", hu)
    run = write_lesion_everywhere_run(tmp_path / "run")

    volume = predict_file(run, study, tmp_path / "mask.nii.gz", device="cpu")

    written = nib.load(tmp_path / "mask.nii.gz")
    assert np.array_equal(written.affine, nib.load(study).affine)
    assert np.asarray(written.dataobj).min() == 1
    spacing = np.sqrt((nib.load(study).affine[:3, :3] ** 2).sum(axis=0))
    assert volume == pytest.approx(hu.size * float(np.prod(spacing)) / 1000.0)


def test_read_only_slices_are_accepted(recwarn):
    """A read-only stack (the memory-mapped slice cache) is predicted without torch's warning."""
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    images = np.random.default_rng(2).uniform(-1, 1, size=(2, 32, 32)).astype(np.float32)
    images.setflags(write=False)

    fast = predict_probabilities(model, images, batch_size=2)

    np.testing.assert_allclose(fast, naive_probabilities(model.eval(), images.copy()), rtol=0, atol=PROBABILITY_TOLERANCE)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_with_lungs_box_the_model_runs_on_the_box_and_the_rest_is_background():
    """With ``lungs_box``, a per-pixel model gives the whole-slice mask inside the box, background outside."""
    from test_lung_box import chest

    from covidseg.lung_box import lung_box

    hu = np.round(chest(size=256) * 1000).astype(np.int16)
    hu[:, 120:130, 70:80] = -300  # a lesion in the left lung
    hu[:, 20:40, 120:130] = 300  # dense tissue far from the lungs, which this model also calls
    volume = np.ascontiguousarray(hu.transpose(1, 2, 0))  # (X, Y, Z), as predict_study takes it
    model = ThresholdModel(-600.0).eval()
    seen = []
    original = prediction.predict_probabilities
    spy = lambda model, images, batch_size: seen.append(images.shape) or original(model, images, batch_size)  # noqa: E731

    whole = prediction.predict_study(model, volume, image_size=256)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prediction, "predict_probabilities", spy)
        boxed = prediction.predict_study(model, volume, image_size=256, lungs_box=True)

    rows, cols = lung_box(chest(size=256))
    assert seen == [(4, rows.stop - rows.start, cols.stop - cols.start)] and seen[0][1] * seen[0][2] < 256 * 256 / 2
    assert np.array_equal(whole, (volume > -600).astype(np.uint8))
    inside = np.zeros(whole.shape, dtype=bool)
    inside[rows, cols, :] = True
    assert np.array_equal(boxed[inside], whole[inside]) and boxed[120:130, 70:80].all()
    assert not boxed[~inside].any() and whole[20:40, 120:130].all()
