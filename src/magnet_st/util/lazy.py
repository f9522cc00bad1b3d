"""lazy: a package's public names, imported from its modules on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, names: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose public ``names``
    live in its submodules (``name -> submodule``), each imported when first asked for."""
    pkg = importlib.import_module(package)

    def getattr_(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(pkg, name, value)
        return value

    def dir_() -> list[str]:
        return sorted({*vars(pkg), *names})

    return getattr_, dir_, sorted(names)
