"""torchfile: read files written by ``torch.save`` safely, with one clear line on failure.

Every model, checkpoint and weights file magnet-st reads goes through :func:`load`:
``torch.load(weights_only=True)`` (tensors and plain types only; no pickled code runs),
and a file that cannot be read that way is an :class:`~magnet_st.errors.InputError`
naming the file and what it was expected to be. torch's own message for such files
advises retrying with ``weights_only=False``, which would run whatever code the file
holds: that advice is never passed on.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from magnet_st.errors import InputError

__all__ = ["describe_error", "load"]


def describe_error(exc: BaseException) -> str:
    """What went wrong reading a torch file, in one line, without torch's advice to load
    it unsafely."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        return (
            f"{type(exc).__name__}: not a plain torch.save file of tensors (corrupt, truncated, "
            "or holding Python objects, which magnet-st never loads)"
        )
    return f"{type(exc).__name__}: {text[:200]}"


def load(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; :class:`InputError` ("cannot
    read WHAT: ...") when the file is missing or not a safe torch file."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(p, f"{what} not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise InputError(p, f"cannot read {what}: {describe_error(exc)}") from None
