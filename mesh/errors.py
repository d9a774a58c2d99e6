"""Exception family of the shared core.

Each component boundary has its own family; these are the ones raised by pure code in mesh/.
"""


class MeshError(Exception):
    """Base of every error raised by mesh/."""


class InvalidNameError(MeshError):
    """A clusterset service name or SPIFFE ID is malformed."""


class CodecError(MeshError):
    """Bytes received from a peer do not decode (malformed or oversized)."""


class NoRouteError(MeshError):
    """No healthy destination exists for a call."""
