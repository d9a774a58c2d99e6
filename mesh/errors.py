"""Exception family of the shared core.

Each component boundary has its own family; these are the ones raised by pure code in mesh/.
"""


class MeshError(Exception):
    """Base of every error raised by mesh/."""


class NameError_(MeshError):  # noqa: N801 - trailing underscore avoids shadowing the builtin
    """A clusterset service name or SPIFFE ID is malformed."""


class CodecError(MeshError):
    """Bytes received from a peer do not decode (malformed or oversized)."""


class NoRouteError(MeshError):
    """No healthy destination exists for a call."""
