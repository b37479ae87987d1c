"""Tests of covidseg.download against a local, deliberately unreliable HTTP mirror.

Everything runs offline: a ThreadingHTTPServer on 127.0.0.1 serves tiny NIfTI files written with
nibabel, and can be switched per file into failure modes (truncated or corrupted body, connection
dropped mid-transfer, HTML page, 404, 503, Range ignored, more bytes than announced). Any
connection to another host fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidseg import download as dl
from covidseg.errors import DownloadError
from covidseg.mosmed import REGISTRY_NAME, annotated_studies, discover_studies

from conftest import Mirror, serve_mirror

IDS = (255, 256, 257)
SHARED_MASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mosmed-masks"
EMPTY_BLOB_SHA1 = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object /dev/null`


# --- the fake mirror ---------------------------------------------------------------------------


def write_fake_mirror(root: Path) -> None:
    """Tiny CT volumes and masks in the mirror's layout (random, so gzip cannot shrink them away)."""
    rng = np.random.default_rng(0)
    affine = np.diag([-0.7, 0.7, 8.0, 1.0])
    for study_id in IDS:
        image_path, mask_rel = dl.mirror_paths(study_id)
        ct = rng.integers(-1000, 1000, size=(24, 24, 5), dtype=np.int16)
        mask = (rng.random((24, 24, 5)) < 0.1).astype(np.int16)
        for rel, array in ((image_path, ct), (mask_rel, mask)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / rel)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No proxies, and a failure for any connection to a host other than 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    real = socket.create_connection

    def local_only(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to reach {address[0]}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", local_only)


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror" / "v1.0"
    write_fake_mirror(root)
    with serve_mirror(root, prefix="/v1.0/") as served:
        yield served


def assert_intact(mirror: Mirror, out: Path) -> None:
    for path, data in mirror.data.items():
        assert (out / path).read_bytes() == data, path
    assert not list(out.rglob("*" + dl.PART_SUFFIX))


IMAGE, MASK = dl.mirror_paths(IDS[0])


# --- hashing and the manifest ------------------------------------------------------------------


def test_git_blob_sha1_of_empty_file_is_gits_empty_blob(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert dl.git_blob_sha1(tmp_path / "empty") == EMPTY_BLOB_SHA1


def test_git_blob_sha1_equals_git_hash_object(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip(reason="git is not installed")
    sample = tmp_path / "sample.bin"
    sample.write_bytes(np.random.default_rng(1).bytes(3 * dl.CHUNK_BYTES // 2))  # spans two chunks
    expected = subprocess.run([git, "hash-object", str(sample)], capture_output=True, text=True, check=True)
    assert dl.git_blob_sha1(sample) == expected.stdout.strip()


def test_packaged_manifest_lists_the_100_annotated_files():
    manifest = dl.read_manifest()
    studies = {f"studies/CT-1/study_{i:04d}.nii.gz" for i in range(255, 305)}
    masks = {f"masks/study_{i:04d}_mask.nii.gz" for i in range(255, 305)}
    assert set(manifest) == studies | masks
    assert len(manifest) == 100
    assert all(re.fullmatch(r"[0-9a-f]{40}", sha1) for sha1 in manifest.values())
    assert len(set(manifest.values())) == 100


@pytest.mark.shared
def test_packaged_manifest_matches_the_real_masks():
    if not SHARED_MASKS.is_dir():
        pytest.skip(reason=f"real masks not found at ../shared/data/{SHARED_MASKS.name}")
    manifest = dl.read_manifest()
    for study_id in range(255, 305):
        _, mask = dl.mirror_paths(study_id)
        assert dl.git_blob_sha1(SHARED_MASKS / Path(mask).name) == manifest[mask], mask


def test_read_manifest_names_a_malformed_line(tmp_path):
    bad = tmp_path / "manifest.tsv"
    bad.write_text("path\tgit_blob_sha1\nmasks/a.nii.gz\t" + "0" * 40 + "\nmasks/b.nii.gz\tnot-a-hash\n")
    with pytest.raises(DownloadError, match=r"manifest\.tsv: line 3"):
        dl.read_manifest(bad)


def test_mirror_url_and_credit():
    assert dl.mirror_url(MASK) == dl.DEFAULT_MIRROR + "/masks/study_0255_mask.nii.gz"
    assert dl.DEFAULT_MIRROR.endswith("/v1.0")
    for needed in ("MosMedData: Chest CT Scans With COVID-19 Related Findings", "Moscow Health Care Department",
                   "arXiv:2005.06465", "CC BY-NC-ND 3.0", "https://creativecommons.org/licenses/by-nc-nd/3.0/"):
        assert needed in dl.CREDIT


# --- downloading -------------------------------------------------------------------------------


def test_download_fetches_verifies_and_registers(mirror, tmp_path):
    out = tmp_path / "data"
    files = mirror.download(out)
    expected = [out / path for study_id in IDS for path in dl.mirror_paths(study_id)]
    assert files == expected
    assert_intact(mirror, out)
    assert (out / REGISTRY_NAME).is_file()
    studies = discover_studies(out)
    assert [(s.study_id, s.category, s.image, s.mask) for s in studies] == [
        (i, "CT-1", out / dl.mirror_paths(i)[0], out / dl.mirror_paths(i)[1]) for i in IDS
    ]
    assert [s.study_id for s in annotated_studies(out, IDS)] == list(IDS)
    assert all(rng is None for _, rng in mirror.requests())  # nothing to resume


def test_second_run_requests_nothing(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.download(out)
    before = len(mirror.requests())
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    assert mirror.download(out) == mirror.download(out)
    assert len(mirror.requests()) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes


def test_later_run_with_other_ids_keeps_earlier_studies_registered(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.download(out, ids=[255])
    mirror.download(out, ids=[257, 256])
    assert [s.study_id for s in discover_studies(out)] == list(IDS)


def test_existing_part_is_resumed_with_range(mirror, tmp_path):
    out = tmp_path / "data"
    half = len(mirror.data[IMAGE]) // 2
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(mirror.data[IMAGE][:half])
    mirror.download(out)
    assert mirror.requests(IMAGE) == [(IMAGE, f"bytes={half}-")]
    assert_intact(mirror, out)


def test_part_is_restarted_when_server_ignores_range(mirror, tmp_path):
    out = tmp_path / "data"
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk that must not survive")
    mirror.fault(IMAGE, "ignore-range")
    mirror.download(out)
    assert mirror.requests(IMAGE) == [(IMAGE, "bytes=26-")]  # answered 200: rewritten from zero
    assert_intact(mirror, out)


def test_stale_part_that_fails_verification_is_fetched_again_from_zero(mirror, tmp_path):
    out = tmp_path / "data"
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 10)
    mirror.download(out)
    assert mirror.requests(IMAGE) == [(IMAGE, "bytes=10-"), (IMAGE, None)]
    assert_intact(mirror, out)


def test_part_longer_than_the_file_is_replaced(mirror, tmp_path):
    out = tmp_path / "data"
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(mirror.data[IMAGE] + b"extra")
    mirror.download(out)  # 416 Range Not Satisfiable, then a fresh download
    assert mirror.requests(IMAGE)[-1] == (IMAGE, None)
    assert_intact(mirror, out)


def test_dropped_connection_is_resumed_with_range(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.fault(IMAGE, "drop")
    mirror.download(out)
    half = len(mirror.data[IMAGE]) // 2
    assert mirror.requests(IMAGE) == [(IMAGE, None), (IMAGE, f"bytes={half}-")]
    assert_intact(mirror, out)


def test_dropped_connection_without_retries_keeps_the_part_for_the_next_run(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.fault(IMAGE, "drop")
    with pytest.raises(DownloadError, match=r"study_0255\.nii\.gz: failed after 1 attempt: connection closed"):
        mirror.download(out, retries=0)
    half = len(mirror.data[IMAGE]) // 2
    assert (out / (IMAGE + dl.PART_SUFFIX)).stat().st_size == half
    assert not (out / IMAGE).exists()
    mirror.download(out, retries=0)
    assert mirror.requests(IMAGE)[-1] == (IMAGE, f"bytes={half}-")
    assert_intact(mirror, out)


@pytest.mark.parametrize("mode", ["truncate", "corrupt"])
def test_bad_body_raises_sha1_mismatch_and_leaves_nothing(mirror, tmp_path, mode):
    out = tmp_path / "data"
    mirror.fault(MASK, mode)
    with pytest.raises(DownloadError) as caught:
        mirror.download(out)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(out / MASK) + ": SHA-1 mismatch: expected " + mirror.manifest[MASK] + ", got ")
    got = re.search(r"got ([0-9a-f]{40})", message)[1]
    assert got != mirror.manifest[MASK]
    assert not (out / MASK).exists()
    assert not (out / (MASK + dl.PART_SUFFIX)).exists()
    assert (out / IMAGE).is_file()  # fetched before the mask
    mirror.server.faults.clear()
    mirror.download(out)  # the next run starts clean
    assert mirror.requests(MASK)[-1] == (MASK, None)
    assert_intact(mirror, out)


def test_damaged_file_on_disk_is_fetched_again(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.download(out)
    data = bytearray((out / MASK).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / MASK).write_bytes(bytes(data))
    mirror.download(out)
    assert len(mirror.requests(MASK)) == 2
    assert len(mirror.requests(IMAGE)) == 1
    assert_intact(mirror, out)


@pytest.mark.parametrize("mode", ["html", "html-body"])
def test_html_page_instead_of_file_is_caught(mirror, tmp_path, mode):
    out = tmp_path / "data"
    mirror.fault(IMAGE, mode)
    with pytest.raises(DownloadError, match=r"study_0255\.nii\.gz: the server returned an HTML page"):
        mirror.download(out)
    assert not (out / IMAGE).exists()
    assert not (out / (IMAGE + dl.PART_SUFFIX)).exists()


def test_not_found_is_a_clear_error_and_not_retried(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.fault(MASK, "404")
    with pytest.raises(DownloadError) as caught:
        mirror.download(out)
    assert str(caught.value).startswith(f"{mirror.url}/{MASK}: HTTP 404")
    assert len(mirror.requests(MASK)) == 1


def test_server_errors_are_retried(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.fault(IMAGE, "503")  # the first two requests answer 503
    mirror.download(out, retries=2)
    assert len(mirror.requests(IMAGE)) == 3
    assert_intact(mirror, out)


def test_server_errors_exhaust_retries(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.fault(IMAGE, "503")
    with pytest.raises(DownloadError, match=r"study_0255\.nii\.gz: failed after 2 attempts: HTTP 503"):
        mirror.download(out, retries=1)
    assert len(mirror.requests(IMAGE)) == 2


def test_more_bytes_than_announced_are_caught(mirror, tmp_path):
    out = tmp_path / "data"
    half = len(mirror.data[IMAGE]) // 2
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(mirror.data[IMAGE][:half])
    mirror.fault(IMAGE, "oversize")  # 206 with Content-Range .../total, then more than total
    with pytest.raises(DownloadError, match=r"study_0255\.nii\.gz: larger than expected"):
        mirror.download(out)
    assert not part.exists()
    assert not (out / IMAGE).exists()


def test_body_of_unannounced_length_is_still_verified(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.fault(IMAGE, "oversize")  # 200 without Content-Length, with bytes appended
    with pytest.raises(DownloadError, match="SHA-1 mismatch"):
        mirror.download(out)
    assert not (out / IMAGE).exists()


def test_concurrent_downloads_into_one_folder(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.server.delay = 0.05  # so that the two runs overlap
    results, errors = [], []

    def run():
        try:
            results.append(mirror.download(out))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert_intact(mirror, out)
    for path in mirror.data:  # the second run waited for the lock, then found every file verified
        assert len(mirror.requests(path)) == 1, path
    assert [s.study_id for s in discover_studies(out)] == list(IDS)


def test_a_second_process_waits_for_the_download_that_holds_the_folder(mirror, tmp_path, caplog):
    out = tmp_path / "data"
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("path\tgit_blob_sha1\n" + "".join(f"{p}\t{h}\n" for p, h in mirror.manifest.items()))
    mirror.server.delay = 0.5  # six requests: the first process holds the folder for about 3 s
    code = (f"from covidseg.download import download; download({str(out)!r}, mirror={mirror.url!r}, "
            f"ids={IDS!r}, manifest={str(manifest)!r}, backoff=0, timeout=5, progress=False)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "no_proxy": "127.0.0.1"}
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        owner = out / ".covidseg-download.owner"
        deadline = time.monotonic() + 60
        while not owner.is_file():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first download never took the folder"
            time.sleep(0.02)
        with caplog.at_level("WARNING", logger="covidseg.download"):
            mirror.download(out)
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    waiting = [r.getMessage() for r in caplog.records if "another download" in r.getMessage()]
    assert waiting == [f"{out}: another download into this folder is running "
                       f"(pid {first.pid} on {socket.gethostname()}); waiting for it"]
    assert_intact(mirror, out)
    for path in mirror.data:  # the second process waited, then found every file verified
        assert len(mirror.requests(path)) == 1, path
    assert not owner.exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_download_that_fails_before_writing_leaves_nothing(existing, mirror, tmp_path):
    out = tmp_path / "data"
    if existing:
        out.mkdir()
    mirror.fault(IMAGE, "404")
    with pytest.raises(DownloadError, match="HTTP 404"):
        mirror.download(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data", "mirror"] if existing else ["mirror"])
    assert not existing or list(out.iterdir()) == []


def test_local_copy_as_file_url(mirror, tmp_path):
    out = tmp_path / "data"
    mirror.download(out, mirror=mirror.root.as_uri())
    assert_intact(mirror, out)
    assert mirror.requests() == []


def test_unknown_study_is_refused_before_any_request(mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"studies/CT-1/study_0001\.nii\.gz: study 1 is not in the mirror manifest"):
        mirror.download(tmp_path / "data", ids=[255, 1])
    with pytest.raises(DownloadError, match="study ids must be integers"):
        mirror.download(tmp_path / "data", ids=["255"])
    assert mirror.requests() == []


def test_progress_bars_are_drawn(mirror, tmp_path, capsys):
    mirror.download(tmp_path / "data", ids=IDS[:1], progress=True)
    assert "MosMedData CT-1" in capsys.readouterr().err


# --- bounds: size, time, and the download folder -----------------------------------------------


def test_packaged_manifest_gives_the_masks_sizes():
    sizes = dl.read_manifest_sizes()
    masks = {f"masks/study_{i:04d}_mask.nii.gz" for i in range(255, 305)}
    assert set(sizes) == masks, "the masks have sizes, the CT volumes (never measured) none"
    assert all(10_000 < size < 100_000 for size in sizes.values())  # masks are mostly zeros: tens of kB
    if SHARED_MASKS.is_dir():
        for path in masks:
            assert (SHARED_MASKS / Path(path).name).stat().st_size == sizes[path], path


def test_read_manifest_sizes_and_a_bad_size(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("path\tgit_blob_sha1\tsize\nmasks/a.nii.gz\t" + "0" * 40 + "\t123\nmasks/b.nii.gz\t" + "1" * 40 + "\t\n")
    assert dl.read_manifest(good) == {"masks/a.nii.gz": "0" * 40, "masks/b.nii.gz": "1" * 40}
    assert dl.read_manifest_sizes(good) == {"masks/a.nii.gz": 123}
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\tgit_blob_sha1\tsize\nmasks/a.nii.gz\t" + "0" * 40 + "\t12 kB\n")
    with pytest.raises(DownloadError, match=r"bad\.tsv: line 2: expected <path><TAB><40 hex digits><TAB><size or nothing>"):
        dl.read_manifest_sizes(bad)


def _sizes(mirror):
    return {path: len(data) for path, data in mirror.data.items()}


@pytest.mark.parametrize("offset", [0, 100], ids=["new", "resumed"])
def test_a_10_gib_content_length_is_refused_before_a_byte_is_written(offset, mirror, tmp_path):
    out = tmp_path / "data"
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    if offset:
        part.write_bytes(mirror.data[IMAGE][:offset])  # an earlier run's bytes: kept
    mirror.fault(IMAGE, "huge-length")
    with pytest.raises(DownloadError) as raised:
        mirror.download(out, ids=IDS[:1], max_bytes=1 << 20)
    assert str(raised.value) == (f"{mirror.url}/{IMAGE}: larger than expected: the server announces "
                                 f"{offset + (10 << 30)} bytes, more than the {1 << 20}-byte limit")
    assert part.read_bytes() == mirror.data[IMAGE][:offset] if offset else not part.exists()
    assert not (out / IMAGE).exists()
    assert len(mirror.requests(IMAGE)) == 1, "not retried"


@pytest.mark.parametrize("known_size", [False, True], ids=["cap", "manifest-size"])
def test_an_endless_body_is_refused_as_soon_as_it_passes_the_expected_size(known_size, mirror, tmp_path, monkeypatch):
    out = tmp_path / "data"
    mirror.fault(IMAGE, "endless")
    written = []  # bytes in the part after each write
    real = dl.open_no_follow

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            written.append((written[-1] if written else 0) + len(data))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(dl, "open_no_follow", lambda path, mode="ab": Counting(real(path, mode)) if path.name.endswith(dl.PART_SUFFIX) else real(path, mode))
    size = len(mirror.data[IMAGE])
    options = dict(sizes=_sizes(mirror)) if known_size else dict(max_bytes=size)
    with pytest.raises(DownloadError) as raised:
        mirror.download(out, ids=IDS[:1], **options)
    expected = f"more than the {size} bytes expected" if known_size else f"more than the {size}-byte limit"
    assert str(raised.value).startswith(f"{mirror.url}/{IMAGE}: larger than expected: ") and expected in str(raised.value)
    assert max(written, default=0) <= size, "nothing past the expected size reaches the disk"
    assert not (out / IMAGE).exists() and not (out / (IMAGE + dl.PART_SUFFIX)).exists()


def test_a_content_length_other_than_the_manifest_size_is_refused(mirror, tmp_path):
    mirror.fault(IMAGE, "wrong-length")
    size = len(mirror.data[IMAGE])
    with pytest.raises(DownloadError, match=rf"study_0255\.nii\.gz: larger than expected: the server announces "
                                            rf"{size + 1} bytes, more than the {size} bytes the manifest gives"):
        mirror.download(tmp_path / "data", ids=IDS[:1], sizes=_sizes(mirror))


@pytest.mark.parametrize(
    "fault, options, problem",
    [
        ("trickle", dict(min_speed=1000, stall_seconds=0.5), r"too slow: \d+ bytes in [\d.]+ s, less than the 1000 bytes/s required"),
        ("silent", dict(timeout=0.5), r"timed out"),
        ("one-byte", dict(), r"connection closed after \d of \d+ bytes"),
        ("slow-headers", dict(timeout=0.5), r"no complete response headers within 0\.5 s"),
    ],
)
def test_slow_or_stingy_servers_are_given_up_on(fault, options, problem, mirror, tmp_path):
    mirror.fault(IMAGE, fault)
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match=rf"^{re.escape(mirror.url)}/{IMAGE}: failed after 3 attempts: {problem}$"):
        mirror.download(out, ids=IDS[:1], retries=2, **options)
    assert len(mirror.requests(IMAGE)) == 3
    assert not (out / IMAGE).exists()


def test_the_bar_shows_bytes_as_they_arrive(mirror, tmp_path, monkeypatch):
    updates = []

    class Recording(dl.tqdm):
        def update(self, n=1):
            if self.unit == "B":
                updates.append(n)
            return super().update(n)

    monkeypatch.setattr(dl, "tqdm", Recording)
    mirror.fault(IMAGE, "chunks")
    mirror.download(tmp_path / "data", ids=IDS[:1], progress=True)
    size = len(mirror.data[IMAGE])
    assert sum(updates[:-1]) + updates[-1] >= size and len(updates) >= 3, updates
    assert updates[0] < size, "the first piece is shown before the rest arrives"


def _outside_file(tmp_path) -> Path:
    outside = tmp_path / "elsewhere" / "precious.bin"
    outside.parent.mkdir()
    outside.write_bytes(b"not yours")
    return outside


@pytest.mark.parametrize("which", ["part", "target", "lock"])
def test_download_files_are_never_opened_through_a_symbolic_link(which, mirror, tmp_path):
    out = tmp_path / "data"
    outside = _outside_file(tmp_path)
    link = {"part": out / (IMAGE + dl.PART_SUFFIX), "target": out / IMAGE, "lock": out / dl.LOCK_NAME}[which]
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(DownloadError) as raised:
        mirror.download(out, ids=IDS[:1])
    assert str(raised.value).startswith(f"{link}: ")
    assert "symbolic link; refusing to follow it" in str(raised.value)
    assert outside.read_bytes() == b"not yours"
    assert link.is_symlink() and sorted(outside.parent.iterdir()) == [outside]


def test_a_dangling_part_link_creates_nothing_elsewhere(mirror, tmp_path):
    out = tmp_path / "data"
    target = tmp_path / "elsewhere" / "new.bin"
    target.parent.mkdir()
    part = out / (IMAGE + dl.PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.symlink_to(target)
    with pytest.raises(DownloadError, match="symbolic link; refusing to follow it"):
        mirror.download(out, ids=IDS[:1])
    assert not target.exists()


def test_a_linked_subfolder_leading_outside_is_refused(mirror, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "masks").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DownloadError, match=r"study_0255_mask\.nii\.gz: lies outside the download folder"):
        mirror.download(out, ids=IDS[:1])
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_downloaded_files_honour_the_umask(umask, expected, mirror, tmp_path):
    previous = os.umask(umask)
    try:
        out = tmp_path / "data"
        part = out / (IMAGE + dl.PART_SUFFIX)
        mirror.download(out, ids=IDS[:1])
    finally:
        os.umask(previous)
    written = [out / IMAGE, out / MASK, out / REGISTRY_NAME]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(expected) for p in written}
    assert not part.exists()


@pytest.mark.parametrize("which", ["part", "lock"])
def test_covidseg_download_refuses_a_link_in_one_line(which, tmp_path, capsys):
    from covidseg.cli import EXIT_ERROR, main

    out = tmp_path / "data"
    outside = _outside_file(tmp_path)
    link = out / (IMAGE + dl.PART_SUFFIX) if which == "part" else out / dl.LOCK_NAME
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    code = main(["download", str(out), "--mirror", "http://127.0.0.1:9/v1.0"])  # refused before any request
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert err.splitlines() == [f"covidseg: error: {link}: is a symbolic link; refusing to follow it"
                                + (" (remove it, or download into a folder without links)" if which == "part" else "")]
    assert outside.read_bytes() == b"not yours" and link.is_symlink()
