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
from covidseg.phantom import PHANTOM_MARKER  # noqa: E402
from covidseg.run_card import RunCard  # noqa: E402
from covidseg.sources import PHANTOM, REAL  # noqa: E402

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
    viz.show_slice(plain, image, title="ct", source=REAL)
    viz.show_slice(overlaid, image, mask, source=REAL)
    assert len(images_of(plain)) == 1 and len(images_of(overlaid)) == 2
    np.testing.assert_array_equal(images_of(plain)[0].get_array(), viz.radiological(image))
    alpha = np.asarray(images_of(overlaid)[1].get_array())[..., 3]
    assert tuple(np.argwhere(alpha > 0)[0]) == (0, 0) and np.count_nonzero(alpha) == 1
    assert plain.get_title() == "ct" and not plain.axison
    assert not stamped(plain)  # real data carries no stamp


def test_show_overlap_colours_true_false_positives_and_misses():
    image = np.zeros((3, 3), np.float32)
    prediction = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    truth = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    fig, ax = plt.subplots()
    viz.show_overlap(ax, image, prediction, truth, source=REAL)
    layers = [np.asarray(im.get_array()) for im in images_of(ax)[1:]]
    assert len(layers) == 3
    for layer, region, name in zip(layers, (prediction & truth, prediction & ~truth, ~prediction & truth),
                                   ("true positive", "false positive", "false negative")):
        shown = layer[..., 3] > 0
        np.testing.assert_array_equal(shown, viz.radiological(region.astype(bool)))
        np.testing.assert_allclose(layer[shown][:, :3], [viz.OVERLAP_COLOURS[name]] * int(shown.sum()), atol=1e-6)


# --------------------------------------------------------------------------- figure builders


def stacks(z=6, size=8):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(z, size, size)).astype(np.float32)
    truths = (rng.random((z, size, size)) > 0.8).astype(np.uint8)
    predictions = (rng.random((z, size, size)) > 0.8).astype(np.uint8)
    return images, truths, predictions


def stamped(ax) -> bool:
    return any(text.get_text() == viz.PHANTOM_STAMP for text in ax.texts)


def test_slice_grid_has_one_overlap_panel_per_valid_slice_in_the_lung_window():
    images, truths, predictions = stacks()
    fig = viz.slice_grid(images, predictions, truths, slices=[1, 2, 4, 5, 99, -1], title="study", source=REAL)
    assert isinstance(fig, matplotlib.figure.Figure)
    axes = fig.get_axes()
    assert len(axes) == 4 + 2  # two rows of three: slices 99 and -1 do not exist; two empty panels
    assert [len(images_of(ax)) for ax in axes] == [4] * 4 + [0, 0]  # CT + TP/FP/FN layers
    assert [ax.get_title() for ax in axes[:4]] == ["slice 1", "slice 2", "slice 4", "slice 5"]
    assert images_of(axes[0])[0].get_clim() == viz.LUNG_WINDOW == (-1.35, 0.15)
    assert fig._suptitle.get_text() == "study"
    labels = [legend.get_title().get_text() for legend in fig.legends]
    assert labels == ["prediction against the expert mask"]


def test_comparison_grid_has_the_ct_and_a_column_per_model():
    images, truths, predictions = stacks()
    models = {"unet": predictions, "unet-vgg19": 1 - predictions, "unet-resnet34": truths}
    fig = viz.comparison_grid(images, truths, models, slices=[0, 2], source=REAL)
    axes = np.array(fig.get_axes()).reshape(1 + len(models), 2)  # a row per model, a column per slice
    assert [len(images_of(ax)) for ax in axes[:, 0]] == [1, 4, 4, 4]
    assert [ax.get_title() for ax in axes[:, 1]] == ["CT, slice 2"] + [f"{name}, slice 2" for name in models]
    assert images_of(axes[0, 0])[0].get_clim() == viz.LUNG_WINDOW


def test_learning_curve_plots_loss_and_validation_dice_by_epoch():
    history = [{"epoch": e, "train_loss": 0.9 - 0.2 * e, "val_dice": 0.2 + 0.1 * e} for e in range(3)]
    fig = viz.learning_curve(history, title="unet", source=REAL)
    (ax,) = fig.get_axes()
    loss, val = ax.get_lines()
    assert list(loss.get_xdata()) == [1, 2, 3]  # epochs counted from 1
    np.testing.assert_allclose(loss.get_ydata(), [0.9, 0.7, 0.5])
    np.testing.assert_allclose(val.get_ydata(), [0.2, 0.3, 0.4])
    assert ax.get_ylim() == (0, 1)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # whole epochs only
    legend = ax.get_legend().get_window_extent()
    assert legend.y1 <= ax.get_window_extent().y0  # the legend sits below the axes, off the data

    above_one = viz.learning_curve([{"epoch": 0, "train_loss": 1.4, "val_dice": 0.1}], source=REAL)  # BCE + Dice
    assert above_one.get_axes()[0].get_ylim() == (0, 1.4)

    marked = viz.learning_curve(history, best_epoch=1, source=REAL)
    lines = marked.get_axes()[0].get_lines()
    assert len(lines) == 3 and list(lines[2].get_xdata()) == [2, 2]  # the kept epoch, counted from 1


def test_hu_histogram_marks_the_clipping_window():
    hu = np.concatenate([np.full(500, -1000), np.full(300, -850), np.full(200, 40), np.full(10, 1500)])
    fig = viz.hu_histogram(hu, clip=(-1000.0, 1000.0), source=REAL)
    (ax,) = fig.get_axes()
    heights = np.array([patch.get_height() for patch in ax.patches if hasattr(patch, "get_height")])
    assert heights.sum() == hu.size  # every voxel is counted, the +1500 ones included
    edges = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert edges == [-1000.0, 1000.0]
    assert ax.get_yscale() == "log"


# --------------------------------------------------------------------------- the phantom stamp


def every_figure(source):
    images, truths, predictions = stacks()
    history = [{"epoch": e, "train_loss": 0.5, "val_dice": 0.5} for e in range(2)]
    fig, axes = plt.subplots(1, 2)
    viz.show_slice(axes[0], images[0], source=source)
    viz.show_overlap(axes[1], images[0], predictions[0], truths[0], source=source)
    return {
        "show_slice/show_overlap": fig,
        "slice_grid": viz.slice_grid(images, predictions, truths, [0, 1], source=source),
        "comparison_grid": viz.comparison_grid(images, truths, {"m": predictions}, [0], source=source),
        "learning_curve": viz.learning_curve(history, source=source),
        "hu_histogram": viz.hu_histogram(np.zeros(10), source=source),
        "interval_plot": viz.interval_plot({"m": (0.5, 0.4, 0.6)}, source=source),
    }


def test_every_figure_from_the_phantom_is_stamped_in_every_panel(tmp_path):
    phantom_dir = tmp_path / "phantom"
    phantom_dir.mkdir()
    (phantom_dir / PHANTOM_MARKER).write_text("synthetic")
    card = RunCard(data=PHANTOM, model="unet", device="cpu", epochs=1, image_size=8, seconds=1.0, preset="quick")
    for source in (PHANTOM, phantom_dir, card, {"run_card": card.__dict__}):
        for name, fig in every_figure(source).items():
            panels = [ax for ax in fig.get_axes() if ax.get_images() or ax.get_lines() or ax.patches or ax.collections]
            assert panels and all(stamped(ax) for ax in panels), f"{name} from {source!r} lacks the stamp"
            plt.close(fig)
    for name, fig in every_figure(REAL).items():
        assert not any(stamped(ax) for ax in fig.get_axes()), name


def test_no_text_of_any_figure_falls_outside_it():
    """Titles, tick labels, legends and stamps stay on the canvas, long row labels included."""
    from covidseg.models import UNet

    figures = every_figure(PHANTOM)
    figures["interval_plot, long names"] = viz.interval_plot(
        {"U-Net++ with a long descriptive name": (0.58, 0.51, 0.64), "FPN": (0.55, 0.47, 0.62)},
        reference={"FPN": 0.57}, null_value=0.5, title="mean per-study Dice", source=REAL)
    figures["architecture_diagram"] = viz.architecture_diagram(UNet(), "U-Net", image_size=64)
    for name, fig in figures.items():
        fig.canvas.draw()
        drawn, canvas = fig.get_tightbbox(), fig.bbox_inches  # what savefig(bbox_inches="tight") would keep
        slack = 1 / fig.dpi
        assert (drawn.x0 >= canvas.x0 - slack and drawn.y0 >= canvas.y0 - slack
                and drawn.x1 <= canvas.x1 + slack and drawn.y1 <= canvas.y1 + slack), \
            f"{name}: drawn over {drawn.bounds} in, the figure is {canvas.bounds} in"


def test_phantom_masks_are_called_phantom_labels():
    assert viz.truth_label(PHANTOM) == "phantom label" and viz.truth_label(REAL) == "expert mask"
    images, truths, predictions = stacks()
    fig = viz.slice_grid(images, predictions, truths, [0], source=PHANTOM)
    text = " ".join(legend.get_title().get_text() for legend in fig.legends)
    assert "phantom label" in text and "expert" not in text and "ground truth" not in text


def test_thesis_reference_is_refused_beside_phantom_results():
    with pytest.raises(ValueError, match="beside phantom"):
        viz.interval_plot({"m": (0.5, 0.4, 0.6)}, reference={"m": 0.6}, source=PHANTOM)
    fig = viz.interval_plot({"m": (0.5, 0.4, 0.6)}, reference={"m": 0.6}, source=REAL)
    assert len(fig.get_axes()[0].get_lines()) >= 1


def test_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the data of source"):
        viz.data_of("mosmed")
    with pytest.raises(ValueError, match="cannot tell"):
        viz.data_of(tmp_path / "missing")
    assert viz.data_of(tmp_path) == REAL  # a folder without the phantom's marker


# --------------------------------------------------------------------------- slice browser


def test_slice_browser_starts_on_the_slice_with_most_lesion_and_leaves_no_figure_open():
    pytest.importorskip("ipywidgets")
    from covidseg.widgets import slice_browser

    images, truths, predictions = stacks(z=5)
    truths[:] = 0
    truths[3, 1:4, 1:4] = 1
    truths[1, 0, 0] = 1
    browser = slice_browser(images, truths, predictions, source=PHANTOM)
    slider = browser.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 4, 3)
    slider.value = 0  # redraws
    assert plt.get_fignums() == []  # each drawn figure is shown once and closed
    assert slice_browser(images, source=REAL).children[0].value == 2  # no mask: the middle slice


def test_slice_browser_carries_a_static_png_for_published_pages():
    pytest.importorskip("ipywidgets")
    import base64

    from covidseg.widgets import slice_browser

    images, truths, _ = stacks(z=3)
    bundle = slice_browser(images, truths, source=PHANTOM)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # live in Jupyter
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")  # static elsewhere


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


# --------------------------------------------------------------------------- architecture diagrams


def test_unet_shapes_show_smp_dropping_vgg19s_full_resolution_map():
    from covidseg.models import build_model

    vgg = viz.unet_shapes(build_model("unet-vgg19", encoder_weights=None), image_size=64)
    assert vgg["encoder"][0] == (64, 64, 64)  # computed at stride 1 ...
    assert vgg["unused"] == [0] and 0 not in vgg["skips"]  # ... and never passed to the decoder
    assert vgg["skips"] == [4, 3, 2, 1, None]  # strides 16, 8, 4, 2; the last block has no skip
    assert vgg["decoder"][-1][1:] == (64, 64)
    resnet = viz.unet_shapes(build_model("unet-resnet34", encoder_weights=None), image_size=64)
    assert resnet["encoder"][0] == (1, 64, 64) and resnet["unused"] == []  # only the input: nothing lost
    unet = viz.unet_shapes(build_model("unet", width=8), image_size=64)
    assert unet["skips"] == [3, 2, 1, 0]  # chapter 5's U-Net uses its full-resolution map
    fig = viz.architecture_diagram(build_model("unet-vgg19", encoder_weights=None), "vgg19", image_size=64)
    texts = [t.get_text() for t in fig.get_axes()[0].texts]
    assert "64 × 64" in texts and any("unused" in t for t in texts)
