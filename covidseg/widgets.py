"""An interactive slice browser for notebooks (ipywidgets is imported only when it is called)."""

from __future__ import annotations

import base64
import io

import numpy as np

from .viz import LUNG_WINDOW, PREDICTION_COLOUR, TRUTH_COLOUR, show_slice, truth_label

__all__ = ["slice_browser"]


def _png(fig) -> str:
    """The figure as a base64 PNG, as notebooks store ``image/png`` outputs."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def slice_browser(images: np.ndarray, masks: np.ndarray | None = None, predictions: np.ndarray | None = None,
                  start: int | None = None, window=LUNG_WINDOW, *, source):
    """A slider over the axial slices of one study, in radiological display.

    In Jupyter or Colab the slider redraws the slice. A static page (the built book) cannot run
    Python behind a slider, so the widget also carries a PNG of its first view in its rich
    output: renderers that do not show widgets show that image instead (``_config.yml`` tells
    MyST-NB to prefer it).

    Args:
        images: ``(Z, H, W)`` preprocessed slices.
        masks: Optional ``(Z, H, W)`` reference masks, drawn in green.
        predictions: Optional ``(Z, H, W)`` predicted masks, drawn beside in red.
        start: First slice shown (default: the slice with most lesion, else the middle one).
        window: Display range in the images' units (the lung window by default).
        source: What the data came from (see :func:`covidseg.viz.data_of`); the phantom is stamped.

    Returns:
        An ``ipywidgets.VBox`` of the slider and the drawing, with a static PNG of slice ``start``.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    if start is None:
        start = int(np.argmax(masks.reshape(len(masks), -1).sum(1))) if masks is not None and masks.any() else len(images) // 2
    panels = 1 + (predictions is not None)
    reference = truth_label(source)

    def figure(k: int):
        fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.7), squeeze=False, layout="constrained")
        truth = None if masks is None else masks[k]
        show_slice(axes[0, 0], images[k], truth, TRUTH_COLOUR, f"slice {k} / {len(images) - 1}: {reference}",
                   window=window, source=source)
        if predictions is not None:
            show_slice(axes[0, 1], images[k], predictions[k], PREDICTION_COLOUR, "prediction", window=window, source=source)
        return fig

    output = widgets.Output()

    def draw(k: int) -> None:
        with output:
            output.clear_output(wait=True)
            fig = figure(k)
            # display() shows this figure only, on any backend (plt.show(fig) fails on Agg), and
            # closing it keeps it from being shown a second time at the end of the cell.
            display(fig)
            plt.close(fig)

    first = figure(start)
    static = _png(first)
    plt.close(first)

    class SliceBrowser(widgets.VBox):
        def _repr_mimebundle_(self, **kwargs):
            bundle = dict(super()._repr_mimebundle_(**kwargs) or {})
            bundle["image/png"] = static
            return bundle

    slider = widgets.IntSlider(value=start, min=0, max=len(images) - 1, description="slice", continuous_update=False)
    slider.observe(lambda change: draw(change["new"]), names="value")
    draw(start)
    return SliceBrowser([slider, output])
