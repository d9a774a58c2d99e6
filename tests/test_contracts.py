"""The import contracts (`.importlinter`) and mypy cover every package: a package added later
cannot slip past them. (Inside a package, the contracts use wildcards and whole packages.)"""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "bench"}


def packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_SHIPPED


def test_every_package_is_a_root_of_the_contracts_and_in_its_layers() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    assert set(config["importlinter"]["root_packages"].split()) == packages()
    layered = set(re.findall(r"\w+", config["importlinter:contract:layers"]["layers"]))
    assert layered == packages()
    acyclic = set(config["importlinter:contract:acyclic"]["ancestors"].split())
    assert acyclic == packages()


def test_every_package_is_type_checked_and_installed() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["mypy"]["packages"]) == packages()
    shipped = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.removesuffix("*") for p in shipped} == packages()
