"""The identity boundary's exception family."""


class CAError(Exception):
    """Base of every error raised by ca/."""


class VerificationError(CAError):
    """A peer's certificate was refused; the message says exactly why."""


class IssuanceError(CAError):
    """A certificate could not be issued (bad CSR, unknown token, ...)."""
