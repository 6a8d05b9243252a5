"""The package's wings import only downwards, and the pytest plugin stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import telephony

PACKAGE = Path(telephony.__file__).parent
RANK = {
    "audio": 0,
    "twilio": 1,
    "settings": 1,  # it checks Twilio-side values (transfer targets) with the twilio wing
    "call": 2,
    "agents": 2,
    "server": 3,
    "testing": 4,
    "cli": 5,
}
"""A wing may import a wing of lower rank (and itself), never one above it."""


def _wing(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> set[str]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                found.add(".".join([*base, *(node.module or "").split(".")]).rstrip("."))
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("telephony.")}


def test_no_wing_imports_upwards() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        wing = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if wing == "__init__":
            continue
        for name in _imports(path):
            target = _wing(name)
            if target != wing and RANK[target] > RANK[wing]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert upward == []


def test_the_pytest_plugin_imports_neither_the_server_nor_adk() -> None:
    code = (
        "import sys, telephony.testing.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith(('telephony.server', 'google.adk',"
        " 'quart', 'telephony.call'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
