"""The ``kdstore`` console script.

The command line is ``cli.py`` at the top of the repository. A wheel installs it as
``kdstore/command/cli.py`` (``package-dir`` in pyproject.toml); an editable install or a
source checkout runs the file in place.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def main() -> None:
    """Run the ``kdstore`` command line."""
    try:
        cli = importlib.import_module("kdstore.command.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("kdstore.command", "kdstore.command.cli"):
            raise
        spec = importlib.util.spec_from_file_location("cli", Path(__file__).resolve().parents[1] / "cli.py")
        cli = sys.modules["cli"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
    cli.main()
