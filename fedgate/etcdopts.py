"""How fedgate processes and tools reach etcd: TLS and etcd auth, from flags or environment.

`fedgate agent` and `fedgate controller` take `--etcd-ca`, `--etcd-cert`, `--etcd-key`,
`--etcd-server-name`, `--etcd-user` and `--etcd-password-file`; each also reads the
`FEDGATE_ETCD_*` variable named in `ENV`, which is how the operator tools that take `--etcd`
(`fedgate status`, `check`, `ca ...`, `config ...`) reach a federation whose etcd speaks TLS
with auth on (as `etcdctl` reads `ETCDCTL_CACERT`, `ETCDCTL_USER`, ...). Read once, at the
command line's edge; nothing below fedgate/ reads the environment.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

ENV = {
    "ca": "FEDGATE_ETCD_CA",
    "cert": "FEDGATE_ETCD_CERT",
    "key": "FEDGATE_ETCD_KEY",
    "server_name": "FEDGATE_ETCD_SERVER_NAME",
    "user": "FEDGATE_ETCD_USER",
    "password_file": "FEDGATE_ETCD_PASSWORD_FILE",
}


@dataclass(frozen=True, slots=True)
class EtcdClientOptions:
    """How to reach etcd: TLS when `ca` is set, etcd auth when `user` is."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    user: str = ""
    password_file: Path | None = None

    def connect_kwargs(self, user: str = "", password: str = "") -> dict[str, Any]:
        """Keyword arguments for `federation.etcd.open_client` (files read here, once)."""
        from federation.etcd import EtcdCredentials

        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        kw: dict[str, Any] = {
            "ca_cert": read(self.ca),
            "cert_chain": read(self.cert),
            "cert_key": read(self.key),
            "server_name": self.server_name or None,
        }
        user = user or self.user
        if user:
            if not password and self.password_file is not None:
                password = self.password_file.read_text().strip()
            kw["credentials"] = EtcdCredentials(user, password)
        return kw


def from_env(environ: Mapping[str, str] | None = None) -> EtcdClientOptions:
    env = os.environ if environ is None else environ

    def path(field: str) -> Path | None:
        value = env.get(ENV[field], "")
        return Path(value) if value else None

    return EtcdClientOptions(
        ca=path("ca"),
        cert=path("cert"),
        key=path("key"),
        server_name=env.get(ENV["server_name"], ""),
        user=env.get(ENV["user"], ""),
        password_file=path("password_file"),
    )


def env_connect_kwargs() -> dict[str, Any]:
    """`open_client`/`etcd_client` keyword arguments from the FEDGATE_ETCD_* variables."""
    return from_env().connect_kwargs()


F = TypeVar("F", bound=Callable[..., Any])


def etcd_client_options(f: F) -> F:
    """Adds --etcd-ca, --etcd-cert, --etcd-key, --etcd-server-name, --etcd-user and
    --etcd-password-file, collected into one `etcd_client: EtcdClientOptions` parameter."""
    # Not `exists=True`: a missing file is reported when the process reads it at start.
    file = click.Path(path_type=Path, dir_okay=False)
    helps = {
        "ca": "CA verifying etcd's certificate (turns TLS on).",
        "cert": "Client certificate (mutual TLS).",
        "key": "The client certificate's key.",
        "server_name": "Name to verify in etcd's certificate [default: the first endpoint's].",
        "user": "etcd user (etcd auth: docs/kubernetes.md).",
        "password_file": "File holding that user's password.",
    }
    options = [
        click.option(
            "--etcd-" + field.replace("_", "-"),
            type=str if field in ("server_name", "user") else file,
            default="" if field in ("server_name", "user") else None,
            envvar=ENV[field],
            show_envvar=True,
            help=text,
        )
        for field, text in helps.items()
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["etcd_client"] = EtcdClientOptions(
            ca=kwargs.pop("etcd_ca"),
            cert=kwargs.pop("etcd_cert"),
            key=kwargs.pop("etcd_key"),
            server_name=kwargs.pop("etcd_server_name"),
            user=kwargs.pop("etcd_user"),
            password_file=kwargs.pop("etcd_password_file"),
        )
        return f(*args, **kwargs)

    out: Any = wrapper
    for opt in reversed(options):
        out = opt(out)
    return out  # type: ignore[no-any-return]
