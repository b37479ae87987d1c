"""Tests for covidseg.models: the four thesis models, their sizes and their pretrained weights.

No test touches the network: the Hugging Face cache is pointed at an empty folder, and smp's
download function and the Hub probe are replaced by stubs where a test depends on them.
"""

import copy
import functools

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
import segmentation_models_pytorch as smp
import segmentation_models_pytorch.encoders as smp_encoders

from covidseg import models
from covidseg.errors import CovidsegError, WeightsUnavailableError
from covidseg.models import (
    ENCODERS,
    LESION_PRIOR,
    MODEL_NAMES,
    UNet,
    build_model,
    count_parameters,
    output_head,
)

# the sizes the thesis reports, in parameters
THESIS_PARAMETERS = {
    "unet": 31.0e6,  # Ronneberger et al.'s U-Net at width 64 (with batch norm here)
    "unet-vgg19": 29.1e6,
    "unet-resnet34": 24.4e6,
    "unet-mobilenetv2": 6.6e6,
}
TOLERANCE = 0.02
SMALL_ENCODER = "mobilenet_v2"  # small enough to save and load in a test
SMALL_MODEL = "unet-mobilenetv2"
REAL_HF_HUB_DOWNLOAD = smp_encoders.hf_hub_download


@functools.cache
def _built(name):
    return build_model(name, encoder_weights=None)


def randomly_initialised(name):
    """A fresh copy of model ``name`` with random weights (VGG19 alone takes seconds to build)."""
    return copy.deepcopy(_built(name))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_backward_at_64(name):
    torch.manual_seed(0)
    model = randomly_initialised(name)
    x = torch.randn(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 1, 64, 64)
    logits.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_new_model_predicts_the_lesion_prior(name):
    """Lesions are rare: an untrained model starts near LESION_PRIOR, not at 0.5, everywhere."""
    torch.manual_seed(0)
    model = randomly_initialised(name)
    assert torch.allclose(output_head(model).bias, torch.logit(torch.tensor(LESION_PRIOR)))
    with torch.no_grad():
        probabilities = torch.sigmoid(model(torch.randn(2, 1, 64, 64)))
    assert probabilities.median() < 0.1
    assert output_head(UNet(width=4)).bias.abs().max() < 1  # the bare class keeps PyTorch's init


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inference_at_512(name):
    model = randomly_initialised(name).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 512, 512))
    assert logits.shape == (1, 1, 512, 512)
    assert torch.isfinite(logits).all()


def test_parameter_counts_match_the_thesis():
    counts = {name: count_parameters(randomly_initialised(name)) for name in MODEL_NAMES}
    for name, count in counts.items():
        print(f"{name}: {count:,} parameters ({count / 1e6:.2f} M)")
    for name, count in counts.items():
        assert count == pytest.approx(THESIS_PARAMETERS[name], rel=TOLERANCE), name


def test_width_applies_to_unet_only():
    assert count_parameters(build_model("unet", width=16)) < count_parameters(_built("unet")) / 10
    assert count_parameters(build_model(SMALL_MODEL, encoder_weights=None, width=16)) == \
        count_parameters(build_model(SMALL_MODEL, encoder_weights=None, width=64))


def test_unet_structure():
    model = UNet(width=8, depth=3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    # 2 per level on the way down (4 levels incl. the bottleneck), 2 per level up, the head
    assert len(convs) == 2 * 4 + 2 * 3 + 1
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 1
    assert max(c.out_channels for c in convs) == 8 * 2**3
    assert model(torch.zeros(1, 1, 24, 40)).shape == (1, 1, 24, 40)


def test_unet_rejects_sizes_not_divisible_by_2_to_the_depth():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet(width=4)(torch.zeros(1, 1, 64, 60))


def test_wrong_name_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("unet-resnet50")
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_unet_ignores_encoder_weights():
    assert isinstance(build_model("unet", encoder_weights="imagenet", width=8), UNet)


# --------------------------------------------------------------------------------------------
# ImageNet weights from the Hugging Face Hub
# --------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and an smp download that fails the test if it is called."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def no_download(*args, **kwargs):
        pytest.fail(f"smp tried to download {args} {kwargs}")

    monkeypatch.setattr(smp_encoders, "hf_hub_download", no_download)
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("offline_by", ["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_imagenet_offline_fails_at_once(empty_hf_cache, monkeypatch, name, offline_by):
    if offline_by == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(models, "_hub_reachable", lambda url: pytest.fail("probed the Hub"))
    else:
        probed = []
        monkeypatch.setattr(models, "_hub_reachable", lambda url: probed.append(url) or False)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(name)
    message = str(info.value)
    assert isinstance(info.value, CovidsegError)
    assert "\n" not in message
    assert "encoder_weights=None" in message and "--encoder-weights PATH" in message
    assert f"smp-hub/{ENCODERS[name]}.imagenet" in message
    if offline_by == "unreachable":
        revision = smp_encoders.encoders[ENCODERS[name]]["pretrained_settings"]["imagenet"][
            "revision"]
        assert probed == [f"{hf_constants.ENDPOINT}/smp-hub/{ENCODERS[name]}.imagenet/resolve/"
                          f"{revision}/config.json"]


def test_imagenet_online_lets_smp_download(empty_hf_cache, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def failing_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename))
        raise LocalEntryNotFoundError("connection reset")

    monkeypatch.setattr(models, "_hub_reachable", lambda url: True)
    monkeypatch.setattr(smp_encoders, "hf_hub_download", failing_download)
    with pytest.raises(WeightsUnavailableError, match="could not download"):
        build_model(SMALL_MODEL)
    assert calls == [(f"smp-hub/{SMALL_ENCODER}.imagenet", "config.json")]


def test_hub_probe_gives_up_on_a_hanging_lookup(monkeypatch):
    import threading
    import urllib.request

    release = threading.Event()

    def hanging_urlopen(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(urllib.request, "urlopen", hanging_urlopen)
    try:
        assert models._hub_reachable("https://huggingface.co", timeout=0.2) is False
    finally:
        release.set()


def rgb_encoder_state():
    """The state dict of a randomly initialised 3-channel encoder, as ImageNet files hold it."""
    torch.manual_seed(0)
    encoder = smp.encoders.get_encoder(SMALL_ENCODER, in_channels=3, weights=None)
    return {key: value.clone().contiguous() for key, value in encoder.state_dict().items()}


FIRST_CONV = "features.0.0.weight"  # of mobilenet_v2


def assert_encoder_holds(model, rgb_state):
    state = model.encoder.state_dict()
    assert state.keys() == rgb_state.keys()
    assert state[FIRST_CONV].shape[1] == 1 and rgb_state[FIRST_CONV].shape[1] == 3
    assert torch.allclose(state[FIRST_CONV], rgb_state[FIRST_CONV].sum(dim=1, keepdim=True))
    for key, value in rgb_state.items():
        if key != FIRST_CONV:
            assert torch.equal(state[key], value), key


def test_imagenet_weights_from_the_cache_need_no_network(empty_hf_cache, monkeypatch):
    # a cache laid out as huggingface_hub does it, holding random "ImageNet" weights
    settings = smp_encoders.encoders[SMALL_ENCODER]["pretrained_settings"]["imagenet"]
    snapshot = (empty_hf_cache / ("models--" + settings["repo_id"].replace("/", "--"))
                / "snapshots" / settings["revision"])
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    rgb_state = rgb_encoder_state()
    save_file(rgb_state, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(smp_encoders, "hf_hub_download", REAL_HF_HUB_DOWNLOAD)  # undo the stub
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # any request would raise
    monkeypatch.setattr(models, "_hub_reachable", lambda url: pytest.fail("probed the Hub"))

    from_cache = build_model(SMALL_MODEL)  # smp's own loading, with its patch_first_conv
    assert_encoder_holds(from_cache, rgb_state)
    from_folder = build_model(SMALL_MODEL, encoder_weights=snapshot)  # our loading
    for key, value in from_cache.encoder.state_dict().items():
        assert torch.equal(from_folder.encoder.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------
# Local weights files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["file.pth", "file.safetensors", "folder"])
def test_local_weights_load_with_the_first_conv_summed(tmp_path, layout):
    rgb_state = rgb_encoder_state()
    if layout == "file.pth":
        path = tmp_path / "mobilenet_v2.pth"
        torch.save(rgb_state, path)
    elif layout == "file.safetensors":
        path = tmp_path / "encoder.safetensors"
        save_file(rgb_state, str(path))
    else:
        path = tmp_path / "snapshot"
        path.mkdir()
        (path / "config.json").write_text("{}")
        torch.save(rgb_state, path / "pytorch_model.bin")
    model = build_model(SMALL_MODEL, encoder_weights=str(path))
    assert_encoder_holds(model, rgb_state)
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_grey_image_gives_the_rgb_response(tmp_path):
    # the point of summing the kernel: a grey slice g behaves as the RGB image (g, g, g)
    rgb_state = rgb_encoder_state()
    torch.save(rgb_state, tmp_path / "w.pth")
    grey = build_model(SMALL_MODEL, encoder_weights=tmp_path / "w.pth").encoder.eval()
    rgb = smp.encoders.get_encoder(SMALL_ENCODER, in_channels=3, weights=None)
    rgb.load_state_dict(dict(rgb_state))
    rgb.eval()
    g = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(g)[-1], rgb(g.expand(1, 3, 32, 32))[-1], atol=1e-4)


def test_not_a_weights_file_names_the_file(tmp_path):
    notes = tmp_path / "weights.pth"
    notes.write_text("not a pickle")
    with pytest.raises(CovidsegError, match="weights.pth: cannot be read as a state dict"):
        build_model(SMALL_MODEL, encoder_weights=notes)
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(CovidsegError, match="readme.txt: not a weights file"):
        build_model(SMALL_MODEL, encoder_weights=text)


def test_weights_of_another_encoder_name_the_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(smp.encoders.get_encoder("resnet18", weights=None).state_dict(), path)
    with pytest.raises(CovidsegError, match="resnet18.pth: does not fit the MobileNetV2Encoder"):
        build_model(SMALL_MODEL, encoder_weights=path)


def test_missing_weights_path_and_empty_folder(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="absent.pth: no such weights file"):
        build_model(SMALL_MODEL, encoder_weights=tmp_path / "absent.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="empty: folder holds no weights files"):
        build_model(SMALL_MODEL, encoder_weights=tmp_path / "empty")
