"""The body of a synthetic study: its geometry drawn per study, and the rendering of one axial slice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import (
    AIR,
    AIRWAY,
    AIR_HU,
    ARMS_DOWN_CHANCE,
    BLOOD_HU,
    BONE,
    CANCELLOUS_BONE_HU,
    CARTILAGE_HU,
    CORTICAL_BONE_HU,
    CSF_HU,
    DISC_HU,
    FISSURE_HU,
    FAT,
    FAT_HU,
    HEART,
    HEART_HU,
    LIVER_HU,
    LUNG,
    LUNG_HU,
    MEDIASTINAL_FAT_HU,
    MUSCLE_HU,
    NOISE_STD_HU,
    PIXEL_SPACING_512_MM,
    SKIN_HU,
    SLICES_RANGE,
    SLICE_SPACING_MM,
    SOFT_TISSUE,
    SPLEEN_HU,
    STOMACH_HU,
    TABLE,
    TABLE_CORE_HU,
    TABLE_SHELL_HU,
)
from .geometry import _band, _capsule, _clip01, _ellipse, _profile, _window


STANDARD_HALF_WIDTH_MM = 160.0  # body half-width of the standard patient; anatomy scales with it
LUNG_HEIGHT_MM = (235.0, 285.0)
BODY_SHAPE_EXPONENT = 2.4  # superellipse of the body outline
RIB_HALF_HEIGHT_MM = 4.5
AIRWAY_WALL = 1.45  # squared normalised radius of an airway wall's outer edge
LOBULATION = 0.07  # depth of the lungs' lobulated border, in squared normalised radius of the cavity
LOBULATION_WAVES = (3, 5, 8, 13)  # angular frequencies of the lobulation
FISSURE_HALF_WIDTH_MM = 1.0  # distance along z from a fissure's surface at which its line fades out
TABLE_LAYERS_MM = (2.5, 32.0, 2.5)  # the table's top shell, foam core and bottom shell


@dataclass(frozen=True)
class _Shape:
    """A mediastinal or spinal structure of one axial level.

    ``params`` are an ellipse's ``(cx, cy, a, b, angle)`` or a capsule's ``(x0, y0, x1, y1, r)``
    in body-centred mm; ``active`` says whether it is present at that level.
    """

    kind: str
    params: tuple
    active: object
    hu: float
    label: int
    keep_out: float = 1.0  # the lung stays where the squared normalised distance >= keep_out
    texture: float = 0.0  # HU amplitude of the smooth texture
    above_diaphragm: bool = False

    def dist(self, X, Y):
        """Squared normalised distance to the structure (inside where below 1)."""
        if self.kind == "ellipse":
            return _ellipse(X, Y, *self.params)
        return _capsule(X, Y, *self.params)

    def box(self, level):
        """``(xmin, xmax, ymin, ymax)`` enclosing ``dist < level`` (scalar parameters)."""
        s = np.sqrt(level)
        if self.kind == "ellipse":
            cx, cy, a, b, _ = self.params
            r = max(a, b) * s
            return cx - r, cx + r, cy - r, cy + r
        x0, y0, x1, y1, r = self.params
        return min(x0, x1) - r * s, max(x0, x1) + r * s, min(y0, y1) - r * s, max(y0, y1) + r * s


@dataclass
class _Patient:
    """Body geometry of one synthetic study, in mm.

    Coordinates: ``X`` runs to the patient's left, ``Y`` anteriorly, both from the body's centre;
    ``z`` runs superiorly from the centre of slice 0. ``h`` is the height in the lungs, 0 at the
    lowest costophrenic recess and 1 at the apex. Sizes are those of a standard patient (body
    half-width :data:`STANDARD_HALF_WIDTH_MM`) times ``k``.
    """

    n_slices: int
    dx512: float
    k: float
    width: float
    depth_ant: float
    depth_post: float
    fat: float
    cx: float
    cy: float
    z_base: float
    lung_height: float
    dome_right: float
    dome_left: float
    carina: float
    heart: tuple
    lung_hu: float
    lung_gradient: float
    cancellous_hu: float
    disc_phase: float
    rib_phase: float
    noise_std: float
    origin: tuple
    arms_down: bool
    lobulation: tuple  # (amplitude, phase, twist along h) per wave of LOBULATION_WAVES
    fissures: tuple  # top of the right and left oblique fissures, height of the horizontal one (lung height)

    @property
    def a_c(self):  # pleural cavity half-width
        return self.width - self.fat - 24.0 * self.k

    @property
    def b_ant(self):
        return self.depth_ant - self.fat - 24.0 * self.k

    @property
    def b_post(self):
        return self.depth_post - self.fat - 28.0 * self.k

    @property
    def y_vb(self):  # vertebral body centre
        return -self.b_post + 30.0 * self.k

    def h_of_z(self, z):
        return (np.asarray(z, dtype=float) - self.z_base) / self.lung_height

    def trachea_y(self, h):
        return self.y_vb + 42.0 * self.k + 16.0 * self.k * _clip01((h - 0.95) / 0.3)

    # regions, broadcasting over X and Y ------------------------------------------------------
    def cavity(self, X, Y):
        """Squared normalised radius of the pleural cavity (an ellipse with a longer front half)."""
        b = np.where(Y > 0, self.b_ant, self.b_post)
        return (X / self.a_c) ** 2 + (Y / b) ** 2

    def diaphragm(self, X, Y):
        """Lung height of the diaphragm at each point (the abdomen lies below it)."""
        a = self.a_c
        by = 0.5 * (self.b_ant + self.b_post)
        ry = ((Y - 0.1 * self.b_ant) / by) ** 2 + 0.12 * np.clip(-Y / self.b_post, 0.0, 1.0) / 0.33
        right = -0.33 * ((X + 0.42 * a) / (0.6 * a)) ** 2 + self.dome_right
        left = -0.33 * ((X - 0.42 * a) / (0.6 * a)) ** 2 + self.dome_left
        return np.maximum(right, left) - 0.33 * ry

    def apex(self, X, Y, h):
        """Each lung narrows to a posterolateral dome towards h = 1."""
        limit = 1.25 * np.sqrt(_clip01(1.0 - ((np.maximum(h, 0.5) - 0.5) / 0.5) ** 2))
        by = 0.5 * (self.b_ant + self.b_post)
        r = ((np.abs(X) - 0.45 * self.a_c) / (0.62 * self.a_c)) ** 2 + ((Y + 0.1 * by) / (1.15 * by)) ** 2
        return r < limit * limit

    def pleural_limit(self, X, Y, h):
        """The lungs' border in the cavity's squared normalised radius: lobulated, between
        ``1 - LOBULATION`` and 1, changing slowly along the lung height ``h``."""
        theta = np.arctan2(Y, X)
        wave = sum(a * np.cos(n * theta + phase + twist * h) for n, (a, phase, twist) in zip(LOBULATION_WAVES, self.lobulation))
        total = sum(a for a, _, _ in self.lobulation)
        return 1.0 - LOBULATION * (0.5 + 0.5 * wave / total)

    def oblique_fissure(self, X, Y):
        """Lung height of the oblique fissures: from high at the back to the diaphragm at the front,
        each lung its own (the right one, X < 0, and the left one)."""
        top = np.where(X < 0, self.fissures[0], self.fissures[1])
        t = np.clip((Y + self.b_post) / (self.b_ant + self.b_post), 0.0, 1.0)
        lateral = ((np.abs(X) - 0.5 * self.a_c) / (0.5 * self.a_c)) ** 2
        return top - (top - 0.02) * t + 0.03 * lateral

    def horizontal_fissure(self, X, Y):
        """Lung height of the right lung's horizontal fissure (a shallow dome)."""
        r2 = ((X + 0.5 * self.a_c) / (0.7 * self.a_c)) ** 2 + ((Y - 0.2 * self.b_ant) / (0.8 * self.b_ant)) ** 2
        return self.fissures[2] - 0.06 * r2

    def fissure_lines(self, X, Y, z, dx):
        """Rise (0..1) of the fissures' lines on the slice at height ``z`` (mm): where the
        surfaces cross the slice, over a width of about :data:`FISSURE_HALF_WIDTH_MM` (at least
        most of a pixel ``dx``)."""
        tol = max(FISSURE_HALF_WIDTH_MM, 0.6 * dx)
        h = self.h_of_z(z)
        oblique = self.oblique_fissure(X, Y)
        d_oblique = np.abs(z - (self.z_base + oblique * self.lung_height))
        d_horizontal = np.abs(z - (self.z_base + self.horizontal_fissure(X, Y) * self.lung_height))
        d_horizontal = np.where((X < 0) & (oblique < h), d_horizontal, np.inf)  # right lung, in front of the oblique
        return _clip01(1.0 - np.minimum(d_oblique, d_horizontal) / tol)

    def mediastinum_band(self, X, Y, h):
        """The mediastinum between the lungs: a thin anterior junction, wider behind the heart."""
        k = self.k
        width = 3.0 * k + 13.0 * k * np.clip((0.55 * self.b_ant - Y) / (0.55 * self.b_ant), 0.0, 1.0)
        width = width + 14.0 * k * _clip01((h - 0.85) / 0.15)
        return (np.abs(X - 2.0 * k) < width) & (Y > self.y_vb - 5.0 * k)

    def structures(self, h, z=None):
        """The mediastinal and spinal structures at lung height ``h``, in painting order."""
        k, S = self.k, _Shape
        ytr = self.trachea_y(h)
        xd, yd = 22.0 * k, self.y_vb + 12.0 * k  # descending aorta
        asc = (-10.0 * k, 0.25 * self.b_ant)
        trunk = (14.0 * k, 0.35 * self.b_ant)
        dxh, dyh, scale, angle = self.heart
        prof = scale * _profile(h, -0.01, 0.57)
        hx, hy, ha, hb = 20.0 * k + dxh, 0.2 * self.b_ant + dyh, 56.0 * k * prof, 43.0 * k * prof
        heart_on = prof > 0.05

        def on(lo, hi):
            return lo < h < hi

        def vessel(kind, params, active):
            return S(kind, params, active, BLOOD_HU, SOFT_TISSUE, keep_out=1.15, texture=4.0)

        shapes = [
            S("ellipse", (hx, hy, ha + 5.0 * k, hb + 5.0 * k, angle), heart_on, FAT_HU, FAT, 1.0, 20.0, True),
            S("ellipse", (hx, hy, ha, hb, angle), heart_on, HEART_HU, HEART, 1.0, 5.0, True),
            vessel("ellipse", (*asc, 15.0 * k, 15.0 * k, 0.0), on(0.50, 0.83)),
            vessel("ellipse", (-30.0 * k, 0.18 * self.b_ant, 10.0 * k, 10.0 * k, 0.0), on(0.55, 0.98)),
            vessel("ellipse", (*trunk, 13.0 * k, 13.0 * k, 0.0), on(0.49, 0.62)),
            vessel("capsule", (5.0 * k, 0.3 * self.b_ant, -38.0 * k, ytr - 8.0 * k, 8.5 * k), on(0.55, 0.61)),
            vessel("capsule", (*trunk, 38.0 * k, ytr - 8.0 * k, 8.5 * k), on(0.60, 0.66)),
            vessel("capsule", (*asc, xd, yd, 12.5 * k), on(0.82, 0.88)),
            vessel("ellipse", (xd, yd, 11.0 * k, 11.0 * k, 0.0), h < 0.85),
            vessel("ellipse", (-10.0 * k, ytr + 14.0 * k, 6.5 * k, 6.5 * k, 0.0), on(0.87, 1.3)),
            vessel("ellipse", (7.0 * k, ytr + 11.0 * k, 4.5 * k, 4.5 * k, 0.0), on(0.87, 1.3)),
            vessel("ellipse", (15.0 * k, ytr + 1.0 * k, 5.5 * k, 5.5 * k, 0.0), on(0.87, 1.3)),
            vessel("ellipse", (-26.0 * k, ytr + 20.0 * k, 8.0 * k, 8.0 * k, 0.0), on(0.86, 1.3)),
            vessel("capsule", (28.0 * k, ytr + 22.0 * k, -20.0 * k, ytr + 27.0 * k, 6.0 * k), on(0.86, 0.93)),
            # oesophagus, with a margin of mediastinal fat
            S("ellipse", (2.0 * k, self.y_vb + 24.0 * k, 8.0 * k, 6.0 * k, 0.0), True, MUSCLE_HU, SOFT_TISSUE, 1.9),
        ]
        # spine: paraspinal muscles, posterior elements, canal, vertebral body (disc rhythm)
        yv = self.y_vb
        disc = 0.0 if z is None else self._disc_fraction(z)
        cortex = CORTICAL_BONE_HU + disc * (DISC_HU - CORTICAL_BONE_HU)
        marrow = self.cancellous_hu + disc * (DISC_HU - self.cancellous_hu)
        posterior_bone = 0.5 * (CORTICAL_BONE_HU + self.cancellous_hu)
        shapes += [
            S("ellipse", (-27.0 * k, yv - 26.0 * k, 19.0 * k, 19.0 * k, 0.0), True, MUSCLE_HU, SOFT_TISSUE, 1.0, 8.0),
            S("ellipse", (27.0 * k, yv - 26.0 * k, 19.0 * k, 19.0 * k, 0.0), True, MUSCLE_HU, SOFT_TISSUE, 1.0, 8.0),
            S("ellipse", (-20.0 * k, yv - 20.0 * k, 11.0 * k, 4.0 * k, -0.35), True, posterior_bone, BONE, 0.0),
            S("ellipse", (20.0 * k, yv - 20.0 * k, 11.0 * k, 4.0 * k, 0.35), True, posterior_bone, BONE, 0.0),
            S("ellipse", (0.0, yv - 40.0 * k, 3.5 * k, 10.0 * k, 0.0), True, posterior_bone, BONE, 0.0),
            S("ellipse", (0.0, yv - 22.0 * k, 11.5 * k, 11.5 * k, 0.0), True, posterior_bone, BONE, 0.0),
            S("ellipse", (0.0, yv - 22.0 * k, 7.5 * k, 7.5 * k, 0.0), True, CSF_HU, SOFT_TISSUE, 0.0),
            S("ellipse", (0.0, yv, 16.0 * k, 14.0 * k, 0.0), True, cortex, BONE, 1.4),
            S("ellipse", (0.0, yv, 14.0 * k, 12.0 * k, 0.0), True, marrow, BONE, 0.0),
        ]
        return shapes

    def airways(self, h):
        """Trachea, main and lower-lobe bronchi at lung height ``h`` (lumens; walls around them)."""
        k, S = self.k, _Shape
        ytr = self.trachea_y(h)
        u = _clip01((self.carina - h) / 0.12)
        v = _clip01((self.carina - 0.12 - h) / 0.16)
        main = (h <= self.carina) & (h > self.carina - 0.12)
        lobar = (h <= self.carina - 0.12) & (h > self.carina - 0.28)
        return [
            S("ellipse", (0.0, ytr, 8.5 * k, 8.0 * k, 0.0), h > self.carina, AIR_HU, AIRWAY, 0.0),
            S("ellipse", (-(5.0 + 30.0 * u) * k, ytr - 4.0 * k * u, 6.5 * k, 6.0 * k, 0.0), main, AIR_HU, AIRWAY, 0.0),
            S("ellipse", ((5.0 + 36.0 * u) * k, ytr - 6.0 * k * u, 6.0 * k, 5.5 * k, 0.0), main, AIR_HU, AIRWAY, 0.0),
            S("ellipse", (-(35.0 + 8.0 * v) * k, ytr - (4.0 + 14.0 * v) * k, 4.5 * k, 4.0 * k, 0.0), lobar, AIR_HU, AIRWAY, 0.0),
            S("ellipse", ((41.0 + 8.0 * v) * k, ytr - (6.0 + 14.0 * v) * k, 4.5 * k, 4.0 * k, 0.0), lobar, AIR_HU, AIRWAY, 0.0),
        ]

    # one axial slice ---------------------------------------------------------------------
    def place_structures(self, xs, ys, h, z=None):
        """The structures present at lung height ``h`` (scalar), each with the index window of
        the grid ``xs`` x ``ys`` that holds it and its squared normalised distance there."""
        X, Y = xs[:, None], ys[None, :]
        placed = []
        for s in self.structures(h, z):
            if s.active:
                win = _window(xs, ys, s.box(max(s.keep_out, 1.0)))
                placed.append((s, win, s.dist(X[win[0]], Y[:, win[1]])))
        return placed

    def lung_slice(self, xs, ys, h, placed, cav=None):
        """Where the lungs are on the grid ``xs`` x ``ys`` at lung height ``h``: in the cavity,
        under the apex, above the diaphragm, outside the mediastinum and clear of the structures
        ``placed`` by :meth:`place_structures` (evaluated only in their windows)."""
        X, Y = xs[:, None], ys[None, :]
        cav = self.cavity(X, Y) if cav is None else cav
        lung = (cav < self.pleural_limit(X, Y, h)) & self.apex(X, Y, h) & ~self.mediastinum_band(X, Y, h) & (h <= 1.0)
        if h < max(self.dome_right, self.dome_left):  # the diaphragm is nowhere higher
            lung &= h >= self.diaphragm(X, Y)
        for s, win, d in placed:
            if s.keep_out > 0:
                lung[win] &= d >= s.keep_out
        return lung

    def render_slice(self, xs, ys, z, texture):
        """HU (float32), labels (uint8) and lung (bool) of the axial slice at height ``z`` (mm).

        ``xs`` and ``ys`` are the body-centred coordinates (mm, ascending) of the pixel centres
        along axes 0 and 1; ``texture`` is a smooth unit random field of the slice. Small
        structures are evaluated only inside their bounding boxes.
        """
        k = self.k
        h = float(self.h_of_z(z))
        X, Y = xs[:, None], ys[None, :]
        shape = (len(xs), len(ys))
        hu = np.full(shape, AIR_HU, dtype=np.float32)
        lab = np.zeros(shape, dtype=np.uint8)

        def paint(where, value, label, amp=0.0):
            hu[where] = value + amp * texture[where] if amp else value
            lab[where] = label

        # body wall: skin, subcutaneous fat, muscle (a superellipse, flatter at the back)
        width = self.width * (1.0 - 0.05 * _clip01((h - 0.85) / 0.3))
        d_ant = self.depth_ant * (1.0 + 0.05 * _clip01(-h / 0.4))

        def wall(inset):
            bx = np.abs(xs / (width - inset)) ** BODY_SHAPE_EXPONENT
            by = np.abs(ys / np.where(ys > 0, d_ant - inset, self.depth_post - inset)) ** BODY_SHAPE_EXPONENT
            return bx[:, None] + by[None, :] < 1.0

        paint(wall(0.0), SKIN_HU, SOFT_TISSUE)
        paint(wall(1.8 * k), FAT_HU, FAT, 25.0)
        muscle = wall(self.fat)
        paint(muscle, MUSCLE_HU, SOFT_TISSUE, 8.0)
        if self.arms_down:
            self._paint_arms(paint, lab, X, Y)
        self._paint_table(paint, lab, X, Y)

        # pleural cavity, filled with mediastinal fat by default; ribs, scapulae and sternum
        cav = self.cavity(X, Y)
        inside = cav < 1.0
        paint(inside, MEDIASTINAL_FAT_HU, FAT, 30.0)
        paint(inside & (cav >= 1.0 - LOBULATION), MUSCLE_HU, SOFT_TISSUE, 8.0)  # chest wall along the lobulated lungs
        self._paint_ribs(hu, lab, X, Y, z, h, cav, muscle)
        ster = _band(h, 0.08, 1.02, 0.04)
        if ster > 0.05:
            wide = 1.0 + 0.6 * _clip01((h - 0.8) / 0.15)
            d = _ellipse(X, Y, 0.0, self.b_ant + 9.0 * k, 12.0 * k * wide, 5.5 * k)
            paint(d < 1.0, MUSCLE_HU + ster * (CORTICAL_BONE_HU - MUSCLE_HU), BONE)
            paint(d < 0.45, MUSCLE_HU + ster * (self.cancellous_hu - MUSCLE_HU), BONE)

        # abdomen under the diaphragm: liver on the right, stomach and spleen on the left
        abdomen = np.zeros(shape, dtype=bool)
        if h < max(self.dome_right, self.dome_left):
            dia = self.diaphragm(X, Y)
            abdomen = inside & (h < dia)
            liver = abdomen & (X < 0.18 * self.a_c - 0.3 * Y)
            paint(abdomen, STOMACH_HU, SOFT_TISSUE, 6.0)
            paint(liver, LIVER_HU, SOFT_TISSUE, 6.0)
            paint(abdomen & ~liver & (Y < 0.1 * self.b_post), SPLEEN_HU, SOFT_TISSUE, 6.0)
            bubble = _ellipse(X, Y, 0.5 * self.a_c, 0.3 * self.b_ant, 22.0 * k, 16.0 * k) < 1.0
            paint(abdomen & bubble & (dia - h < 0.04), AIR_HU, AIR)

        # lungs (denser posteriorly, where they depend)
        placed = self.place_structures(xs, ys, h, z)
        lung = self.lung_slice(xs, ys, h, placed, cav)
        dependent = np.clip(0.5 - ys / (self.b_ant + self.b_post), 0.0, 1.0)[None, :]
        hu[lung] = (self.lung_hu + self.lung_gradient * dependent + 12.0 * texture)[lung]
        lab[lung] = LUNG
        fissure = self.fissure_lines(X, Y, z, float(xs[1] - xs[0]))
        hu[lung] += (FISSURE_HU * fissure)[lung]

        # mediastinal structures and spine, then the airways
        for s, win, d in placed:
            where = d < 1.0
            if s.above_diaphragm:
                where &= ~abdomen[win]
            hu_w, lab_w = hu[win], lab[win]
            hu_w[where] = s.hu + s.texture * texture[win][where] if s.texture else s.hu
            lab_w[where] = s.label
        for s in (a for a in self.airways(h) if a.active):
            win = _window(xs, ys, s.box(AIRWAY_WALL))
            d = s.dist(X[win[0]], Y[:, win[1]])
            hu_w, lab_w = hu[win], lab[win]
            hu_w[d < AIRWAY_WALL], lab_w[d < AIRWAY_WALL] = SKIN_HU, SOFT_TISSUE
            hu_w[d < 1.0], lab_w[d < 1.0] = AIR_HU, AIRWAY
        return hu, lab, lung & (lab == LUNG)

    def _paint_arms(self, paint, lab, X, Y):
        """Upper arms beside the chest: skin and fat, muscle, and the humerus (cortex, fatty marrow)."""
        k = self.k
        for side in (-1.0, 1.0):
            cx, cy = side * (self.width + 10.0 * k + 40.0 * k), -0.15 * self.depth_post
            free = lab == AIR
            paint(free & (_ellipse(X, Y, cx, cy, 40.0 * k, 48.0 * k) < 1.0), FAT_HU, FAT)
            paint(free & (_ellipse(X, Y, cx, cy, 32.0 * k, 40.0 * k) < 1.0), MUSCLE_HU, SOFT_TISSUE)
            paint(free & (_ellipse(X, Y, cx, cy + 4.0 * k, 11.0 * k, 11.0 * k) < 1.0), CORTICAL_BONE_HU, BONE)
            paint(free & (_ellipse(X, Y, cx, cy + 4.0 * k, 7.0 * k, 7.0 * k) < 1.0), FAT_HU, BONE)

    def _paint_table(self, paint, lab, X, Y):
        """The patient table under the back: a concave carbon-fibre shell around a foam core."""
        half = 1.35 * self.width + (45.0 * self.k if self.arms_down else 0.0)
        top = -self.depth_post - 3.0 + 30.0 * (X / half) ** 2
        shell, core, bottom = TABLE_LAYERS_MM
        depth = top - Y
        under = (np.abs(X) < half) & (depth >= 0.0) & (lab == AIR)
        paint(under & (depth < shell + core + bottom), TABLE_SHELL_HU, TABLE)
        paint(under & (depth >= shell) & (depth < shell + core), TABLE_CORE_HU, TABLE)

    def _disc_fraction(self, z):
        """Share of the 8 mm slab taken by an intervertebral disc (6 mm discs every 26 mm)."""
        period, half_disc = 26.0 * self.k, 3.0 * self.k
        d = abs((z - self.disc_phase + period / 2) % period - period / 2)
        return float(np.clip(SLICE_SPACING_MM / 2 + half_disc - d, 0.0, 2 * half_disc) / SLICE_SPACING_MM)

    def _paint_ribs(self, hu, lab, X, Y, z, h, cav, muscle):
        """Twelve ribs sloping down from the spine to the front, each seen where it crosses the
        8 mm slab (partial volume), then costal cartilage; scapulae behind the upper ribs."""
        k = self.k
        r = np.sqrt(X * X + Y * Y) + 1e-6
        d_out = (1.0 - 1.0 / np.sqrt(np.maximum(cav, 1e-12))) * r  # approx. distance outside the cavity, mm
        near = (d_out > 1.0 * k) & (d_out < 21.0 * k) & muscle
        idx = np.nonzero(near)
        if not idx[0].size:
            return
        d = d_out[idx]
        p = np.arccos(np.clip(-np.broadcast_to(Y, r.shape)[idx] / r[idx], -1.0, 1.0)) / np.pi  # 0 back .. 1 front
        t = (d - 1.5 * k) / (8.0 * k)  # depth across the rib, 0..1
        in_rib = (t > 0.0) & (t < 1.0)
        half = RIB_HALF_HEIGHT_MM * k * np.sqrt(np.clip(1.0 - (2.0 * t - 1.0) ** 2, 0.0, 1.0))
        spacing = (self.lung_height + 60.0) / 11.5
        drop = 0.5 * self.lung_height
        best = np.zeros(p.shape)
        cartilage = np.zeros(p.shape, dtype=bool)
        pr, hr = p[in_rib][None, :], half[in_rib][None, :]
        rib = np.arange(12)[:, None]
        z_post = self.z_base + self.lung_height + 10.0 + self.rib_phase - rib * spacing
        z_rib = z_post - drop * np.clip((pr - 0.08) / 0.8, 0.0, 1.0)
        overlap = np.clip(np.minimum(z + 4.0, z_rib + hr) - np.maximum(z - 4.0, z_rib - hr), 0.0, 8.0) / 8.0
        end = np.where(rib < 7, 0.80, 0.80 - 0.06 * (rib - 6))  # the lower ribs are shorter
        best[in_rib] = np.where((pr > 0.07) & (pr < end), overlap, 0.0).max(axis=0, initial=0.0)
        cartilage[in_rib] = ((pr >= end) & (pr < 0.93) & (rib < 7) & (overlap > 0.4)).any(axis=0)
        rib_hu = np.where((t < 0.25) | (t > 0.75), CORTICAL_BONE_HU, self.cancellous_hu)
        values = hu[idx] + best * (rib_hu - hu[idx])
        values = np.where(cartilage, CARTILAGE_HU, values)
        labels = np.where((best > 0.5) | cartilage, BONE, lab[idx])
        scapula = _band(h, 0.5, 1.05, 0.05)
        if scapula > 0.05:
            blade = (d > 15.0 * k) & (d < 19.0 * k) & (p > 0.17) & (p < 0.42)
            values = np.where(blade, MUSCLE_HU + scapula * (0.7 * CORTICAL_BONE_HU - MUSCLE_HU), values)
            labels = np.where(blade & (scapula > 0.5), BONE, labels)
        hu[idx], lab[idx] = values, labels


def _draw_patient(rng, n_slices, min_lung_slices):
    """Draw a study's body geometry (always the same draws in the same order)."""
    dx512 = round(float(rng.uniform(*PIXEL_SPACING_512_MM)), 4)
    arms_down = bool(rng.random() < ARMS_DOWN_CHANCE)
    fill = rng.uniform(0.55, 0.62) if arms_down else rng.uniform(0.80, 0.88)  # the arms need room in the field of view
    drawn_slices = int(rng.integers(SLICES_RANGE[0], SLICES_RANGE[1] + 1))
    n = drawn_slices if n_slices is None else int(n_slices)
    width = dx512 * 256.0 * fill
    k = width / STANDARD_HALF_WIDTH_MM
    depth_ant = width * rng.uniform(0.72, 0.80)
    depth_post = width * rng.uniform(0.68, 0.74)
    fat = rng.uniform(6.0, 24.0) * k
    cx = rng.uniform(-8.0, 8.0)
    cy = rng.uniform(-22.0, 6.0)
    span = (n - 1) * SLICE_SPACING_MM
    lung_height = rng.uniform(*LUNG_HEIGHT_MM) * (0.9 + 0.1 * k)
    lung_height = float(np.clip(max(lung_height, (min_lung_slices + 3) * SLICE_SPACING_MM), 0.5 * span, span - 12.0))
    z_base = (span - lung_height) * rng.uniform(0.55, 0.8)
    heart = (rng.uniform(-4, 4) * k, rng.uniform(-4, 4) * k, rng.uniform(0.9, 1.12), rng.uniform(0.45, 0.75))
    return _Patient(
        n_slices=n,
        dx512=dx512,
        k=k,
        width=width,
        depth_ant=depth_ant,
        depth_post=depth_post,
        fat=fat,
        cx=cx,
        cy=cy,
        z_base=z_base,
        lung_height=lung_height,
        dome_right=rng.uniform(0.24, 0.32),
        dome_left=rng.uniform(0.17, 0.23),
        carina=rng.uniform(0.6, 0.66),
        heart=heart,
        lung_hu=rng.uniform(*LUNG_HU),
        lung_gradient=rng.uniform(20.0, 45.0),
        cancellous_hu=rng.uniform(*CANCELLOUS_BONE_HU),
        disc_phase=rng.uniform(0.0, 26.0),
        rib_phase=rng.uniform(-6.0, 6.0),
        noise_std=rng.uniform(*NOISE_STD_HU),
        origin=(rng.uniform(-25.0, 25.0), rng.uniform(-10.0, 10.0), -rng.uniform(900.0, 1300.0)),
        arms_down=arms_down,
        lobulation=tuple((float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.0, 2 * np.pi)), float(rng.uniform(-3.0, 3.0))) for _ in LOBULATION_WAVES),
        fissures=(float(rng.uniform(0.72, 0.8)), float(rng.uniform(0.68, 0.76)), float(rng.uniform(0.5, 0.56))),
    )
