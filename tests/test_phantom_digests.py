"""The phantom's output, pinned by digests: a refactoring that is meant to change nothing (moving
code between modules, renaming) must leave every byte as it was.

The digests are of the *uncompressed* NIfTI files (header and voxels), so that they do not depend
on the zlib build, and of the label maps. A deliberate change of the generator bumps
:data:`covidseg.phantom.PHANTOM_VERSION` and records new digests here.
"""

from __future__ import annotations

import gzip
import hashlib

from covidseg.phantom import PHANTOM_VERSION, generate_study, write_phantom

SIZE = 64
ANNOTATED = (255, 290)

FILE_DIGESTS = {
    2: {
        "masks/study_0255_mask.nii.gz": "3058b06a12cb76cf9da580f3fcca7e35",
        "masks/study_0290_mask.nii.gz": "b222384b62bc9d8685a145bc7670cc26",
        "studies/CT-0/study_0012.nii.gz": "d9c30171728b50f3e96f09f054fb4242",
        "studies/CT-0/study_0201.nii.gz": "241b3e08a0d32b8cd18c18f2a6928c5d",
        "studies/CT-1/study_0255.nii.gz": "66d7300f70d913843e6b8a62d5d39280",
        "studies/CT-1/study_0290.nii.gz": "12bb84d284c8a1df6e2ee1fd62055b26",
        "studies/CT-2/study_0947.nii.gz": "b9f95900f9d008af29c8481389ea44b6",
        "studies/CT-2/study_1021.nii.gz": "af95920ce5e85e429b112aca1f2f466f",
        "studies/CT-3/study_1071.nii.gz": "f50d4ae8a0c1c605ed041d5470b6434e",
        "studies/CT-3/study_1098.nii.gz": "71271c6f057e4c4e7bf8f669b4cc30ec",
        "studies/CT-4/study_1109.nii.gz": "89382f7dd6a2d7aee1dc48657cd5df7d",
        "studies/CT-4/study_1110.nii.gz": "4b1833c00e7b4a3d092be63b6cce595c",
    },
}
"""Per generator version: SHA-256 (first 32 hex digits) of each uncompressed file at 64 px, seed 0."""

LABEL_DIGESTS = {
    2: {(255, "CT-1"): "69ada524882d54b539538fafd4bb12bb", (1109, "CT-4"): "d73ea9995d8ef11cad402a035cbab311"},
}
"""Per generator version: SHA-256 (first 32 hex digits) of label maps at 64 px, seed 0."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def test_version_has_recorded_digests():
    assert PHANTOM_VERSION in FILE_DIGESTS and PHANTOM_VERSION in LABEL_DIGESTS, (
        "a new PHANTOM_VERSION needs its digests recorded here"
    )


def test_files_match_the_recorded_digests(tmp_path):
    root = tmp_path / "phantom"
    write_phantom(root, size=SIZE, seed=0, annotated_ids=ANNOTATED, unannotated=True, progress=False)
    found = {p.relative_to(root).as_posix(): _digest(gzip.decompress(p.read_bytes())) for p in sorted(root.rglob("*.nii.gz"))}
    assert found == FILE_DIGESTS[PHANTOM_VERSION]


def test_labels_match_the_recorded_digests():
    for (study_id, category), expected in LABEL_DIGESTS[PHANTOM_VERSION].items():
        labels = generate_study(study_id, size=SIZE, involvement=category, seed=0, return_labels=True)[3]
        assert _digest(labels.tobytes()) == expected, study_id


def test_the_code_fingerprint_covers_subpackages(tmp_path, monkeypatch):
    """Runs are reused by the code's fingerprint: a change inside ``covidseg/phantom/`` counts."""
    from covidseg import runs

    (tmp_path / "phantom").mkdir()
    (tmp_path / "phantom" / "lesions.py").write_text("x = 1\n")
    monkeypatch.setattr(runs, "__file__", str(tmp_path / "runs.py"))
    before = runs.code_fingerprint()
    (tmp_path / "phantom" / "lesions.py").write_text("x = 2\n")
    assert runs.code_fingerprint() != before
