"""HTTP/2 and gRPC in the source sidecar: each stream routed on its own (issue 6)."""
