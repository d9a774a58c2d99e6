"""Running the host tools the rig drives (ip, iptables, sysctl), with errors that say what failed.

Every command runs with check=True and captured output; a failure becomes a `CommandError`
naming the command and quoting its stderr. This module does not decide *what* to run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from clusters.rig.errors import CommandError

IP = "ip"
IPTABLES = "iptables"
SYSCTL = "sysctl"


def netns_exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """`ip netns exec NS argv...`: also bind-mounts /etc/netns/NS/* over /etc (resolv.conf)."""
    return [IP, "netns", "exec", netns, *argv]


def run(argv: Sequence[str], *, timeout: float = 30.0) -> str:
    """Run `argv` to completion and return its stdout; raise `CommandError` on any failure."""
    args = list(argv)
    try:
        done = subprocess.run(
            args,
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    except subprocess.CalledProcessError as e:
        raise CommandError(args, e.returncode, e.stderr or "") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(args, None, f"timed out after {timeout:g}s") from e
    except OSError as e:  # the binary is missing or not executable
        raise CommandError(args, None, str(e)) from e
    return done.stdout


def run_in(netns: str, argv: Sequence[str], *, timeout: float = 30.0) -> str:
    """Run `argv` inside `netns` (see `netns_exec_argv`)."""
    return run(netns_exec_argv(netns, argv), timeout=timeout)
