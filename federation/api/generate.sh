#!/bin/sh
# Regenerates the config stream's gRPC code (config_pb2*.py, .pyi); run from the repository root.
set -eu
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. federation/api/config.proto
# protoc's stub annotates message-typed constructor arguments with a bare `Mapping`, which
# strict mypy rejects; tell mypy so in the generated file rather than loosening the whole repo.
pyi=federation/api/config_pb2.pyi
{ echo '# mypy: disable-error-code="type-arg"'; cat "$pyi"; } > "$pyi.tmp" && mv "$pyi.tmp" "$pyi"
