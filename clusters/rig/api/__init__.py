"""The rig's gRPC echo contract (`echo.proto`) and its generated code (`generate.sh`)."""
