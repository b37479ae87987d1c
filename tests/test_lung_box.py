"""The lungs' box: where prediction looks, and that the whole slice is the fallback."""

from __future__ import annotations

import numpy as np

from covidseg.lung_box import lung_box


def chest(size=256, slices=4, lungs=((96, 160, 60, 120), (96, 160, 136, 196))) -> np.ndarray:
    """Preprocessed slices (HU / 1000): air, an elliptical body at 40 HU, rectangular lungs at -850 HU."""
    rows, cols = np.mgrid[:size, :size]
    body = ((rows - size / 2) / (0.4 * size)) ** 2 + ((cols - size / 2) / (0.45 * size)) ** 2 <= 1
    plane = np.where(body, 0.04, -1.0)
    for r0, r1, c0, c1 in lungs:
        plane[r0:r1, c0:c1] = -0.85
    return np.repeat(plane[None], slices, axis=0).astype(np.float32)


def test_the_box_holds_the_lungs_with_a_margin_in_multiples_of_32():
    rows, cols = lung_box(chest(), margin=16)

    assert rows.start <= 96 - 16 and rows.stop >= 160 + 16
    assert cols.start <= 60 - 16 and cols.stop >= 196 + 16
    assert (rows.stop - rows.start) % 32 == 0 and (cols.stop - cols.start) % 32 == 0
    assert (rows.stop - rows.start, cols.stop - cols.start) == (96, 192)  # 64 + 32 -> 96; 136 + 32 -> 192


def test_air_outside_the_body_does_not_count():
    slices = chest()
    slices[:, :, :8] = -1.0  # the air at the edge, however wide, is outside
    slices[:, 4:12, 4:12] = 0.5  # an object in the air (a table, a cable) does not enclose it

    assert lung_box(slices, margin=16) == lung_box(chest(), margin=16)


def test_the_box_stays_inside_the_slice():
    rows, cols = lung_box(chest(lungs=((100, 150, 20, 90),)), margin=32)

    assert cols.start == 0 and cols.stop % 32 == 0 and cols.stop >= 90 + 32
    assert 0 <= rows.start and rows.stop <= 256


def test_without_enclosed_air_the_whole_slice_is_used():
    no_lungs = chest(lungs=())
    assert lung_box(no_lungs) == (slice(0, 256), slice(0, 256))
    assert lung_box(np.full((2, 64, 64), -1.0, dtype=np.float32)) == (slice(0, 64), slice(0, 64))


def test_a_box_that_would_not_fit_is_the_whole_slice():
    rows, cols = lung_box(chest(size=32, lungs=((10, 22, 8, 24),)), margin=2)

    assert (rows, cols) == (slice(0, 32), slice(0, 32))
