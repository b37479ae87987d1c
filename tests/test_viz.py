"""Figures: the radiological view, the figure builders, the slice browser, and no import side effects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from nibabel import orientations  # noqa: E402

from covidseg import viz  # noqa: E402
from covidseg.nifti import load_volume  # noqa: E402

from conftest import LAS_AFFINE, REPO, write_nifti  # noqa: E402


# A small LAS volume: axis 0 runs from the patient's right to left, axis 1 from posterior to
# anterior, axis 2 from inferior to superior.
SHAPE = (7, 5, 3)
AXIAL = 1
RIGHT_ANTERIOR = (0, SHAPE[1] - 1, AXIAL)  # the voxel furthest to the patient's right and front
LEFT_POSTERIOR = (SHAPE[0] - 1, 0, AXIAL)  # furthest to the left and back


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def las_volume_with_markers() -> np.ndarray:
    volume = np.zeros(SHAPE, dtype=np.int16)
    volume[RIGHT_ANTERIOR] = 1
    volume[LEFT_POSTERIOR] = 2
    return volume


def images_of(ax) -> list:
    return ax.get_images()


# --------------------------------------------------------------------------- radiological view


def test_radiological_is_a_transpose_then_row_flip():
    slice_ = np.arange(6).reshape(2, 3)  # (left, anterior)
    view = viz.radiological(slice_)
    assert view.shape == (3, 2)
    assert view.tolist() == [[2, 5], [1, 4], [0, 3]]  # anterior (last column) becomes the top row


@pytest.mark.parametrize("codes", ["LAS", "RAS", "LPS", "RPI", "ASL", "SRA"])
def test_radiological_shows_anterior_up_and_patient_right_on_viewer_left(tmp_path, codes):
    """Whatever orientation the file is stored in, the marker at the patient's right-anterior
    side ends up top-left on screen, and the left-posterior one bottom-right."""
    las = las_volume_with_markers()
    # Store the same anatomy in another orientation: reorder the voxels and adjust the affine.
    ornt = orientations.ornt_transform(orientations.axcodes2ornt("LAS"), orientations.axcodes2ornt(tuple(codes)))
    data = orientations.apply_orientation(las, ornt)
    affine = LAS_AFFINE @ orientations.inv_ornt_aff(ornt, las.shape)
    path = write_nifti(tmp_path / f"marker_{codes}.nii.gz", data, affine)
    assert "".join(nib.aff2axcodes(nib.load(path).affine)) == codes

    volume = load_volume(path)
    # The anatomy, from the world coordinates alone (RAS+: +x is the patient's right, +y anterior).
    world = nib.affines.apply_affine(volume.affine, np.argwhere(volume.array == 1)[0])
    corners = nib.affines.apply_affine(volume.affine, np.argwhere(np.ones(volume.array.shape, bool)))
    assert np.isclose(world[0], corners[:, 0].max()) and np.isclose(world[1], corners[:, 1].max())

    k = int(np.argwhere(volume.array == 1)[0][2])
    view = viz.radiological(volume.array[:, :, k])
    rows, cols = view.shape
    assert (rows, cols) == (SHAPE[1], SHAPE[0])
    assert tuple(np.argwhere(view == 1)[0]) == (0, 0)  # top row, viewer's left column
    assert tuple(np.argwhere(view == 2)[0]) == (rows - 1, cols - 1)


def test_show_slice_draws_the_radiological_view_and_the_overlay():
    image = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    mask = np.zeros((7, 5), dtype=np.uint8)
    mask[0, 4] = 1  # right, anterior
    fig, (plain, overlaid) = plt.subplots(1, 2)
    viz.show_slice(plain, image, title="ct")
    viz.show_slice(overlaid, image, mask)
    assert len(images_of(plain)) == 1 and len(images_of(overlaid)) == 2
    np.testing.assert_array_equal(images_of(plain)[0].get_array(), viz.radiological(image))
    alpha = np.asarray(images_of(overlaid)[1].get_array())[..., 3]
    assert tuple(np.argwhere(alpha > 0)[0]) == (0, 0) and np.count_nonzero(alpha) == 1
    assert plain.get_title() == "ct" and not plain.axison


# --------------------------------------------------------------------------- figure builders


def stacks(z=6, size=8):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(z, size, size)).astype(np.float32)
    truths = (rng.random((z, size, size)) > 0.8).astype(np.uint8)
    predictions = (rng.random((z, size, size)) > 0.8).astype(np.uint8)
    return images, truths, predictions


def test_slice_grid_has_a_row_per_valid_slice_and_three_columns():
    images, truths, predictions = stacks()
    fig = viz.slice_grid(images, predictions, truths, slices=[1, 4, 99, -1], title="study")
    assert isinstance(fig, matplotlib.figure.Figure)
    axes = fig.get_axes()
    assert len(axes) == 2 * 3  # slices 99 and -1 do not exist and are left out
    assert [len(images_of(ax)) for ax in axes] == [1, 2, 2] * 2  # CT | CT + prediction | CT + truth
    assert axes[0].get_title() == "CT, slice 1" and axes[3].get_title() == "CT, slice 4"
    assert fig._suptitle.get_text() == "study"


def test_comparison_grid_has_a_column_per_model():
    images, truths, predictions = stacks()
    models = {"unet": predictions, "unet-vgg19": 1 - predictions, "unet-resnet34": truths}
    fig = viz.comparison_grid(images, truths, models, slices=[0, 2, 5])
    axes = fig.get_axes()
    assert len(axes) == 3 * (2 + len(models))
    assert [len(images_of(ax)) for ax in axes[:5]] == [1, 2, 2, 2, 2]
    assert [ax.get_title() for ax in axes[1:5]] == ["ground truth", *models]


def test_learning_curve_plots_loss_and_validation_dice_by_epoch():
    history = [{"epoch": e, "train_loss": 0.9 - 0.2 * e, "val_dice": 0.2 + 0.1 * e} for e in range(3)]
    fig = viz.learning_curve(history, title="unet")
    (ax,) = fig.get_axes()
    loss, val = ax.get_lines()
    assert list(loss.get_xdata()) == [1, 2, 3]  # epochs counted from 1
    np.testing.assert_allclose(loss.get_ydata(), [0.9, 0.7, 0.5])
    np.testing.assert_allclose(val.get_ydata(), [0.2, 0.3, 0.4])
    assert ax.get_ylim() == (0, 1)

    above_one = viz.learning_curve([{"epoch": 0, "train_loss": 1.4, "val_dice": 0.1}])  # BCE + Dice
    assert above_one.get_axes()[0].get_ylim() == (0, 1.4)

    marked = viz.learning_curve(history, best_epoch=1)
    lines = marked.get_axes()[0].get_lines()
    assert len(lines) == 3 and list(lines[2].get_xdata()) == [2, 2]  # the kept epoch, counted from 1


def test_hu_histogram_marks_the_clipping_window():
    hu = np.concatenate([np.full(500, -1000), np.full(300, -850), np.full(200, 40), np.full(10, 1500)])
    fig = viz.hu_histogram(hu, clip=(-1000.0, 1000.0))
    (ax,) = fig.get_axes()
    heights = np.array([patch.get_height() for patch in ax.patches])
    assert heights.sum() == hu.size  # every voxel is counted, the +1500 ones included
    edges = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert edges == [-1000.0, 1000.0]
    assert ax.get_yscale() == "log"


# --------------------------------------------------------------------------- slice browser


def test_slice_browser_starts_on_the_slice_with_most_lesion_and_leaves_no_figure_open():
    pytest.importorskip("ipywidgets")
    from covidseg.widgets import slice_browser

    images, truths, predictions = stacks(z=5)
    truths[:] = 0
    truths[3, 1:4, 1:4] = 1
    truths[1, 0, 0] = 1
    browser = slice_browser(images, truths, predictions)
    slider = browser.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 4, 3)
    slider.value = 0  # redraws
    assert plt.get_fignums() == []  # each drawn figure is shown once and closed
    assert slice_browser(images).children[0].value == 2  # no mask: the middle slice


# --------------------------------------------------------------------------- import side effects


def test_importing_the_package_changes_no_matplotlib_state_and_imports_no_widgets():
    code = textwrap.dedent(
        """
        import sys
        import matplotlib
        before = dict(matplotlib.rcParams)
        import covidseg, covidseg.viz, covidseg.widgets
        after = dict(matplotlib.rcParams)
        changed = sorted(k for k in before if before[k] != after[k])
        assert not changed, f"rcParams changed at import: {changed}"
        assert "ipywidgets" not in sys.modules, "ipywidgets imported at import time"
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported at import time"
        print("clean")
        """
    )
    # A fixed backend: reading rcParams["backend"] while it is unresolved would import pyplot itself.
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
