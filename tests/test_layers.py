"""Imports point down the pipeline: each part of magnet_st imports only from parts below it
(docs/design.md, "Layout"). Checked on the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "magnet_st"

#: bottom to top; a part may import from the parts before it, and from itself
LAYERS = (
    "errors",
    "registry",
    "util",
    "io",
    "data",
    "read",
    "synthetic",
    "prepare",
    "features",
    "model",
    "predict",
    "train",
    "evaluate",
    "plot",
    "report",
    "pp",
    "tl",
    "pl",
    "demo",
    "cli",
    "__init__",
    "__main__",
)


def _part(path: Path, src: Path = SRC) -> str:
    return path.relative_to(src).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, part of magnet_st) of every import of magnet_st in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "magnet_st":
                names = [f"magnet_st.{a.name}" for a in node.names]
            elif node.module.startswith("magnet_st."):
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("magnet_st.")]
        out += [(node.lineno, n.split(".")[1]) for n in names]
    return out


def upward_imports(src: Path = SRC) -> list[str]:
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad = []
    for path in sorted(src.rglob("*.py")):
        part = _part(path, src)
        assert part in rank, f"{path}: a part of magnet_st not in LAYERS"
        for line, target in _imports(path):
            if target != part and target != "__version__" and rank[target] > rank[part]:
                bad.append(f"{path.relative_to(src)}:{line}: {part} imports {target}")
    return bad


def test_imports_point_down_the_pipeline() -> None:
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    pkg = tmp_path / "magnet_st"
    (pkg / "model").mkdir(parents=True)
    (pkg / "model" / "x.py").write_text("def f():\n    from magnet_st.train import fit\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "y.py").write_text("from magnet_st.model import x\n")
    assert upward_imports(pkg) == ["model/x.py:2: model imports train"]


def test_every_folder_is_a_layer() -> None:
    parts = {_part(p) for p in SRC.rglob("*.py")}
    assert parts <= set(LAYERS), parts - set(LAYERS)
