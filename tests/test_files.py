"""covidseg.files: write-then-rename, modes that honour the umask, and no temporaries left behind."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidseg.dataset import SliceDataset
from covidseg.files import atomic_write, new_file_mode, open_no_follow, remove_stale_temporaries, temporary_name
from covidseg.mosmed import REGISTRY_NAME, write_registry
from covidseg.nifti import load_volume, save_volume

from conftest import REPO, synthetic_ct, write_nifti, write_tiny_dataset


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it afterwards."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


@pytest.mark.parametrize("value, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_honour_the_umask(value, expected, umask, tmp_path):
    umask(value)
    hu, mask = synthetic_ct((16, 16, 3))
    study = load_volume(write_nifti(tmp_path / "in" / "ct.nii.gz", hu))
    dataset = tmp_path / "data"
    studies = write_tiny_dataset(dataset, ids=(255,), shape=(16, 16, 3), registry=False)

    _write_text(tmp_path / "notes.json", "{}")
    save_volume(mask.astype(np.int16), study, tmp_path / "out" / "mask.nii.gz")
    write_registry(dataset, studies)
    SliceDataset(studies, cache_dir=tmp_path / "cache")

    written = [tmp_path / "notes.json", tmp_path / "out" / "mask.nii.gz", dataset / REGISTRY_NAME,
               *sorted((tmp_path / "cache").iterdir())]
    assert len(written) == 5
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(expected) for p in written}
    assert new_file_mode(tmp_path / "absent") == expected


def test_overwriting_keeps_the_mode_of_the_users_file(umask, tmp_path):
    umask(0o077)
    hu, mask = synthetic_ct((16, 16, 3))
    study = load_volume(write_nifti(tmp_path / "ct.nii.gz", hu))
    users = write_nifti(tmp_path / "mask.nii.gz", np.zeros((16, 16, 3), dtype=np.int16))
    users.chmod(0o644)
    save_volume(mask.astype(np.int16), study, users)
    assert oct(mode(users)) == oct(0o644)
    assert np.array_equal(np.asarray(nib.load(users).dataobj), mask)
    notes = tmp_path / "notes.txt"
    notes.write_text("old")
    notes.chmod(0o640)
    _write_text(notes, "new")
    assert notes.read_text() == "new" and oct(mode(notes)) == oct(0o640)


def test_a_failed_write_changes_nothing_and_leaves_nothing(tmp_path):
    target = tmp_path / "history.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target) as handle:
            handle.write("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_temporary_names_are_unique_and_carry_the_process_id(tmp_path):
    names = {temporary_name(tmp_path / "best.pt") for _ in range(50)}
    assert len(names) == 50
    assert all(n.name.startswith(f".best.pt.{os.getpid()}.") and n.name.endswith(".tmp") for n in names)
    assert temporary_name(tmp_path / "m.nii.gz", ".nii.gz").name.endswith(".tmp.nii.gz")


def test_atomic_path_does_not_write_through_a_link_at_the_target(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "history.json").symlink_to(outside)
    _write_text(folder / "history.json", "[]")
    assert outside.read_text() == "precious"
    assert not (folder / "history.json").is_symlink() and (folder / "history.json").read_text() == "[]"


@pytest.mark.parametrize("mode_", ["wb", "ab", "a"])
def test_open_no_follow_refuses_a_symbolic_link(mode_, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    link = tmp_path / "study.nii.gz.part"
    link.symlink_to(outside)
    with pytest.raises(OSError) as raised:
        open_no_follow(link, mode_)
    assert raised.value.errno == errno.ELOOP and raised.value.filename == str(link)
    assert outside.read_bytes() == b"precious"
    dangling = tmp_path / "dangling.part"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        open_no_follow(dangling, mode_)
    assert not (tmp_path / "nowhere").exists()


_WRITER = textwrap.dedent(
    """
    import sys, time
    from covidseg.files import atomic_write
    with atomic_write(sys.argv[1], "wb") as handle:
        handle.write(b"x" * (1 << 20))
        handle.flush()
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))  # killed here, mid-write
        handle.write(b"y")
    """
)


def _start_writer(target: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(seconds)], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    assert process.stdout.readline() == "writing\n"
    return process


def test_a_killed_writers_temporary_is_removed_by_the_next_writer_and_a_live_ones_is_kept(tmp_path):
    target = tmp_path / "best.pt"
    target.write_bytes(b"the previous model")
    killed = _start_writer(target, 60)
    live = _start_writer(tmp_path / "last.pt", 60)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        temporaries = {p.name: p for p in tmp_path.glob(".*.tmp")}
        assert len(temporaries) == 2
        stale = next(p for n, p in temporaries.items() if n.startswith(f".best.pt.{killed.pid}."))
        kept = next(p for n, p in temporaries.items() if n.startswith(f".last.pt.{live.pid}."))
        assert stale.stat().st_size == 1 << 20 and target.read_bytes() == b"the previous model"

        _write_text(tmp_path / "history.json", "[]")  # any later write into the folder cleans up

        assert not stale.exists()
        assert kept.exists(), "the temporary of a running writer is left alone"
        assert target.read_bytes() == b"the previous model"
        assert remove_stale_temporaries(tmp_path) == []
    finally:
        for process in (killed, live):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    assert sorted(remove_stale_temporaries(tmp_path)) == [kept]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "history.json"]


def test_stale_temporary_folders_are_removed_too(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    folder = tmp_path / f".phantom.{pid}.0badc0de.tmp"
    (folder / "studies").mkdir(parents=True)
    (folder / "studies" / "study_0001.nii.gz").write_bytes(b"partial")
    unrelated = tmp_path / f".notes.{pid}.tmp"  # not one of ours: wrong pattern
    unrelated.write_text("keep")
    assert remove_stale_temporaries(tmp_path) == [folder]
    assert not folder.exists() and unrelated.exists()
