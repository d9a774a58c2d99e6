"""`fedgate capture`: the transparent-capture rules, as the injected init container installs them.

`fedgate capture install` is what `fedgate-init` runs in every injected pod; it makes the rules
with `sidecar.capture.capture_rules`, the one function the rig's sidecars also use, so a pod in
Kubernetes and a pod of the rig are captured by the same rules. `fedgate capture rules` prints
them without installing (to read or diff).
"""

from __future__ import annotations

from collections.abc import Callable

import click
from click.decorators import FC

from sidecar.capture import CAPTURE_GID, CaptureConfig


def _port(flag: str, default: int, what: str) -> Callable[[FC], FC]:
    return click.option(
        flag, type=click.IntRange(1, 65535), default=default, show_default=True, help=what
    )


def _capture_options(f: FC) -> FC:
    defaults = CaptureConfig()
    for opt in reversed(
        [
            _port("--outbound-port", defaults.outbound_port, "Where outgoing TCP is redirected."),
            _port("--inbound-port", defaults.inbound_port, "The sidecar's mTLS port (kept open)."),
            click.option(
                "--proxy-gid",
                type=click.IntRange(0),
                default=CAPTURE_GID,
                show_default=True,
                help="The sidecar's GID: its own connections are not captured.",
            ),
            click.option(
                "--accept-port",
                "accept_ports",
                type=click.IntRange(1, 65535),
                multiple=True,
                help="Another inbound port accepted without the sidecar (its probe port); "
                "repeatable.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _config(
    outbound_port: int, inbound_port: int, proxy_gid: int, accept_ports: tuple[int, ...]
) -> CaptureConfig:
    return CaptureConfig(outbound_port, inbound_port, proxy_gid, accept_ports)


@click.group("capture")
def capture() -> None:
    """Transparent capture (iptables) of a pod's traffic into its sidecar."""


@capture.command("rules")
@_capture_options
def rules(
    outbound_port: int, inbound_port: int, proxy_gid: int, accept_ports: tuple[int, ...]
) -> None:
    """Print the iptables-restore rules, without installing them."""
    from sidecar.capture import capture_rules

    click.echo(
        capture_rules(_config(outbound_port, inbound_port, proxy_gid, accept_ports)), nl=False
    )


@capture.command("install")
@_capture_options
def install(
    outbound_port: int, inbound_port: int, proxy_gid: int, accept_ports: tuple[int, ...]
) -> None:
    """Install the rules in this network namespace (root with NET_ADMIN; the init container)."""
    from sidecar import capture as cap
    from sidecar.errors import CaptureError

    text = cap.capture_rules(_config(outbound_port, inbound_port, proxy_gid, accept_ports))
    try:
        cap.install(text)
    except CaptureError as e:
        raise click.ClickException(str(e)) from e
    click.echo(text, nl=False)  # what was installed, for `kubectl logs -c fedgate-init`
