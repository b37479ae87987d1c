"""The embedded synthetic chest-CT dataset ("phantom"), written in MosMedData's exact layout.

The real CT volumes of MosMedData COVID19_1110 (Morozov et al., 2020, arXiv:2005.06465) cannot be
redistributed and are large, so CI, the book and the command line default to this phantom. It is
**synthetic, not patient data**: every folder it writes carries a :data:`PHANTOM_MARKER` file
saying so, and every NIfTI header says so in its ``descrip`` field. It is written in the
dataset's own layout (``studies/CT-k/study_NNNN.nii.gz``, ``masks/study_NNNN_mask.nii.gz``,
``dataset_registry.csv``), so all code reads it exactly as it reads the real data.

What is in it:

- the 50 annotated CT-1 studies 0255..0304, with masks, each with the real study's number of
  axial slices (2049 in all, so the thesis split keeps its 1428/212/409 slices, Table 3.1), and
  a lesion burden drawn from the real study's own mask: about the same share of voxels
  (mean 0.19%) on about the same number of slices (38% on average);
- two unannotated studies (no mask) of each other category, with ids in the real ranges and
  lesions over 0% (CT-0), 25-50% (CT-2), 50-75% (CT-3) and over 75% (CT-4) of the lungs.

Each study is a simple but plausible chest in Hounsfield units, slice by slice along z: air,
skin, subcutaneous fat and muscle, ribs sloping around the thorax, sternum, scapulae, a vertebra
with its disc rhythm, mediastinal fat, heart, aorta, the great vessels, trachea and main
bronchi, two lungs (about -850 HU) with lobulated borders and the oblique and horizontal
fissures, a tree of pulmonary vessels that thins towards the pleura with bronchi (an air lumen in
a soft-tissue wall) beside its arteries, and the liver dome and stomach under the diaphragm in
the lowest slices; outside the body, the patient table under the back and, in about a third of
the studies, the arms beside the chest (:mod:`.anatomy`, :mod:`.vessels`). Lesions are hazy
ground-glass patches (about -700..-300 HU), some with a consolidated core (about -100..+50 HU),
mostly subpleural and posterior, always inside the lungs, their edges broken into many small
pieces so that the masks have the real masks' fragmentation (:mod:`.lesions`,
:mod:`.calibration`); the mask is ground glass and consolidation together. Partial volume over the
8 mm slab makes thin vessels faint and thick ones as dense as consolidation, so a model must tell
lesions from vessels by their shape, as on real scans. The scanner adds noise with the in-plane
grain of filtered back-projection and, in half of the studies, stores -2048 or -3024 outside the
reconstruction circle (:mod:`.acquisition`).

Geometry: the volumes are ``int16``, stored in LAS like the real files (affine
``diag(-dx, dx, 8)`` plus an offset, qform and sform code 1). ``dx`` is drawn per study in
0.6..0.9 mm *at 512 pixels*. A smaller ``size`` keeps the chest's physical field of view, so its
pixels are larger (``dx * 512 / size``): the headers stay truthful, and every anatomical size, the
lesion burden and the lesion slices hold at any ``size``; the fragmentation is calibrated at 512 px.

Determinism: study ``k`` of seed ``s`` comes from ``np.random.default_rng([s, k])`` alone, so a
subset of studies is the same as in the full dataset, and the same seed gives byte-identical
files (nibabel writes gzip without a time stamp or file name).
"""

from __future__ import annotations

from .constants import (
    PHANTOM_MARKER,
    PHANTOM_VERSION,
    PHANTOM_DESCRIPTION,
    UNANNOTATED_IDS,
    INVOLVEMENT,
    LABEL_NAMES,
    AIR,
    FAT,
    SOFT_TISSUE,
    BONE,
    LUNG,
    AIRWAY,
    LUNG_VESSEL,
    GROUND_GLASS,
    CONSOLIDATION,
    HEART,
    TABLE,
    LUNG_LABELS,
    LESION_LABELS,
)
from .study import generate_study
from .writing import (
    phantom_studies,
    write_phantom,
    is_phantom,
    default_phantom_dir,
    ensure_phantom,
)

__all__ = [
    "PHANTOM_MARKER",
    "PHANTOM_VERSION",
    "PHANTOM_DESCRIPTION",
    "UNANNOTATED_IDS",
    "INVOLVEMENT",
    "LABEL_NAMES",
    "AIR",
    "FAT",
    "SOFT_TISSUE",
    "BONE",
    "LUNG",
    "AIRWAY",
    "LUNG_VESSEL",
    "GROUND_GLASS",
    "CONSOLIDATION",
    "HEART",
    "TABLE",
    "LUNG_LABELS",
    "LESION_LABELS",
    "generate_study",
    "phantom_studies",
    "write_phantom",
    "is_phantom",
    "default_phantom_dir",
    "ensure_phantom",
]
