"""The version is the installed distribution's, and the CLI and the changelog say the same."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import convex_guard

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_package_metadata() -> None:
    assert convex_guard.__version__ == importlib.metadata.version("convex-guard")
    assert "__version__" in convex_guard.__all__


def test_version_without_installed_metadata_is_a_placeholder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    try:
        with monkeypatch.context() as patched:
            patched.setattr(importlib.metadata, "version", missing)
            assert importlib.reload(convex_guard).__version__ == "0+unknown"
    finally:
        importlib.reload(convex_guard)  # the real metadata again, for the tests after this one
    assert convex_guard.__version__ == importlib.metadata.version("convex-guard")


def test_cli_version_flag_prints_the_version() -> None:
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "convex_guard.cli", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"convex-guard {convex_guard.__version__}"


def test_changelog_has_a_section_for_the_project_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert releases and releases[0] == project
    assert "## [Unreleased]" in changelog
