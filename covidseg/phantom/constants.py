"""The phantom's facts: its marker and version, categories, tissue labels, acquisition and
tissue densities (HU)."""

from __future__ import annotations

from ..preprocessing import AIR_HU  # noqa: F401  (-1000 HU by the scale's definition; phantom air too)

PHANTOM_MARKER = "SYNTHETIC_PHANTOM.txt"
"""File at the root of every phantom folder saying that the data is synthetic."""

PHANTOM_VERSION = 2
"""Version of the generator's output; part of the cache folder's name, bumped on any change."""

PHANTOM_DESCRIPTION = "covidseg synthetic phantom - not patient data"
"""Text of every phantom NIfTI header's ``descrip`` field."""

UNANNOTATED_IDS = {"CT-0": (12, 201), "CT-2": (947, 1021), "CT-3": (1071, 1098), "CT-4": (1109, 1110)}
"""Ids of the unannotated studies, two per category, within each category's real id range
(CT-0: 1..254, CT-2: 939..1063, CT-3: 1064..1108, CT-4: 1109..1110)."""

INVOLVEMENT = {"CT-0": (0.0, 0.0), "CT-2": (0.25, 0.50), "CT-3": (0.50, 0.75), "CT-4": (0.75, 0.92)}
"""Share of the lungs covered by lesion in the unannotated categories (CT-1 follows the real masks)."""

LABEL_NAMES = (
    "air",
    "fat",
    "soft_tissue",
    "bone",
    "lung",
    "airway",
    "lung_vessel",
    "ground_glass",
    "consolidation",
    "heart",
    "table",
)
"""Classes of the label map returned by ``generate_study(..., return_labels=True)``; a voxel's
label is its index in this tuple."""

AIR, FAT, SOFT_TISSUE, BONE, LUNG, AIRWAY, LUNG_VESSEL, GROUND_GLASS, CONSOLIDATION, HEART, TABLE = range(len(LABEL_NAMES))
LUNG_LABELS = (LUNG, LUNG_VESSEL, GROUND_GLASS, CONSOLIDATION)
"""Labels of the lung parenchyma (with its vessels, small airways, fissures and lesions)."""
LESION_LABELS = (GROUND_GLASS, CONSOLIDATION)
"""Labels of the mask: ground-glass opacification and consolidation."""

# --- Acquisition -----------------------------------------------------------------------------
SLICE_SPACING_MM = 8.0
PIXEL_SPACING_512_MM = (0.6, 0.9)  # in-plane spacing at 512 px, drawn per study
SLICES_RANGE = (33, 53)  # axial slices of an unannotated study (the real CT-1 range)
NOISE_STD_HU = (15.0, 30.0)  # per-pixel noise SD, drawn per study (see NOISE_GRAIN_MM)
NOISE_GRAIN_MM = 0.7  # in-plane correlation of the noise (Gaussian sigma), as after filtered back-projection
NOISE_NEGATIVE_LOBE = 0.6  # weight of the broad blur subtracted from the grain (the ramp filter's band-pass)
PADDING_VALUES = (-2048, -3024)  # stored outside the reconstruction circle by some scanners
PADDING_CHANCE = 0.5  # share of studies with a padded reconstruction circle
ARMS_DOWN_CHANCE = 0.35  # share of studies with the arms beside the chest (else above the head, out of view)
HU_RANGE = (-1024, 3071)
MIN_SIZE = 32  # smallest in-plane size in pixels

# --- Tissue densities (HU) ---------------------------------------------------------------------
# AIR_HU: covidseg.preprocessing.AIR_HU, imported above
FAT_HU = -100.0
MEDIASTINAL_FAT_HU = -85.0
SKIN_HU = 30.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
HEART_HU = 42.0
LIVER_HU = 58.0
SPLEEN_HU = 48.0
STOMACH_HU = 28.0
CSF_HU = 15.0
CARTILAGE_HU = 120.0
DISC_HU = 85.0
CANCELLOUS_BONE_HU = (200.0, 280.0)
CORTICAL_BONE_HU = 850.0
LUNG_HU = (-885.0, -855.0)
GROUND_GLASS_HU = (-640.0, -420.0)
CONSOLIDATION_HU = (-70.0, 30.0)
FISSURE_HU = 300.0  # peak rise over the lung on a fissure's line
TABLE_SHELL_HU = 250.0  # carbon-fibre shell of the patient table
TABLE_CORE_HU = -870.0  # its foam core
