"""Exception family of the rig plumbing (clusters/rig/).

Third-party and OS errors (subprocess, OSError, json) are translated at the module that meets
them, with `raise ... from e`, so the CLI needs to catch only `RigError`.
"""

from __future__ import annotations


class RigError(Exception):
    """Base of every error raised by clusters/rig/."""


class CommandError(RigError):
    """A command (ip, iptables, sysctl, ...) failed; the message names it and quotes stderr."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        status = "could not be run" if returncode is None else f"exited {returncode}"
        detail = stderr.strip() or "(no stderr)"
        super().__init__(f"command {' '.join(argv)!r} {status}: {detail}")


class StateError(RigError):
    """The rig state file is missing a field, has a wrong type, or is not JSON."""


class WaitTimeoutError(RigError):
    """What the rig waited for (a port, a URL) was not ready by the deadline, or the process
    expected to serve it exited first. The message ends with the tail of its log, if known."""
