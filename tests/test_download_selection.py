"""``covidseg download --categories ... --per-category N``: the full mirror manifest shipped with the
package, the seeded choice of studies, and a download from a local mirror on 127.0.0.1."""

from __future__ import annotations

import threading
from collections import namedtuple
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from covidseg import download as dl
from covidseg import selection
from covidseg.cli import main
from covidseg.mosmed import CATEGORY_COUNTS, discover_studies
from covidseg.selection import parse_categories, read_full_manifest, select_studies

from conftest import REAL_MASKS, blob_sha1


def test_packaged_full_manifest_lists_every_file_of_the_mirror():
    manifest = read_full_manifest()
    studies = [p for p in manifest if p.startswith("studies/")]
    assert len(studies) == 1110
    for category, count in CATEGORY_COUNTS.items():
        assert sum(p.startswith(f"studies/{category}/") for p in studies) == count
    assert sum(p.startswith("masks/") for p in manifest) == 50
    assert "dataset_registry.csv" in manifest
    short = dl.read_manifest()  # the 50 annotated studies' manifest agrees with it
    assert all(manifest[p] == sha for p, sha in short.items())


def test_packaged_full_manifest_is_the_shared_one():
    shared = REAL_MASKS / "github-mirror-manifest-full.tsv"
    if not shared.is_file():
        pytest.skip("../shared/data/mosmed-masks is not available")
    assert read_full_manifest() == dl.read_manifest(shared)


def test_parse_categories():
    assert parse_categories("ct-3, CT-0,CT-3") == ["CT-0", "CT-3"]
    assert parse_categories("all") == ["CT-0", "CT-1", "CT-2", "CT-3", "CT-4"]
    with pytest.raises(ValueError, match="unknown category CT-7"):
        parse_categories("CT-0,CT-7")


def test_seeded_sample_per_category():
    manifest = read_full_manifest()
    first = select_studies(manifest, ["CT-0", "CT-4"], per_category=20, seed=1)
    assert first == select_studies(manifest, ["CT-0", "CT-4"], per_category=20, seed=1)
    assert first.studies != select_studies(manifest, ["CT-0", "CT-4"], per_category=20, seed=2).studies
    assert sum(c == "CT-0" for _, c in first.studies) == 20
    assert [s for s in first.studies if s[1] == "CT-4"] == [(1109, "CT-4"), (1110, "CT-4")]
    assert any("CT-4 has 2 studies" in note for note in first.notes)
    assert all(1 <= i <= 254 for i, c in first.studies if c == "CT-0")
    everything = select_studies(manifest, ["CT-1"])
    assert len(everything.studies) == 684
    assert len(everything.paths) == 684 + 50  # the annotated studies come with their masks
    with pytest.raises(ValueError, match="at least 1"):
        select_studies(manifest, ["CT-0"], per_category=0)


Mirror = namedtuple("Mirror", "url manifest requests")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A mirror on 127.0.0.1 with three CT-0 studies, one annotated CT-1 study with its mask and
    the two CT-4 studies, and a test manifest of them that the package reads in place of its own."""
    root = tmp_path / "mirror"
    files = {
        **{f"studies/CT-0/study_{i:04d}.nii.gz": bytes([i]) * (1000 + i) for i in (1, 2, 3)},
        "studies/CT-1/study_0255.nii.gz": b"ct" * 700,
        "masks/study_0255_mask.nii.gz": b"mask" * 50,
        **{f"studies/CT-4/study_{i:04d}.nii.gz": bytes([i % 256]) * 3000 for i in (1109, 1110)},
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("path\tgit_blob_sha1\n" + "".join(f"{p}\t{blob_sha1(d)}\n" for p, d in files.items()))
    monkeypatch.setattr(selection, "read_full_manifest", lambda path=None: dl.read_manifest(manifest))
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            requests.append((self.command, self.path))
            return super().send_head()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_address[1]}", manifest, requests)
    finally:
        server.shutdown()
        server.server_close()


def test_download_a_seeded_sample_from_a_local_mirror(mirror, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["download", str(out), "--categories", "CT-0,CT-4", "--per-category", "2", "--mirror", mirror.url]) == 0
    printed = capsys.readouterr().out
    assert "selected: CT-0 2 of 254, CT-4 2 of 2 (seed 0)" in printed
    assert "disk needed: 0.00 GB" in printed and "4 files, 0 already present" in printed
    studies = discover_studies(out)
    assert len([s for s in studies if s.category == "CT-0"]) == 2 and len([s for s in studies if s.category == "CT-4"]) == 2
    for study in studies:
        assert dl.git_blob_sha1(study.image) == dl.read_manifest(mirror.manifest)[study.image.relative_to(out).as_posix()]
    methods = [m for m, _ in mirror.requests]
    assert methods.count("HEAD") == 4 and methods.index("GET") > max(i for i, m in enumerate(methods) if m == "HEAD")
    # a second run with the annotated study: only what is missing is fetched; the registry keeps all
    mirror.requests.clear()
    assert main(["download", str(out), "--categories", "CT-0,CT-1,CT-4", "--per-category", "2", "--mirror", mirror.url]) == 0
    assert "6 files, 4 already present" in capsys.readouterr().out
    assert sorted(p for m, p in mirror.requests if m == "GET") == ["/masks/study_0255_mask.nii.gz", "/studies/CT-1/study_0255.nii.gz"]
    assert {s.study_id: s.mask is not None for s in discover_studies(out)}[255]
    assert len(discover_studies(out)) == 5


def test_a_corrupt_file_on_the_mirror_fails_verification(mirror, tmp_path, capsys):
    (tmp_path / "mirror" / "studies/CT-4/study_1110.nii.gz").write_bytes(b"damaged")
    out = tmp_path / "data"
    assert main(["download", str(out), "--categories", "CT-4", "--mirror", mirror.url]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("covidseg: error: ")]
    assert len(errors) == 1 and "study_1110.nii.gz: SHA-1 mismatch" in errors[0]
    assert not (out / "studies/CT-4/study_1110.nii.gz").exists()


def test_too_little_disk_is_said_before_downloading(mirror, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(selection.shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(10, 10, 100))
    assert main(["download", str(tmp_path / "data"), "--categories", "CT-4", "--mirror", mirror.url]) == 2
    assert "only 0.00 GB is free" in capsys.readouterr().err
    assert not any(m == "GET" for m, _ in mirror.requests)


def test_per_category_needs_categories(tmp_path, capsys):
    assert main(["download", str(tmp_path), "--per-category", "2"]) == 2
    assert "--per-category needs --categories" in capsys.readouterr().err
