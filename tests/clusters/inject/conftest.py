"""Shared by the injection tests: the fixtures, the settings they were made with, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from clusters.inject.spec import InjectSettings
from fedgate import inject_config
from fedgate.cli import main
from tests.etcd_fixture import etcd_server  # noqa: F401  (registers the fixture)

FIXTURES = Path(__file__).with_name("fixtures")
GOLDEN = FIXTURES / "golden"
CONFIG = FIXTURES / "inject.yaml"
# The oldest Kubernetes the injected pods must be valid for (native sidecars need 1.29).
KUBERNETES_VERSION = "1.30.0"
INJECTED = ("deployment-with-init", "statefulset", "list")


@pytest.fixture
def settings() -> InjectSettings:
    return inject_config.load(CONFIG)


def run_inject(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`fedgate inject --config fixtures/inject.yaml ARGS`: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, ["inject", "--config", str(CONFIG), *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def objects(text: str) -> list[dict[str, Any]]:
    """Every object of a YAML stream, a List's items in place of the List."""
    out: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if doc is not None:
            out += doc["items"] if doc.get("kind") == "List" else [doc]
    return out


def validate(obj: dict[str, Any]) -> None:
    """Raises kubernetes_validate's ValidationError if `obj` is not a valid object."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
