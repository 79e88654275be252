"""The core stays pure: no module under roomserver/core imports I/O or framework packages."""

from __future__ import annotations

import ast
from pathlib import Path

import roomserver.core

FORBIDDEN = {"twisted", "autobahn", "txaio", "redis", "txredisapi", "sqlite3", "socket", "asyncio", "select",
             "threading", "subprocess"}


def test_core_imports_nothing_that_does_io() -> None:
    core = Path(roomserver.core.__file__).parent
    offenders = []
    for path in core.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
