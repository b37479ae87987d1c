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
    1: {
        "masks/study_0255_mask.nii.gz": "d378f1939599b29a062a7cacbe7c6799",
        "masks/study_0290_mask.nii.gz": "421a200b0fe7664d951c471db034e2ce",
        "studies/CT-0/study_0012.nii.gz": "64071d0a9c05144bd88330e7b1be7bf6",
        "studies/CT-0/study_0201.nii.gz": "a3cb3de6594c46c04a4893735e8c71e3",
        "studies/CT-1/study_0255.nii.gz": "85c8f7af32e6b716e2f98f5db10952c5",
        "studies/CT-1/study_0290.nii.gz": "b559d1a757509fee1b139f3109b03c9d",
        "studies/CT-2/study_0947.nii.gz": "c40b43e8ac6e9d1ee6edd2220c058e3c",
        "studies/CT-2/study_1021.nii.gz": "c4241617e175a16b065910b65c858245",
        "studies/CT-3/study_1071.nii.gz": "2cdf02ddf25a43b4c664e196c655009a",
        "studies/CT-3/study_1098.nii.gz": "ffe96818ecea2f7ee081b0fbc1bbf665",
        "studies/CT-4/study_1109.nii.gz": "609f121640553b0f93c6e0ad8b5a88a9",
        "studies/CT-4/study_1110.nii.gz": "c2c88a9295896f957c98273e98f531e4",
    },
}
"""Per generator version: SHA-256 (first 32 hex digits) of each uncompressed file at 64 px, seed 0."""

LABEL_DIGESTS = {
    1: {(255, "CT-1"): "5df91d8317ecb2ed8336ddb2ff793375", (1109, "CT-4"): "a839be43b5679bd680f122e27b62c6f9"},
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
    from covidseg import notebook

    (tmp_path / "phantom").mkdir()
    (tmp_path / "phantom" / "lesions.py").write_text("x = 1\n")
    monkeypatch.setattr(notebook, "__file__", str(tmp_path / "notebook.py"))
    before = notebook.code_fingerprint()
    (tmp_path / "phantom" / "lesions.py").write_text("x = 2\n")
    assert notebook.code_fingerprint() != before
