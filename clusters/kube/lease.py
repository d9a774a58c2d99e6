"""`LeaseElection`: the asyncio driver of leader election on a `coordination.k8s.io/v1` Lease.

Every `retry_period` it reads the Lease, asks the pure core (`clusters.kube.election`) what to
write, writes it with the read `resourceVersion` (a stale one is answered 409 and changes
nothing), and tells `on_change` whenever this replica starts or stops leading. The Lease is
read and written as JSON, so its MicroTime strings round-trip unchanged. Each request times
out after `retry_period`, so a hung API server cannot keep a leader leading past its renew
deadline unnoticed. `run()` releases the Lease when cancelled while leading (unless
`release_on_cancel` is off, as a crash would leave it).

It does not decide what a leader does: the agent's wiring gates catalog publishing and the
MCS write-back on `on_change` (fedgate.processes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import kubernetes
import urllib3

from clusters.kube.election import (
    Create,
    ElectionSettings,
    Elector,
    LeaseRecord,
    Observed,
    Update,
    Wait,
)

_log = logging.getLogger("fedgate.clusters.kube.lease")

API_VERSION = "coordination.k8s.io/v1"
# What a request can raise: an error status, or no answer (refused, reset, timed out).
_ERRORS = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError)


def micro_time(t: float) -> str:
    """A `metav1.MicroTime` as the API writes it: RFC 3339, microseconds, UTC."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_of(lease: dict[str, Any]) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime") or "",
        renew_time=spec.get("renewTime") or "",
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def spec_of(record: LeaseRecord) -> dict[str, Any]:
    return {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "acquireTime": record.acquire_time or None,
        "renewTime": record.renew_time or None,
        "leaseTransitions": record.transitions,
    }


DEFAULT_SETTINGS = ElectionSettings()


class LeaseElection:
    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        on_change: Callable[[bool], Awaitable[None]],
        settings: ElectionSettings = DEFAULT_SETTINGS,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        release_on_cancel: bool = True,
    ) -> None:
        # Any: called with JSON bodies and `_preload_content=False` (raw responses), which the
        # client's stubs do not describe.
        self._api: Any = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self._elector = Elector(identity, settings)
        self._settings = settings
        self._on_change = on_change
        self._clock, self._wall = clock, wall_clock
        self._rng = rng or random.Random()
        self._release_on_cancel = release_on_cancel  # client-go's ReleaseOnCancel
        self._resource_version = ""
        self.leading = False
        self.transitions = 0  # metric: times this replica started leading

    @property
    def identity(self) -> str:
        return self._elector.identity

    def status(self) -> dict[str, object]:
        return {
            "lease": f"{self.namespace}/{self.name}",
            "identity": self.identity,
            "leading": self.leading,
            "holder": self._elector.observed_holder,
        }

    async def run(self) -> None:
        try:
            while True:
                await self._try_once()
                await self._set(self._elector.is_leader(self._clock()))
                # Followers jitter (client-go's JitterFactor 1.2) so they do not race in step.
                jitter = 1.0 if self.leading else 1.0 + 0.2 * self._rng.random()
                await asyncio.sleep(self._settings.retry_period * jitter)
        finally:
            if self.leading and self._release_on_cancel:
                await asyncio.shield(self._release())

    async def _try_once(self) -> None:
        try:
            observed = await asyncio.to_thread(self._read)
        except _ERRORS as e:
            _log.warning("lease %s/%s: read failed: %s", self.namespace, self.name, e)
            self._elector.failed(self._clock())
            return
        action = self._elector.decide(observed, self._clock(), micro_time(self._wall()))
        match action:
            case Wait():
                return
            case Create(record):
                await self._write(record, None)
            case Update(record, resource_version):
                await self._write(record, resource_version)
            case _:
                raise AssertionError(f"unknown election action {action!r}")

    async def _write(self, record: LeaseRecord, resource_version: str | None) -> None:
        try:
            await asyncio.to_thread(self._put, record, resource_version)
        except _ERRORS as e:
            if isinstance(e, kubernetes.client.ApiException) and e.status == 409:
                # Another replica wrote first: read again next round.
                _log.info("lease %s/%s: lost a write race", self.namespace, self.name)
            else:
                _log.warning("lease %s/%s: write failed: %s", self.namespace, self.name, e)
            self._elector.failed(self._clock())
            return
        self._elector.succeeded(record, self._clock())

    async def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            self.transitions += 1
        _log.warning(
            "lease %s/%s: %s %s",
            self.namespace,
            self.name,
            self.identity,
            "started leading" if leading else "stopped leading",
        )
        await self._on_change(leading)

    async def _release(self) -> None:
        record = self._elector.release(micro_time(self._wall()))
        if record is not None:
            try:
                await asyncio.to_thread(self._put, record, self._resource_version)
            except _ERRORS as e:
                _log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, e)
        await self._set(False)

    # --- blocking calls (run in a thread) ---------------------------------------------------

    def _read(self) -> Observed:
        try:
            resp = self._api.read_namespaced_lease(
                self.name,
                self.namespace,
                _preload_content=False,
                _request_timeout=self._settings.retry_period,
            )
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return Observed(None)
            raise
        lease = json.loads(resp.data)
        self._resource_version = lease["metadata"].get("resourceVersion", "")
        return Observed(record_of(lease), self._resource_version)

    def _put(self, record: LeaseRecord, resource_version: str | None) -> None:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        body = {"apiVersion": API_VERSION, "kind": "Lease", "metadata": metadata}
        body["spec"] = spec_of(record)
        timeout = self._settings.retry_period
        if resource_version is None:
            resp = self._api.create_namespaced_lease(
                self.namespace, body, _preload_content=False, _request_timeout=timeout
            )
        else:
            metadata["resourceVersion"] = resource_version
            resp = self._api.replace_namespaced_lease(
                self.name, self.namespace, body, _preload_content=False, _request_timeout=timeout
            )
        self._resource_version = json.loads(resp.data)["metadata"].get("resourceVersion", "")
