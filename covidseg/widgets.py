"""An interactive slice browser for notebooks (ipywidgets is imported only when it is called)."""

from __future__ import annotations

import numpy as np

from .viz import PREDICTION_COLOUR, TRUTH_COLOUR, show_slice

__all__ = ["slice_browser"]


def slice_browser(images: np.ndarray, masks: np.ndarray | None = None, predictions: np.ndarray | None = None, start: int | None = None):
    """A slider over the axial slices of one study, in radiological display.

    Args:
        images: ``(Z, H, W)`` preprocessed slices.
        masks: Optional ``(Z, H, W)`` expert masks, drawn in green.
        predictions: Optional ``(Z, H, W)`` predicted masks, drawn beside in red.
        start: First slice shown (default: the slice with most lesion, else the middle one).

    Returns:
        An ``ipywidgets.VBox`` (a live widget in Jupyter; static pages show the figure below it).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    if start is None:
        start = int(np.argmax(masks.reshape(len(masks), -1).sum(1))) if masks is not None and masks.any() else len(images) // 2
    panels = 1 + (predictions is not None)
    output = widgets.Output()

    def draw(k: int) -> None:
        with output:
            output.clear_output(wait=True)
            fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4), squeeze=False)
            truth = None if masks is None else masks[k]
            show_slice(axes[0, 0], images[k], truth, TRUTH_COLOUR, f"slice {k} / {len(images) - 1}: ground truth")
            if predictions is not None:
                show_slice(axes[0, 1], images[k], predictions[k], PREDICTION_COLOUR, "prediction")
            # display() shows this figure only, on any backend (plt.show(fig) fails on Agg), and
            # closing it keeps it from being shown a second time at the end of the cell.
            display(fig)
            plt.close(fig)

    slider = widgets.IntSlider(value=start, min=0, max=len(images) - 1, description="slice", continuous_update=False)
    slider.observe(lambda change: draw(change["new"]), names="value")
    draw(start)
    return widgets.VBox([slider, output])
