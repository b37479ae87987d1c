"""The same seed gives the same split, the same phantom files and, on the CPU, the same training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from covidseg.mosmed import ANNOTATED_IDS
from covidseg.phantom import write_phantom
from covidseg.splits import SPLIT_NAMES, get_split
from covidseg.training import fit

from conftest import REPO, tiny_config

CONFIG = tiny_config(max_epochs=2)

_SPLITS_AS_JSON = (
    "import json; from covidseg.splits import SPLIT_NAMES, get_split; "
    "print(json.dumps({n: [list(get_split(n).part(p)) for p in ('train', 'val', 'test')] for n in SPLIT_NAMES}))"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _splits() -> dict[str, list[list[int]]]:
    return {name: [list(get_split(name).part(p)) for p in ("train", "val", "test")] for name in SPLIT_NAMES}


def test_split_is_the_same_across_calls_and_processes():
    here = _splits()
    assert here == _splits()
    for name, (train, val, test) in here.items():
        assert sorted(train + val + test) == list(ANNOTATED_IDS), name  # every study once
    for hash_seed in ("0", "4242"):  # set iteration order must not leak into the ids
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", _SPLITS_AS_JSON], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == here


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _phantom(root, seed: int) -> dict[str, bytes]:
    write_phantom(root, size=32, seed=seed, annotated_ids=(255, 256), unannotated=False, progress=False)
    return _files(root)


def test_phantom_files_are_byte_identical_for_a_seed(tmp_path):
    first, second, other = _phantom(tmp_path / "a", 7), _phantom(tmp_path / "b", 7), _phantom(tmp_path / "c", 8)
    assert "studies/CT-1/study_0255.nii.gz" in first and "masks/study_0256_mask.nii.gz" in first
    assert first == second
    assert first["studies/CT-1/study_0255.nii.gz"] != other["studies/CT-1/study_0255.nii.gz"]


@pytest.fixture(scope="module")
def data(tiny50):
    return tiny50


def _history(result):
    return [(row["epoch"], row["train_loss"], row["val_dice"], row["lr"]) for row in result.history]


def test_training_on_the_cpu_is_repeatable(data, tmp_path):
    first = fit(CONFIG.replace(device="cpu"), tmp_path / "a", data_dir=data, progress=False)
    again = fit(CONFIG.replace(device="cpu"), tmp_path / "b", data_dir=data, progress=False)
    reseeded = fit(CONFIG.replace(device="cpu", seed=1), tmp_path / "c", data_dir=data, progress=False)
    assert _history(first) == _history(again)
    weights = lambda run: torch.load(run / "last.pt", weights_only=True)["model"]  # noqa: E731
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [row[1] for row in _history(reseeded)] != [row[1] for row in _history(first)]
