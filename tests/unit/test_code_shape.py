"""The package's functions stay short enough to read in one screen (issue #18)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_kvcache"
MAX_LINES = 80


def long_functions(package: Path, max_lines: int) -> list[str]:
    """``file:line: function is N lines`` for every function longer than ``max_lines``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > max_lines:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {node.name} is {length} lines")
    return found


def test_no_function_is_longer_than_80_lines():
    too_long = long_functions(PACKAGE, MAX_LINES)
    assert not too_long, f"functions longer than {MAX_LINES} lines:\n" + "\n".join(too_long)
