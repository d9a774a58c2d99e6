#!/bin/sh
# Regenerates the CA's gRPC code; run from the repository root.
set -eu
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. ca/api/ca.proto
