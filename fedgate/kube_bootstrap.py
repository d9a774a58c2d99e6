"""Wiring of the bootstrap writer inside the agent (`--source kubernetes --control-root FILE`).

The ConfigMaps' content is read on each sync: the CA directory's published roots (so a root
rotation shows up; the agent also pokes the writer when they change) and the control plane's
root from `--control-root` (re-read, so replacing the mounted file is enough).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from clusters.kube.bootstrap import BootstrapData
    from clusters.kube.bootstrap_writer import BootstrapWriter
    from fedgate.identity import AgentCA

_log = structlog.get_logger("fedgate.agent")


def writer(api_client: Any, ca: AgentCA, control_root: Path | None) -> BootstrapWriter | None:
    """The writer, or None (and a warning) without `control_root`: a ConfigMap lacking
    `control.pem` would keep injected pods from starting, so none is written."""
    if control_root is None:
        _log.warning(
            "no --control-root: injected namespaces get no fedgate-bootstrap ConfigMap",
            hint="give the control plane's root PEM, or create the ConfigMaps yourself",
        )
        return None
    from clusters.kube.bootstrap import BootstrapData
    from clusters.kube.bootstrap_writer import BootstrapWriter

    def data() -> BootstrapData:
        return BootstrapData(ca.published_roots(), control_root.read_text(), ca.trust_domain)

    try:
        data()  # fail at start, not at the first sync, if the file is unreadable or empty
    except (OSError, ValueError) as e:
        raise SystemExit(f"fedgate: --control-root {control_root}: {e}") from e
    return BootstrapWriter(api_client, data)
