"""The identity boundary's exception family."""


class CAError(Exception):
    """Base of every error raised by ca/."""


class VerificationError(CAError):
    """A peer's certificate was refused; the message says exactly why."""


class CertificateExpiredError(VerificationError):
    """A certificate of the chain is past its notAfter. A connection authenticated while the
    certificate was valid may be drained rather than cut (see `gateway` revalidation)."""


class DeniedError(VerificationError):
    """The certificate verifies, but its identity (or its whole trust domain) is on the
    federation's deny list."""


class IssuanceError(CAError):
    """A certificate could not be issued (bad CSR, unknown token, ...)."""


class RotationError(CAError):
    """A CA directory or root rotation step is invalid (the message says what to do)."""
