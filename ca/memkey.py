"""Load a certificate chain and key into an `ssl.SSLContext` from memory.

`ssl` loads keys only from files, so the key is handed over through an anonymous in-memory file
(memfd) that exists only inside this process: the key never touches a disk or another process.
Its own module so that the h2 gRPC client (`ca.h2grpc`) does not load `ca.tls`'s X.509 stack.
"""

from __future__ import annotations

import os
import ssl


def load_pem_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    fd_cert = os.memfd_create("fedgate-cert", os.MFD_CLOEXEC)
    fd_key = os.memfd_create("fedgate-key", os.MFD_CLOEXEC)
    try:
        os.write(fd_cert, cert_pem)
        os.write(fd_key, key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd_cert}", f"/proc/self/fd/{fd_key}")
    finally:
        os.close(fd_cert)
        os.close(fd_key)
