"""Modules stay under ~500 lines and functions under ~80 (their docstrings not counted),
unless a reason is written next to them (docs/design.md, "Layout"): a ``# Long module: ...``
comment line in the module, a ``# Long: ...`` comment line in the comments right above the
function's ``def`` (or its decorators)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "magnet_st"
MODULE_LINES = 500
FUNCTION_LINES = 80


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if doc and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def _comments_above(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    top = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    out = []
    while top > 0 and lines[top - 1].strip().startswith("#"):
        top -= 1
        out.append(lines[top].strip())
    return out


def unexplained(src: Path = SRC) -> list[str]:
    """Modules and functions over the limits with no reason written next to them."""
    bad = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        name = str(path.relative_to(src))
        if len(lines) > MODULE_LINES and not any(x.startswith("# Long module: ") for x in lines):
            bad.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node)
                reasons = [c for c in _comments_above(lines, node) if c.startswith("# Long: ")]
                if n > FUNCTION_LINES and not reasons:
                    bad.append(f"{name}:{node.lineno} {node.name}: {n} lines")
    return bad


def test_long_modules_and_functions_say_why() -> None:
    assert unexplained() == []


def test_an_unexplained_long_function_is_caught(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_LINES + 1))
    (tmp_path / "a.py").write_text(f'def f():\n    """Doc."""\n{body}\n\ndef g():\n    x = 1\n')
    assert unexplained(tmp_path) == [f"a.py:1 f: {FUNCTION_LINES + 2} lines"]
    (tmp_path / "a.py").write_text(f"# Long: a reason\n@staticmethod\ndef f():\n{body}")
    assert unexplained(tmp_path) == []
    (tmp_path / "b.py").write_text("x = 1\n" * (MODULE_LINES + 1))
    assert unexplained(tmp_path) == [f"b.py: {MODULE_LINES + 1} lines"]
    (tmp_path / "b.py").write_text("# Long module: a reason\n" + "x = 1\n" * MODULE_LINES)
    assert unexplained(tmp_path) == []
