"""TLS as a sans-I/O object over memory BIOs, with TLS 1.3 half-close (RFC 8446 §6.1).

`TlsSession` takes ciphertext in (`feed`) and gives ciphertext out (`outgoing`); plaintext goes
through `send`/`read`. `close_write` sends close_notify and leaves the read direction open;
a close_notify from the peer sets `read_closed`. `tls_failure` maps `ssl` errors to the short
reasons operators search logs for. No I/O and no clock here: `sidecar.pipe` drives it.
"""

from __future__ import annotations

import contextlib
import ssl

from sidecar.errors import ProxyError

READ_CHUNK = 256 * 1024
WRITE_BATCH = 64 * 1024  # plaintext per SSL_write in `encrypt`: whole 16 KiB records


class TlsSession:
    """TLS over two memory BIOs: ciphertext in and out, plaintext through calls. No I/O."""

    def __init__(
        self, ctx: ssl.SSLContext, server_side: bool, session: ssl.SSLSession | None = None
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        # `session` (client side): a ticket to resume with (sidecar.resume).
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, session=session)
        self.handshake_done = False
        self.read_closed = False  # the peer's close_notify arrived
        self.write_closed = False  # ours was sent

    def feed(self, data: bytes | memoryview) -> None:
        self._in.write(data)

    def handshake(self) -> bool:
        """Advance the handshake with what was fed; True once complete. Raises ssl.SSLError."""
        if not self.handshake_done:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.handshake_done = True
        return True

    def read(self) -> list[bytes]:
        """Plaintext decrypted from what was fed; sets `read_closed` on close_notify."""
        chunks: list[bytes] = []
        while not self.read_closed:
            try:
                chunk = self.obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self.read_closed = True
                break
            chunks.append(chunk)
        return chunks

    def send(self, data: bytes) -> None:
        self.obj.write(data)

    def encrypt(self, data: bytes) -> list[bytes]:
        """`send`, then `outgoing`, in batches of at most `WRITE_BATCH`: the outgoing BIO is
        emptied after each, so it never grows to the size of a large write (OpenSSL grows it
        by reallocating, copying and wiping). Ciphertext pending before comes first."""
        if len(data) <= WRITE_BATCH:
            self.obj.write(data)
            return [self._out.read()]
        view = memoryview(data)
        out = []
        for start in range(0, len(view), WRITE_BATCH):
            self.obj.write(view[start : start + WRITE_BATCH])
            out.append(self._out.read())
        return out

    def close_write(self) -> None:
        """Queue close_notify: our direction ends, the peer's may continue (RFC 8446 §6.1)."""
        if not self.write_closed:
            self.write_closed = True
            # The first SSL_shutdown sends close_notify; Python then tries to read the peer's
            # and reports "want read", which only means it has not arrived yet.
            with contextlib.suppress(ssl.SSLWantReadError):
                self.obj.unwrap()

    def outgoing(self) -> bytes:
        return self._out.read()


def tls_failure(e: ssl.SSLError) -> ProxyError:
    """Short reason categories for TLS failures, as operators search for them in logs."""
    if isinstance(e, ssl.SSLCertVerificationError):
        code = e.verify_code
        if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            return ProxyError("expired", e.verify_message)
        if code in (2, 19, 20, 21):  # issuer unknown / self-signed in chain / no local issuer
            return ProxyError("foreign root", e.verify_message)
        return ProxyError("certificate rejected", e.verify_message)
    if e.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return ProxyError("no client certificate", str(e))
    if e.reason and "ALERT" in e.reason:
        return ProxyError("tls alert from peer", e.reason.lower())
    return ProxyError("tls error", str(e))
