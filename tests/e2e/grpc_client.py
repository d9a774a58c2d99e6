"""A grpcio client run inside a rig pod by the e2e tests (`ip netns exec ... python ...`).

usage: grpc_client.py call TARGET N [--delay-ms D] [--parallel] [--timeout S] [--header K=V]
       grpc_client.py control TARGET [--fail-ratio R]
`call` makes N calls of Echo.Call on one channel (in turn, or all at once) and prints one JSON
list of [outcome, detail, seconds] (outcome: the answering pod, or the status code's name).
`control` prints Echo.Control's counters (setting the fail ratio first if given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")  # the pod's resolv.conf, via getaddrinfo

import grpc

from clusters.rig.api import echo_pb2, echo_pb2_grpc


def call(
    stub: echo_pb2_grpc.EchoStub,
    n: int,
    delay_ms: int,
    parallel: bool,
    timeout: float,
    metadata: list[tuple[str, str]],
) -> list[list[object]]:
    req = echo_pb2.CallRequest(text="hi", delay_ms=delay_ms)
    out: list[list[object]] = []
    if parallel:
        started = time.monotonic()
        futs = [stub.Call.future(req, timeout=timeout, metadata=metadata) for _ in range(n)]
        done: dict[int, float] = {}  # when each call ended, not when we looked at it
        for i, f in enumerate(futs):
            f.add_done_callback(lambda _, i=i: done.setdefault(i, time.monotonic() - started))
        for i, f in enumerate(futs):
            try:
                pod = f.result().pod
                out.append([pod, "", done.get(i, time.monotonic() - started)])
            except grpc.RpcError as e:
                out.append(
                    [e.code().name, e.details() or "", done.get(i, time.monotonic() - started)]
                )
        return out
    for _ in range(n):
        started = time.monotonic()
        try:
            reply = stub.Call(req, timeout=timeout, metadata=metadata)
            out.append([reply.pod, "", time.monotonic() - started])
        except grpc.RpcError as e:
            out.append([e.code().name, e.details() or "", time.monotonic() - started])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("call", "control"))
    p.add_argument("target")
    p.add_argument("n", type=int, nargs="?", default=1)
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--fail-ratio", type=float)
    p.add_argument("--header", action="append", default=[])
    a = p.parse_args()
    metadata = [tuple(h.split("=", 1)) for h in a.header]
    with grpc.insecure_channel(a.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        if a.mode == "call":
            print(json.dumps(call(stub, a.n, a.delay_ms, a.parallel, a.timeout, metadata)))
            return
        req = echo_pb2.ControlRequest(
            set_fail_ratio=a.fail_ratio is not None, fail_ratio=a.fail_ratio or 0.0
        )
        stats = stub.Control(req, timeout=5)
        print(
            json.dumps(
                {"calls": stats.calls, "failed": stats.failed, "fail_ratio": stats.fail_ratio}
            )
        )


if __name__ == "__main__":
    main()
