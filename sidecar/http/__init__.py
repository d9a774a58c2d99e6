"""HTTP/1.1 in the source sidecar: a sans-I/O codec, an upstream connection pool and the driver
that routes each request on its own (see `sidecar.http.proxy`)."""
