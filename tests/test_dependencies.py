"""Every package the code imports is declared in pyproject.toml.

An import that only works because something else pulled the package in (or because it was
installed by hand) breaks on a fresh machine; ``undeclared_imports.py`` from the shared tools
walks the package's and the tests' imports and maps each to the distribution that provides it in
the running environment. Run inside the environment ``.ci/run`` builds, so it sees exactly what
``pip install -e '.[dev]'`` installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT.parent / "shared" / "tools" / "undeclared_imports.py"


def test_every_direct_import_is_a_declared_dependency() -> None:
    assert CHECKER.is_file(), f"{CHECKER} is missing: the shared tools must sit beside the checkout"
    result = subprocess.run(
        [sys.executable, str(CHECKER), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"undeclared imports:\n{result.stdout}{result.stderr}"
    )
