"""TrafficPolicies from a config directory (the controller's `--config-dir` seed).

A thin front of the GitOps validation (`federation.gitops.validate`): the directory is read
exactly as a commit of the config repository would be (every `*.yaml`/`*.yml` file below it,
hidden directories such as `.git` skipped, every document of every file validated with the
full schema and its cross-references) and nothing is returned unless all of it is valid. The
error lists every issue, one per line, each naming the file, document, field and reason.
"""

from __future__ import annotations

from pathlib import Path

from federation.errors import PolicyFileError
from federation.gitops.errors import RepositoryError
from federation.gitops.validate import validate_directory
from mesh.model import TrafficPolicy


def load_policies(directory: Path) -> tuple[TrafficPolicy, ...]:
    """Every TrafficPolicy under `directory`, sorted by service; raises PolicyFileError."""
    if not directory.is_dir():
        raise PolicyFileError(f"{directory}: not a directory")
    try:
        result = validate_directory(directory)
    except RepositoryError as e:
        raise PolicyFileError(str(e)) from e
    if result.config is None:
        raise PolicyFileError("\n".join(f"{directory}/{issue}" for issue in result.issues))
    return result.config.policies
