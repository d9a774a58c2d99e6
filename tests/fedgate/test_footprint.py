"""Import weight (docs/footprint.md): a process loads only what its kind uses.

Each case runs a child interpreter, since this test process has imported everything already:
`startup_child` starts a real `Sidecar` through the same telemetry set-up as `fedgate sidecar`,
and the per-kind import paths are those of `fedgate/processes.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
CONFIG_STACK = ("yaml", "jsonschema", "pydantic", "federation.gitops")


def _child(*argv: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])  # log lines come first
    assert isinstance(result, dict)
    return result


def test_a_sidecar_without_an_otlp_endpoint_never_imports_the_sdk_or_exporter() -> None:
    started = _child("-m", "tests.fedgate.startup_child")
    modules = started["modules"]
    assert isinstance(modules, list)
    assert started["tracing"] is False
    assert "sidecar.sidecar" in modules  # the child did start a sidecar
    assert [m for m in modules if m.startswith("opentelemetry")] == []


def test_a_sidecar_with_an_otlp_endpoint_loads_the_exporter_and_traces(tmp_path: Path) -> None:
    # The exporter's channel connects lazily: nothing needs to listen on the socket.
    started = _child("-m", "tests.fedgate.startup_child", f"unix:{tmp_path / 'otlp.sock'}")
    modules = started["modules"]
    assert isinstance(modules, list)
    assert started["tracing"] is True
    assert EXPORTER in modules


_IMPORTS = """
import importlib, json, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
print(json.dumps({"modules": sorted(sys.modules)}))
"""
# The proxies' gRPC client modules are the default --grpc-client's (h2), loaded at the first
# connect; `--grpc-client grpcio` loads grpc.aio instead.
_CLIENT = ("federation.api.client", "federation.api.h2_stream", "ca.h2grpc")
_GRPCIO = ("federation.api.client", "federation.api.grpcio_stream", "ca.api.ca_pb2_grpc")
_PATHS = {  # what each `fedgate <kind>` command imports on its way to running
    "sidecar": ("fedgate.cli", "fedgate.processes", "sidecar.sidecar", *_CLIENT),
    "gateway": ("fedgate.cli", "fedgate.processes", "gateway.gateway", *_CLIENT),
    "agent": ("fedgate.cli", "fedgate.processes", "clusters.agent", "federation.store"),
}


def _is_grpc(module: str) -> bool:
    return module == "grpc" or module.startswith(("grpc.", "grpc_"))


@pytest.mark.parametrize("kind", sorted(_PATHS))
def test_only_the_controller_loads_the_yaml_and_schema_stack(kind: str) -> None:
    loaded = _child("-c", _IMPORTS, *_PATHS[kind])["modules"]
    assert isinstance(loaded, list)
    assert "ca.api.ca_pb2" in loaded  # the wire contract stays gRPC's protobuf messages
    assert [m for m in loaded if m.startswith(CONFIG_STACK)] == []
    assert EXPORTER not in loaded


@pytest.mark.parametrize("kind", ["sidecar", "gateway"])
def test_a_proxy_on_the_default_grpc_client_never_imports_grpc(kind: str) -> None:
    loaded = _child("-c", _IMPORTS, *_PATHS[kind])["modules"]
    assert isinstance(loaded, list)
    assert "ca.h2grpc" in loaded
    assert [m for m in loaded if _is_grpc(m)] == []


def test_the_grpcio_client_is_still_selectable() -> None:
    # The counterpart: `--grpc-client grpcio` loads grpc.aio, so the check above can fail.
    base = ("fedgate.cli", "fedgate.processes", "sidecar.sidecar")
    loaded = _child("-c", _IMPORTS, *base, *_GRPCIO)["modules"]
    assert isinstance(loaded, list)
    assert "grpc.aio" in loaded


def test_the_controller_does_load_the_yaml_and_schema_stack() -> None:
    # The counterpart of the test above: the same check on the controller's path finds it.
    loaded = _child("-c", _IMPORTS, "fedgate.cli", "fedgate.processes", "federation.gitops.sync")
    modules = loaded["modules"]
    assert isinstance(modules, list)
    assert "yaml" in modules
    assert "pydantic" in modules


_LOG_LINES = """
import logging, structlog
from fedgate import logs
logs.configure("sidecar", "east")
structlog.get_logger("fedgate.sidecar").info("request", status=200)
logging.getLogger("grpc").warning("from %s", "grpc")
"""


def test_log_lines_keep_their_fields_without_the_caller_lookup() -> None:
    # logs.configure turns off stdlib logging's per-record caller, thread and process lookups
    # (half an access line's cost); the lines must not lose a field for it.
    out = subprocess.run(
        [sys.executable, "-c", _LOG_LINES], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    own, foreign = (json.loads(line) for line in out.stderr.strip().splitlines())
    assert own.pop("timestamp")
    assert foreign.pop("timestamp")
    assert own == {
        "event": "request",
        "status": 200,
        "level": "info",
        "logger": "fedgate.sidecar",
        "component": "sidecar",
        "cluster": "east",
    }
    assert foreign == {
        "event": "from grpc",
        "level": "warning",
        "logger": "grpc",
        "component": "sidecar",
        "cluster": "east",
    }


_CLI = """
import json, sys
from click.testing import CliRunner
from fedgate.cli import main
before = sorted(m for m in sys.modules if m.startswith("fedgate.cli_"))
listed = CliRunner().invoke(main, ["--help"]).output
ca_help = CliRunner().invoke(main, ["ca", "--help"])
after = sorted(m for m in sys.modules if m.startswith("fedgate.cli_"))
print(json.dumps({"before": before, "listed": listed, "ca": ca_help.exit_code, "after": after}))
"""


def test_operator_subcommands_are_listed_but_imported_only_when_invoked() -> None:
    result = _child("-c", _CLI)
    assert result["before"] == ["fedgate.cli_lazy"]
    listed = result["listed"]
    assert isinstance(listed, str)
    for command in ("ca", "config", "status", "top", "authz", "check", "sidecar"):
        assert f"\n  {command} " in listed
    assert result["ca"] == 0
    after = result["after"]
    assert isinstance(after, list)
    assert "fedgate.cli_ca" in after
