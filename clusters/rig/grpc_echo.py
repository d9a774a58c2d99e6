"""The rig's gRPC sample workload: a grpcio server whose reply names the cluster and pod.

Like `clusters.rig.echo` it is an ordinary, mesh-unaware program on plaintext HTTP/2 (h2c);
the sidecar in its pod makes it reachable over mTLS. `Echo.Call` waits `delay_ms`, then answers
with the pod's name, or fails with UNAVAILABLE at the configured fail ratio (set with
`--fail-ratio` or at run time with `Echo.Control`, which also returns the counters: calls and
failed). `Echo.Chat` answers each message of a bidirectional stream as it arrives. Tests call
`Control` on 127.0.0.1 inside the pod; it is not counted as a call.
(grpcio's server API does not show the `:authority`, so unlike the HTTP echo this one cannot
tell mirrored calls by their `-shadow` host: tests send a mirror to pods that get nothing else.)
With `--h2-port`, the HTTP/2 echo (`clusters.rig.h2_echo`) runs in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from clusters.rig.api import echo_pb2, echo_pb2_grpc
from clusters.rig.echo import EchoControl
from clusters.rig.h2_echo import serve_h2

MAX_DELAY_MS = 60_000
WORKERS = 64  # concurrent calls (each delayed call holds a thread)


@dataclass
class GrpcEchoControl:
    fail_ratio: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    calls: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> bool:
        """Count a call; whether it must fail."""
        with self.lock:
            self.calls += 1
            fail = self.fail_ratio > 0 and self.rng.random() < self.fail_ratio
            self.failed += fail
            return fail

    def stats(self) -> echo_pb2.Stats:
        with self.lock:
            return echo_pb2.Stats(calls=self.calls, failed=self.failed, fail_ratio=self.fail_ratio)


class EchoService(echo_pb2_grpc.EchoServicer):
    def __init__(self, cluster: str, pod: str, control: GrpcEchoControl) -> None:
        self._cluster = cluster
        self._pod = pod
        self._ctl = control

    def Call(  # noqa: N802 - the generated servicer's naming
        self, request: echo_pb2.CallRequest, context: grpc.ServicerContext
    ) -> echo_pb2.CallReply:
        fail = self._ctl.count()
        if request.delay_ms:
            time.sleep(min(request.delay_ms, MAX_DELAY_MS) / 1000)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._pod} failed on purpose")
        return echo_pb2.CallReply(cluster=self._cluster, pod=self._pod, text=request.text)

    def Chat(  # noqa: N802 - the generated servicer's naming
        self, requests: Iterator[echo_pb2.CallRequest], context: grpc.ServicerContext
    ) -> Iterator[echo_pb2.CallReply]:
        self._ctl.count()
        for request in requests:
            yield echo_pb2.CallReply(cluster=self._cluster, pod=self._pod, text=request.text)

    def Control(  # noqa: N802 - the generated servicer's naming
        self, request: echo_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> echo_pb2.Stats:
        if request.set_fail_ratio:
            with self._ctl.lock:
                self._ctl.fail_ratio = min(1.0, max(0.0, request.fail_ratio))
        return self._ctl.stats()


def make_server(
    cluster: str, pod: str, host: str, port: int, control: GrpcEchoControl | None = None
) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    service = EchoService(cluster, pod, control or GrpcEchoControl())
    echo_pb2_grpc.add_EchoServicer_to_server(service, server)
    server.add_insecure_port(f"{host}:{port}")
    return server


def main(argv: list[str] | None = None) -> None:
    """`python -m clusters.rig.grpc_echo --cluster C --pod P [--port N] [--fail-ratio R]
    [--h2-port M]` (with M, the HTTP/2 echo of `clusters.rig.h2_echo` runs too)."""
    p = argparse.ArgumentParser(prog="grpc_echo")
    p.add_argument("--cluster", required=True)
    p.add_argument("--pod", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--fail-ratio", type=float, default=0.0)
    p.add_argument("--h2-port", type=int, default=0)
    a = p.parse_args(argv)
    server = make_server(a.cluster, a.pod, a.host, a.port, GrpcEchoControl(a.fail_ratio))
    server.start()
    if a.h2_port:
        ctl = EchoControl(a.fail_ratio)
        asyncio.run(serve_h2(a.cluster, a.pod, a.host, a.h2_port, ctl))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
