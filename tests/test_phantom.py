"""Tests of the synthetic phantom: layout, headers, anatomy in HU, lesion statistics, determinism
and the cache. The whole dataset is written once, at 64 px, for the module."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidseg.phantom import writing
from covidseg.errors import DataError
from covidseg.mosmed import ANNOTATED_IDS, annotated_studies, discover_studies
from covidseg.nifti import load_volume
from covidseg.phantom import (
    AIR,
    AIRWAY,
    BONE,
    CONSOLIDATION,
    FAT,
    GROUND_GLASS,
    HEART,
    INVOLVEMENT,
    LESION_LABELS,
    LUNG,
    LUNG_LABELS,
    LUNG_VESSEL,
    PHANTOM_MARKER,
    PHANTOM_VERSION,
    SOFT_TISSUE,
    TABLE,
    UNANNOTATED_IDS,
    default_phantom_dir,
    ensure_phantom,
    generate_study,
    is_phantom,
    write_phantom,
)
from covidseg.splits import get_split, mask_facts, slice_counts

from conftest import REPO

SIZE = 64
REAL_ID_RANGES = {"CT-0": (1, 254), "CT-2": (939, 1063), "CT-3": (1064, 1108), "CT-4": (1109, 1110)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "mosmed"
    write_phantom(root, size=SIZE, progress=False)
    return root


@pytest.fixture(scope="module")
def volumes(dataset):
    """``{study_id: (hu, mask or None, nibabel image)}`` of the written dataset."""
    out = {}
    for study in discover_studies(dataset):
        image = nib.load(study.image)
        mask = None if study.mask is None else np.asarray(nib.load(study.mask).dataobj)
        out[study.study_id] = (np.asarray(image.dataobj), mask, image)
    return out


# --- layout --------------------------------------------------------------------------------------
def test_layout_is_mosmeddata(dataset):
    studies = discover_studies(dataset)
    assert (dataset / "dataset_registry.csv").is_file()
    assert is_phantom(dataset)
    assert [s.study_id for s in annotated_studies(dataset)] == list(ANNOTATED_IDS)
    for s in studies:
        assert s.image == dataset / "studies" / s.category / f"study_{s.study_id:04d}.nii.gz"
        if s.mask is not None:
            assert s.mask == dataset / "masks" / f"study_{s.study_id:04d}_mask.nii.gz"
    by_category = {}
    for s in studies:
        by_category.setdefault(s.category, []).append(s)
    assert len(by_category["CT-1"]) == 50 and all(s.mask is not None for s in by_category["CT-1"])
    for category, (lo, hi) in REAL_ID_RANGES.items():
        found = by_category[category]
        assert len(found) == 2, category
        assert all(lo <= s.study_id <= hi and s.mask is None for s in found), category
    # nothing else in the folder: no leftovers of the temporary folder either
    assert sorted(p.name for p in dataset.iterdir()) == sorted(
        ["dataset_registry.csv", "masks", "studies", PHANTOM_MARKER]
    )
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]


def test_marker_says_synthetic(dataset):
    text = (dataset / PHANTOM_MARKER).read_text()
    assert "NOT PATIENT DATA" in text
    assert f"phantom_version: {PHANTOM_VERSION}" in text
    assert f"size: {SIZE}" in text and "seed: 0" in text


def test_registry_lists_only_the_studies_written(tmp_path):
    root = tmp_path / "subset"
    studies = write_phantom(root, size=32, annotated_ids=(256, 255), unannotated=False, progress=False)
    assert [s.study_id for s in studies] == [255, 256]
    assert [s.study_id for s in discover_studies(root)] == [255, 256]
    lines = (root / "dataset_registry.csv").read_text(encoding="utf-8-sig").splitlines()
    assert lines[1:] == [
        "255,CT-1,/studies/CT-1/study_0255.nii.gz,/masks/study_0255_mask.nii.gz",
        "256,CT-1,/studies/CT-1/study_0256.nii.gz,/masks/study_0256_mask.nii.gz",
    ]


# --- headers -------------------------------------------------------------------------------------
def test_headers_look_like_the_real_ones(volumes):
    for study_id, (hu, mask, image) in volumes.items():
        header = image.header
        assert hu.dtype == np.int16 and hu.shape[:2] == (SIZE, SIZE)
        assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
        assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
        dx, dy, dz = (float(v) for v in header.get_zooms())
        assert dx == pytest.approx(dy)
        assert 0.6 <= dx * SIZE / 512 <= 0.9  # the chest's field of view is kept at any size
        assert dz == 8.0
        assert np.allclose(np.diag(image.affine)[:3], [-dx, dx, 8.0], rtol=1e-5)
        assert b"synthetic" in header["descrip"].tobytes() and b"not patient data" in header["descrip"].tobytes()
        if mask is not None:
            assert mask.dtype == np.int16 and mask.shape == hu.shape
            assert set(np.unique(mask)) <= {0, 1}


def test_masks_share_their_studys_grid(dataset):
    for study in annotated_studies(dataset, ids=(255, 290)):
        image, mask = load_volume(study.image), load_volume(study.mask)
        assert np.array_equal(image.affine, mask.affine) and image.array.shape == mask.array.shape


def test_real_slice_counts(volumes):
    counts = {i: volumes[i][0].shape[2] for i in ANNOTATED_IDS}
    assert counts == slice_counts()
    assert sum(counts.values()) == 2049
    split = get_split("thesis")
    assert {part: sum(counts[i] for i in split.part(part)) for part in ("train", "val", "test")} == {
        "train": 1428,
        "val": 212,
        "test": 409,
    }


# --- lesion statistics ---------------------------------------------------------------------------
def test_lesion_burden_follows_the_real_masks(volumes):
    facts = mask_facts()
    fractions, slice_shares = [], []
    for study_id in ANNOTATED_IDS:
        mask = volumes[study_id][1]
        fraction = 100.0 * mask.mean()
        lesion_slices = int((mask.sum(axis=(0, 1)) > 0).sum())
        fractions.append(fraction)
        slice_shares.append(lesion_slices / mask.shape[2])
        assert lesion_slices == facts[study_id]["lesion_slices"], study_id
        # at 64 px the smallest real lesion is a fraction of a voxel: allow one voxel a slice
        slack = 100.0 * lesion_slices / mask.size
        assert abs(fraction - facts[study_id]["lesion_percent"]) <= 0.05 * facts[study_id]["lesion_percent"] + slack
    assert 0.10 <= np.mean(fractions) <= 0.35  # real: 0.19%
    assert 0.30 <= np.mean(slice_shares) <= 0.50  # real: 0.38


def test_unannotated_categories_grow_in_involvement():
    """The lesion labels cover each category's share of the lungs, and the lesion tissue seen in
    HU (-700..-150 in the lungs) grows from CT-0 to CT-4."""
    shares, dense = {}, {}
    for category, ids in UNANNOTATED_IDS.items():
        for study_id in ids:
            hu, _, _, labels = generate_study(study_id, size=SIZE, involvement=category, return_labels=True)
            lungs = np.isin(labels, LUNG_LABELS)
            shares[study_id] = np.isin(labels, LESION_LABELS).sum() / lungs.sum()
            dense.setdefault(category, []).append(np.mean((hu[lungs] > -700) & (hu[lungs] < -150)))
            low, high = INVOLVEMENT[category]
            assert low <= shares[study_id] <= high or (category == "CT-0" and shares[study_id] == 0), (study_id, shares[study_id])
    means = {category: np.mean(values) for category, values in dense.items()}
    assert means["CT-0"] < means["CT-2"] < means["CT-3"] < means["CT-4"]


@pytest.mark.shared
def test_lesion_slices_match_the_real_masks(real_masks, volumes):
    """The phantom's masks have the real masks' grid depth and lesion slice count."""
    for study_id in (255, 276, 287, 297):
        real = np.asarray(nib.load(real_masks / f"study_{study_id:04d}_mask.nii.gz").dataobj)
        mask = volumes[study_id][1]
        assert mask.shape[2] == real.shape[2]
        assert (mask.sum(axis=(0, 1)) > 0).sum() == (real.sum(axis=(0, 1)) > 0).sum()


# --- anatomy in HU -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled():
    """Study 0255 (CT-1) and the same body without lesions (CT-0), with their label maps."""
    with_lesions = generate_study(255, size=SIZE, return_labels=True)
    without = generate_study(255, size=SIZE, involvement="CT-0", return_labels=True)
    return with_lesions, without


def test_hu_of_the_tissues(labelled):
    (hu, mask, _, labels), _ = labelled
    hu = hu.astype(np.float32)
    air = (labels == AIR) & (hu > -1100)  # outside the body, inside the reconstruction circle
    air[4:-4, 4:-4, :] = False  # the image border: outside the body
    assert abs(np.median(hu[air]) + 1000) <= 10
    assert 5.0 <= np.std(hu[air]) <= 30.0  # image noise, cut at the -1024 floor
    assert -900 <= np.median(hu[labels == LUNG]) <= -800
    assert -150 <= np.median(hu[labels == FAT]) <= -50
    assert 0 <= np.median(hu[labels == SOFT_TISSUE]) <= 80
    assert np.median(hu[labels == BONE]) >= 200
    assert 20 <= np.median(hu[labels == HEART]) <= 70
    assert np.median(hu[labels == AIRWAY]) <= -900
    assert -700 <= np.median(hu[labels == GROUND_GLASS]) <= -300
    assert -150 <= np.median(hu[labels == CONSOLIDATION]) <= 100
    # vessels are as dense as consolidation, much denser than ground glass
    assert np.median(hu[labels == LUNG_VESSEL]) >= np.median(hu[labels == GROUND_GLASS]) + 200


def test_mask_is_the_lesion_labels(labelled):
    (_, mask, _, labels), _ = labelled
    assert mask.any()
    assert np.array_equal(mask.astype(bool), np.isin(labels, LESION_LABELS))


def test_lesions_only_inside_the_lungs(labelled):
    """The same study without lesions has the same body: lesions change only lung voxels."""
    (hu, mask, affine, _), (hu0, mask0, affine0, labels0) = labelled
    assert np.array_equal(affine, affine0) and not mask0.any()
    lungs = np.isin(labels0, (LUNG, LUNG_VESSEL))
    assert mask.astype(bool)[~lungs].sum() == 0
    changed = hu != hu0
    assert changed.any() and not changed[~lungs].any()


def test_orientation_las(labelled):
    """Axis 0 runs to the patient's left, axis 1 anteriorly, axis 2 superiorly."""
    _, (hu, _, _, labels) = labelled
    heart = np.argwhere(labels == HEART).mean(axis=0)
    body = np.argwhere(~np.isin(labels, (AIR, TABLE))).mean(axis=0)
    z_mid = hu.shape[2] // 2
    midline = labels[int(body[0]) - 2 : int(body[0]) + 3, :, z_mid] == BONE
    bone_j = np.nonzero(midline)[1]
    spine_j = np.median(bone_j[bone_j < body[1]])
    # the heart lies left of the body's centre, in front of the spine, in the lower half
    assert heart[0] > body[0] + 1
    assert heart[1] > spine_j + 5
    assert heart[2] < 0.5 * hu.shape[2]
    # the spine is posterior: low axis-1 indices, the bottom of a radiological display
    assert spine_j < body[1]
    # the lungs shrink towards the apex (top slices)
    lung_area = np.isin(labels, (LUNG, LUNG_VESSEL)).sum(axis=(0, 1))
    top = np.nonzero(lung_area)[0].max()
    assert top > z_mid and lung_area[top] < 0.5 * lung_area.max()


# --- determinism ---------------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes(tmp_path, dataset):
    a = write_phantom(tmp_path / "a", size=SIZE, annotated_ids=(257,), unannotated=False, progress=False)
    write_phantom(tmp_path / "b", size=SIZE, annotated_ids=(257,), unannotated=False, progress=False)
    c = write_phantom(tmp_path / "c", size=SIZE, seed=1, annotated_ids=(257,), unannotated=False, progress=False)
    files = ("studies/CT-1/study_0257.nii.gz", "masks/study_0257_mask.nii.gz", "dataset_registry.csv", PHANTOM_MARKER)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # a subset holds the same study as the full dataset
    for name in files[:2]:
        assert (tmp_path / "a" / name).read_bytes() == (dataset / name).read_bytes(), name
    # another seed, another study
    assert c[0].image.read_bytes() != a[0].image.read_bytes()


def test_other_seed_other_study():
    hu0, mask0, affine0 = generate_study(300, size=32, seed=0)
    hu1, mask1, affine1 = generate_study(300, size=32, seed=1)
    assert hu0.shape == hu1.shape  # the real slice count
    assert not np.array_equal(hu0, hu1) and not np.array_equal(affine0, affine1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="CT-5"):
        generate_study(255, involvement="CT-5")
    with pytest.raises(ValueError, match="size"):
        generate_study(255, size=8)
    with pytest.raises(ValueError, match="annotated_ids"):
        write_phantom("unused", annotated_ids=(12,))


def test_unannotated_study_has_no_mask_and_drawn_slices():
    hu, mask, _ = generate_study(12, size=32, involvement="CT-0")
    assert mask is None and 33 <= hu.shape[2] <= 53
    hu, mask, _ = generate_study(255, size=32, n_slices=20)
    assert hu.shape == (32, 32, 20) and mask.shape == hu.shape and mask.any()


# --- writing atomically and caching ----------------------------------------------------------------
def _fake_generate(calls):
    """A fast stand-in for generate_study that counts its calls."""

    def fake(study_id, size=512, n_slices=None, involvement="CT-1", seed=0, return_labels=False):
        calls.append(study_id)
        affine = np.diag([-1.0, 1.0, 8.0, 1.0])
        hu = np.full((4, 4, 2), -1000, dtype=np.int16)
        return hu, (np.zeros_like(hu) if study_id in ANNOTATED_IDS else None), affine

    return fake


def test_write_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_phantom(tmp_path / "out", size=32, progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    fake = _fake_generate(calls)

    def failing(study_id, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        return fake(study_id, **kwargs)

    monkeypatch.setattr(writing, "generate_study", failing)
    with pytest.raises(KeyboardInterrupt):
        write_phantom(tmp_path / "out", size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_phantom_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COVIDSEG_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_phantom_dir(128) == tmp_path / "c" / f"phantom-v{PHANTOM_VERSION}-128px-seed0"
    monkeypatch.delenv("COVIDSEG_CACHE")
    assert default_phantom_dir(64, seed=3) == tmp_path / "x" / "covidseg" / f"phantom-v{PHANTOM_VERSION}-64px-seed3"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_phantom_dir(64) == tmp_path / "home" / ".cache" / "covidseg" / f"phantom-v{PHANTOM_VERSION}-64px-seed0"


def test_ensure_phantom_generates_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(writing, "generate_study", _fake_generate(calls))
    monkeypatch.setenv("COVIDSEG_CACHE", str(tmp_path))
    root = ensure_phantom(size=48, progress=False)
    assert root == tmp_path / f"phantom-v{PHANTOM_VERSION}-48px-seed0" and is_phantom(root)
    assert len(calls) == 58
    assert ensure_phantom(size=48, progress=False) == root
    assert len(calls) == 58  # the second call found the cache
    assert sorted(os.listdir(tmp_path)) == [root.name]


def test_ensure_phantom_keeps_a_copy_that_appeared_meanwhile(monkeypatch, tmp_path):
    """Another process finishing first wins; ours is discarded without a trace."""
    root = tmp_path / "cache"
    calls = []
    fake = _fake_generate(calls)

    def racing(study_id, **kwargs):
        if not calls:  # the other process completes while we generate
            root.mkdir()
            (root / PHANTOM_MARKER).write_text("theirs")
        return fake(study_id, **kwargs)

    monkeypatch.setattr(writing, "generate_study", racing)
    assert ensure_phantom(size=48, root=root, progress=False) == root
    assert (root / PHANTOM_MARKER).read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_ensure_phantom_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=PHANTOM_MARKER):
        ensure_phantom(size=48, root=tmp_path / "data", progress=False)


@pytest.mark.slow
def test_statistics_hold_at_128_px(tmp_path):
    root = tmp_path / "p128"
    write_phantom(root, size=128, unannotated=False, progress=False)
    facts = mask_facts()
    fractions, shares, slices = [], [], 0
    for study in annotated_studies(root):
        mask = np.asarray(nib.load(study.mask).dataobj)
        fractions.append(100.0 * mask.mean())
        shares.append((mask.sum(axis=(0, 1)) > 0).mean())
        slices += mask.shape[2]
        assert (mask.sum(axis=(0, 1)) > 0).sum() == facts[study.study_id]["lesion_slices"]
    assert slices == 2049
    assert 0.10 <= np.mean(fractions) <= 0.35
    assert 0.30 <= np.mean(shares) <= 0.50


def test_a_killed_phantom_writer_leaves_nothing_a_later_run_keeps(tmp_path):
    """SIGKILL mid-write leaves its hidden folder; the next write into the same parent removes it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    writer = subprocess.Popen([sys.executable, "-m", "covidseg", "phantom", str(tmp_path / "killed"), "--size", "64"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".killed.*.tmp")) and time.monotonic() < deadline and writer.poll() is None:
        time.sleep(0.05)
    writer.kill()
    writer.wait()
    left = list(tmp_path.glob(".killed.*.tmp"))
    assert left and not (tmp_path / "killed").exists(), "the writer was killed mid-write"
    write_phantom(tmp_path / "next", size=32, annotated_ids=(255,), unannotated=False, progress=False)
    assert not any(p.exists() for p in left), "the next run removed the killed run's folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_phantom_folder_honours_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        write_phantom(tmp_path / "p", size=32, annotated_ids=(255,), unannotated=False, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == mode
