"""The deny list in etcd: written by `fedgate ca deny/allow`, read by the CA (renewals).

Only keys under `/fedgate/config/denied/` are touched (format: `ca.denylist`). The controller
reads the same prefix with the rest of /fedgate/config/ (`federation.fedconfig`) and pushes it
in the snapshot, so every verifier enforces it within one push; this module serves the two
other parties: the operator's CLI and the cluster CAs, which must also refuse to renew a denied
SVID but hold no config stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from etcd3aio import Etcd3Client, prefix_range_end

from ca import denylist
from federation import keys
from federation.errors import StoreError
from federation.etcd import store_errors
from federation.store import kv_service
from mesh.codec import cluster_from_json, decode
from mesh.model import ClusterInfo

_log = structlog.get_logger("fedgate.federation.denied")

assert keys.DENIED_PREFIX == denylist.DENIED_PREFIX  # one layout, two readers
TIMEOUT = 5.0


async def load(client: Etcd3Client) -> tuple[denylist.Denial, ...]:
    """Every well-formed entry (malformed ones are logged and skipped)."""
    prefix = denylist.DENIED_PREFIX
    with store_errors("read deny list"):
        response = await kv_service(client).get(prefix, prefix_range_end(prefix), timeout=TIMEOUT)
    out = []
    for item in response.kvs:
        suffix = item.key.decode("utf-8", "replace")[len(prefix) :]
        try:
            out.append(denylist.decode(suffix, item.value))
        except ValueError as e:
            _log.warning("skipping malformed deny entry", error=str(e))
    return tuple(sorted(out, key=lambda d: d.entry))


async def put(client: Etcd3Client, denial: denylist.Denial) -> None:
    with store_errors("write deny entry"):
        await kv_service(client).put(
            denylist.key_for(denial.entry), denylist.encode(denial), timeout=TIMEOUT
        )


async def delete(client: Etcd3Client, entry: str) -> bool:
    """Remove `entry`; False if it was not denied."""
    with store_errors("delete deny entry"):
        response = await kv_service(client).delete(denylist.key_for(entry), timeout=TIMEOUT)
    return int(response.deleted) > 0


async def cluster_info(client: Etcd3Client, cluster: str) -> ClusterInfo | None:
    """The cluster's published info (to resolve `--cluster` to its trust domain)."""
    with store_errors("read cluster info"):
        response = await kv_service(client).get(keys.info_key(cluster), timeout=TIMEOUT)
    if not response.kvs:
        return None
    info: ClusterInfo = decode(response.kvs[0].value, cluster_from_json, "cluster info")
    return info


async def follow(
    client: Etcd3Client, install: Callable[[frozenset[str]], None], interval: float = 1.0
) -> None:
    """Poll the deny list every `interval` seconds and `install` it whenever it changes.

    A small prefix read per second per CA; polling rather than a watch keeps this adapter
    trivially correct across etcd restarts. Read failures keep the last list and are logged
    once per outage."""
    last: frozenset[str] | None = None
    failing = False
    while True:
        try:
            entries = frozenset(d.entry for d in await load(client))
            if failing:
                _log.info("deny list readable again")
            failing = False
            if entries != last:
                install(entries)
                _log.info("deny list", entries=sorted(entries))
                last = entries
        except StoreError as e:
            if not failing:
                _log.warning("cannot read deny list, keeping the last one", error=str(e))
            failing = True
        await asyncio.sleep(interval)
