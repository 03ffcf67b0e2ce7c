"""One version string: the package's is pyproject's (setuptools reads that one)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import textinv
from textinv import version


def test_the_package_version_is_pyprojects():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["version"] == version.__version__ == textinv.__version__
