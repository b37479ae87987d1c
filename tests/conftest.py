"""Shared fixtures: small NIfTI studies written with nibabel, tiny training settings, the real data
in ../shared, and servers on 127.0.0.1 (a fake data mirror, any folder over HTTP)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covidseg.config import TrainConfig, get_preset
from covidseg.mosmed import ANNOTATED_IDS, Study, mask_path, study_path, write_registry

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_MASKS = SHARED_DATA / "mosmed-masks"
MINISEG_PREDICTIONS = SHARED_DATA / "miniseg-mosmed-predictions"

LAS_AFFINE = np.array(
    [[-0.75, 0, 0, 190.0], [0, 0.75, 0, -190.0], [0, 0, 8.0, -300.0], [0, 0, 0, 1]], dtype=np.float64
)


@pytest.fixture
def real_masks() -> Path:
    """The 50 real MosMedData masks, or a skip where ../shared is absent."""
    if not (REAL_MASKS / "study_0255_mask.nii.gz").is_file():
        pytest.skip("real masks not available (expected ../shared/data/mosmed-masks beside the repository)")
    return REAL_MASKS


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LAS_AFFINE, description: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if description is not None:
        image.header["descrip"] = description.encode()
    nib.save(image, path)
    return path


def synthetic_ct(shape=(32, 32, 6), seed=0, lesion=True) -> tuple[np.ndarray, np.ndarray]:
    """A tiny HU volume (air, body, a lung, a lesion) and its mask, for I/O tests."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[4:-4, 4:-4, :] = 40
    hu[8:-8, 8:-8, :] = -850
    hu += rng.integers(-10, 10, size=shape, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.int16)
    if lesion:
        mask[10:14, 12:16, 2:4] = 1
        hu[mask == 1] = -500
    return hu, mask


def write_tiny_dataset(root: Path, ids=(255, 256, 257), shape=(32, 32, 6), registry=True) -> list[Study]:
    """A MosMedData-layout folder of tiny CT-1 studies with masks."""
    studies = []
    for i, sid in enumerate(ids):
        hu, mask = synthetic_ct(shape, seed=sid)
        image = write_nifti(study_path(root, sid, "CT-1"), hu)
        masks = write_nifti(mask_path(root, sid), mask)
        studies.append(Study(sid, "CT-1", image, masks))
    if registry:
        write_registry(root, studies)
    return studies


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    root = tmp_path / "mosmed"
    write_tiny_dataset(root)
    return root


TINY_SHAPE = (16, 16, 3)
"""Studies so small that the whole thesis split decodes in a fraction of a second."""

TINY_TRAIN_FLAGS = ("--model", "unet", "--preset", "quick", "--image-size", "16", "--unet-width", "4",
                    "--batch-size", "16", "--slices-per-epoch", "64", "--quiet")
"""``covidseg train`` flags for the settings of :func:`tiny_config`."""


def write_lesion_everywhere_run(run: Path) -> Path:
    """A run folder holding ``best.pt`` of a width-4 U-Net (32 px) whose head says lesion everywhere."""
    from covidseg.checkpoint import save_checkpoint
    from covidseg.models import build_model

    config = get_preset("quick").replace(model="unet", unet_width=4, image_size=32)
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(20.0)
    save_checkpoint({"model_name": "unet", "config": config.to_dict(), "model": model.state_dict(), "epoch": 0, "history": []}, run / "best.pt")
    return run


TINY_SETTINGS = dict(image_size=16, unet_width=4, batch_size=16, slices_per_epoch=64)
"""What :func:`tiny_config` changes in the quick preset."""


def tiny_config(**changes) -> TrainConfig:
    """The quick preset shrunk to 16 px images and a width-4 U-Net: an epoch takes about a second."""
    return get_preset("quick").replace(**{**TINY_SETTINGS, **changes})


RESUME_CONFIG = tiny_config(lr=1e-2, max_epochs=6)
"""A run to stop and resume: six epochs, at a rate at which validation Dice moves."""


def comparable(history) -> list[tuple]:
    """What must agree exactly between two CPU runs of one config (the epoch times never do)."""
    return [(row["epoch"], row["train_loss"], row["val_dice"]) for row in history]


@pytest.fixture(scope="module")
def uninterrupted(tiny50, tmp_path_factory) -> list[tuple]:
    """:func:`comparable` history of :data:`RESUME_CONFIG` trained on :func:`tiny50` in one go."""
    from covidseg.training import fit

    result = fit(RESUME_CONFIG, tmp_path_factory.mktemp("uninterrupted") / "run", data_dir=tiny50, progress=False)
    assert len(result.history) == RESUME_CONFIG.max_epochs, "early stopping must not end the reference run"
    return comparable(result.history)


class FakeClock:
    """A clock for ``monkeypatch.setattr(training, "_clock", ...)`` that stands still except when a
    test advances ``now`` (seconds)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread: tiny models run faster without thread hand-offs, and a shared CPU is not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny50(tmp_path_factory) -> Path:
    """All 50 annotated ids as tiny studies (:data:`TINY_SHAPE`), so the thesis split trains in seconds."""
    root = tmp_path_factory.mktemp("tiny50") / "mosmed"
    write_tiny_dataset(root, ids=ANNOTATED_IDS, shape=TINY_SHAPE)
    return root


class ThresholdModel(torch.nn.Module):
    """Calls lesion every voxel above ``hu`` HU (its input is HU / 1000): a model with a known answer."""

    def __init__(self, hu: float):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(1000.0)
            self.conv.bias.fill_(-hu)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A run folder holding an untrained width-4 U-Net at 32 px (seeded): for commands whose
    mechanics, not accuracy, are tested."""
    from covidseg.checkpoint import save_checkpoint
    from covidseg.models import build_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("untrained") / "run"
    config = get_preset("quick").replace(model="unet", image_size=32, unet_width=4)
    model = build_model("unet", encoder_weights=None, width=4)
    save_checkpoint({"model_name": "unet", "config": config.to_dict(), "model": model.state_dict(), "epoch": 0, "history": []}, run / "best.pt")
    return run


# --- servers on 127.0.0.1 ------------------------------------------------------------------------


@contextlib.contextmanager
def serve_http(handler, **attributes) -> Iterator[ThreadingHTTPServer]:
    """Serve ``handler`` on 127.0.0.1 (a free port) from a thread while the ``with`` body runs;
    ``attributes`` are set on the server, where the handler finds them as ``self.server.<name>``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def blob_sha1(data: bytes) -> str:
    """The git blob SHA-1 written out from its definition (independent of the code under test)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


SLOW_FAULTS = ("trickle", "silent", "one-byte")
"""Fault modes of :class:`FaultyMirror` that send too little, too slowly."""


class FaultyMirror(BaseHTTPRequestHandler):
    """Serves ``server.root`` with Range support; ``server.faults[path]`` picks a failure mode."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        server = self.server
        path = urllib.parse.unquote(self.path).removeprefix(server.prefix)
        with server.lock:
            server.requests.append((path, self.headers.get("Range")))
            count = sum(1 for p, _ in server.requests if p == path)
        fault = server.faults.get(path)
        time.sleep(server.delay)
        file = server.root / path
        if fault == "404" or not file.is_file():
            return self._reply(404, b"404: Not Found", "text/plain")
        if fault == "503" and count <= 2:
            return self._reply(503, b"busy", "text/plain")
        if fault == "html":
            return self._reply(200, b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html; charset=utf-8")
        if fault == "html-body":
            return self._reply(200, b"\n<html><body>Rate limit</body></html>", "application/octet-stream")
        data = file.read_bytes()
        if fault == "truncate":
            data = data[: len(data) // 2]
        if fault == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        start = None
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and fault != "ignore-range":
            start = int(match[1])
            if start >= len(data):
                return self._reply(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
        status, body, extra = 200, data, {}
        if start is not None:
            status, body = 206, data[start:]
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        if fault == "drop" and count == 1:  # announce everything, send half, hang up
            self._headers(status, "application/octet-stream", {**extra, "Content-Length": str(len(body))})
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if fault == "slow-headers":  # the status line and headers a byte every 0.1 s, for at most 4 s
            return self._slow_headers(status, body, extra)
        if fault in SLOW_FAULTS or fault in ("huge-length", "endless", "wrong-length", "chunks"):
            return self._misbehave(fault, status, body, extra)
        if fault == "oversize":  # no Content-Length: the body runs until the connection closes
            self._headers(status, "application/octet-stream", extra)
            self.wfile.write(body + b"\0" * 64)
            self.close_connection = True
            return
        self._reply(status, body, "application/octet-stream", extra)

    def _misbehave(self, fault, status, body, extra):
        """Bodies that are too large or too slow; every loop is bounded in bytes and time."""
        length = {"huge-length": str(10 << 30), "wrong-length": str(len(body) + 1), "endless": None}.get(fault, str(len(body)))
        self._headers(status, "application/octet-stream", {**extra, **({"Content-Length": length} if length else {})})
        try:
            if fault in ("huge-length", "endless"):  # zeros until the client hangs up (at most 8 MiB)
                for _ in range(128):
                    self.wfile.write(b"\0" * 65536)
            elif fault == "wrong-length":
                self.wfile.write(body + b"\0")
            elif fault == "trickle":  # one byte every 0.2 s, for at most 4 s
                for byte in body[:20]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            elif fault == "silent":  # headers, then nothing for 3 s
                time.sleep(3)
            elif fault == "one-byte":  # one byte per connection
                self.wfile.write(body[:1])
            elif fault == "chunks":  # the whole body, in three pieces a moment apart
                third = len(body) // 3
                for piece in (body[:third], body[third : 2 * third], body[2 * third :]):
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _slow_headers(self, status, body, extra):
        head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/octet-stream\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            for k in range(40):
                self.wfile.write(head[k : k + 1])
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(head[40:] + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _headers(self, status, content_type, extra):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def _reply(self, status, body, content_type, extra=None):
        self._headers(status, content_type, {**(extra or {}), "Content-Length": str(len(body))})
        self.wfile.write(body)


class Mirror:
    """A running fake mirror: its URL, files, manifest and request log."""

    def __init__(self, root: Path, server: ThreadingHTTPServer):
        self.root = root
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}{server.prefix.rstrip('/')}"
        self.data = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.nii.gz")}
        self.manifest = {path: blob_sha1(data) for path, data in self.data.items()}
        self.ids = tuple(sorted({int(re.search(r"study_(\d+)", path)[1]) for path in self.data}))

    def fault(self, path: str, mode: str) -> None:
        self.server.faults[path] = mode

    def requests(self, path: str | None = None) -> list[tuple[str, str | None]]:
        with self.server.lock:
            return [r for r in self.server.requests if path is None or r[0] == path]

    def download(self, out: Path, **kwargs) -> list[Path]:
        options = dict(mirror=self.url, ids=self.ids, manifest=self.manifest, backoff=0, timeout=5, progress=False)
        from covidseg.download import download

        return download(out, **{**options, **kwargs})


@contextlib.contextmanager
def serve_mirror(root: Path, prefix: str = "/v1.0/") -> Iterator[Mirror]:
    """A fake data mirror serving the ``*.nii.gz`` files under ``root`` at ``<url>/<path>``, where
    the URL ends in ``prefix`` (like the GitHub mirror's tag); no faults until asked for."""
    with serve_http(FaultyMirror, root=root, prefix=prefix, faults={}, requests=[], lock=threading.Lock(), delay=0.0) as server:
        yield Mirror(root, server)
