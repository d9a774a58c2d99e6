#!/bin/sh
# Regenerates the rig's gRPC echo code (echo_pb2*.py, .pyi); run from the repository root.
set -eu
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. clusters/rig/api/echo.proto
pyi=clusters/rig/api/echo_pb2.pyi
{ echo '# mypy: disable-error-code="type-arg"'; cat "$pyi"; } > "$pyi.tmp" && mv "$pyi.tmp" "$pyi"
