"""A non-editable install works outside the clone: the wheel ships the
schemas inside the package and the command line under the package's namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, build_store

IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache",
                                ".hypothesis", "runs", "demo-out", "results")


def run(*cmd, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_wheel_installs_and_runs_outside_the_clone(tmp_path, synthetic_tables):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)  # build outputs stay out of the working tree
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", tmp_path / "dist", cwd=src)
    (wheel,) = (tmp_path / "dist").glob("kdstore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(ROOT)) for p in [*ROOT.glob("kdstore/**/__init__.py"), *ROOT.glob("trainers/**/__init__.py")]}
    assert {str(Path(n).parent) for n in names if n.endswith("__init__.py")} == packages  # no package left out
    assert {"kdstore/schemas/layout.json", "kdstore/schemas/manifest.schema.json", "kdstore/schemas/groups.schema.json",
            "kdstore/command/cli.py"} <= set(names)
    assert "cli.py" not in names and not any(n.startswith(("tests/", "bench/", "schemas/")) for n in names)

    # a fresh venv that sees the test environment's dependencies, not the clone
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(py, "-c", "import importlib.util as u, kdstore, kdstore.validate as v; "
                "print(kdstore.__file__, v.SCHEMA_DIR, u.find_spec('cli'))", cwd=elsewhere).stdout.split()
    assert all(w.startswith(str(site)) for w in where[:2]) and where[2] == "None", where
    store = build_store(tmp_path / "s.zarr", *synthetic_tables)
    kdstore = venv / "bin" / "kdstore"
    assert "valid" in run(kdstore, "validate", store.path, cwd=elsewhere).stderr
    assert f"{len(store.segments)} in" in run(kdstore, "info", store.path, cwd=elsewhere).stdout
    uid = int(store.group("teacher").uids[0])
    assert run(kdstore, "query", store.path, uid, cwd=elsewhere).stdout.startswith(f"{uid} (")
    assert "Run the whole pipeline" in run(kdstore, "demo", "--help", cwd=elsewhere).stdout


def test_console_script_of_the_editable_install(tmp_path):
    """The installed ``kdstore`` command of this environment (``pip install -e .``) runs
    ``cli.py`` in place, from any directory."""
    script = Path(sys.executable).parent / "kdstore"
    if not script.exists():
        pytest.skip(f"no kdstore console script beside {sys.executable}")
    assert "kdstore gc" in run(script, "gc", "--help", cwd=tmp_path).stdout.replace("Usage: ", "")
