"""A/B of two source trees on one `tls` chain, alternated round by round (a benchmark: prints,
never asserts).

    .venv/bin/python bench/tls_ab.py A_TREE B_TREE [--chain gw-tls|tls] [--rounds 4]
                                     [--seconds 3] [--rate 1000]

Each tree is a checkout of this repository (e.g. `git archive <rev> | tar -x -C /tmp/a`, with
`.venv` linked in). For every round and tree it brings up that tree's chain (the processes of
`bench/transports.py`, imported from the tree), uploads over 16 streams for `--seconds`
(MB/s and CPU seconds per GB of every process, from /proc), then runs 1 KiB echoes at `--rate`
per second (p50/p99 and the CPU seconds each process spent per 1,000 exchanges). Rounds
alternate A, B, A, B... so load from other users of the machine hits both alike; it prints
each round and the medians. CPU per GB and per exchange vary far less than throughput on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
root, chain_name = Path(sys.argv[1]), sys.argv[2]
seconds, rate = float(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, str(root))
sys.argv = [str(root / "bench" / "transports.py")]
import bench.transports as bt
import uvloop

async def main():
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-ab-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    port = bt.free_port()
    cfg = {"role": "server", "host": "127.0.0.1", "port": port}
    server = bt.start(bt.role("server", cfg, workdir), "server", logdir)
    pki = bt.Pki(workdir)
    chain = bt.fedgate_chain(chain_name, "tls", 1350, pki, ("127.0.0.1", port), workdir, logdir,
                             sidecars=not chain_name.startswith("gw-"))
    bt._preamble = chain.preamble
    out = {}
    try:
        await bt.upload(chain.entry, 0.3)
        pids = {n: p.pid for n, p in chain.procs.items()}
        before = {n: bt.cpu_seconds(pid) for n, pid in pids.items()}
        t0 = time.perf_counter()
        mbps = await bt.throughput(chain.entry, 16, seconds)
        gb = mbps * (time.perf_counter() - t0) / 1e3
        out["mbps_16"] = mbps
        out["cpu_s_per_gb"] = {n: (bt.cpu_seconds(pid) - before[n]) / gb for n, pid in pids.items()}
        before = {n: bt.cpu_seconds(pid) for n, pid in pids.items()}
        lat = await bt.latency(chain.entry, rate, seconds)
        k = (int(rate * seconds) - lat["lost"]) / 1000
        out["lat"] = lat
        out["cpu_s_per_1k"] = {n: (bt.cpu_seconds(pid) - before[n]) / k for n, pid in pids.items()}
    finally:
        chain.stop()
        server.terminate()
        server.wait(5)
    print("RESULT " + json.dumps(out), flush=True)

uvloop.run(main())
"""


def one(tree: Path, chain: str, seconds: float, rate: int) -> dict:
    python = tree / ".venv" / "bin" / "python"
    argv = [str(python), "-c", ONE_RUN, str(tree), chain, str(seconds), str(rate)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tree)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise SystemExit(f"{tree}: no result\n{done.stdout}\n{done.stderr}")


def summary(r: dict) -> str:
    gw = {k: round(v, 3) for k, v in r["cpu_s_per_gb"].items()}
    k1 = {k: round(v, 3) for k, v in r["cpu_s_per_1k"].items()}
    lat = r["lat"]
    return (
        f"{r['mbps_16']:7.0f} MB/s  CPU s/GB {gw} sum {sum(gw.values()):.3f}  "
        f"p50/p99 {lat['p50_ms']:.3f}/{lat['p99_ms']:.3f} ms  CPU s/1k {k1}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--chain", default="gw-tls", choices=("gw-tls", "tls"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=int, default=1000)
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(args.rounds):
        for name, tree in (
            (("A", args.a), ("B", args.b)) if i % 2 == 0 else (("B", args.b), ("A", args.a))
        ):
            r = one(tree.resolve(), args.chain, args.seconds, args.rate)
            runs[name].append(r)
            print(f"round {i + 1} {name}: {summary(r)}", flush=True)
    for name, rs in runs.items():
        med = statistics.median
        gb = {k: med(r["cpu_s_per_gb"][k] for r in rs) for k in rs[0]["cpu_s_per_gb"]}
        k1 = {k: med(r["cpu_s_per_1k"][k] for r in rs) for k in rs[0]["cpu_s_per_1k"]}
        print(
            f"median {name}: {med(r['mbps_16'] for r in rs):.0f} MB/s; CPU s/GB "
            f"{ {k: round(v, 3) for k, v in gb.items()} }; "
            f"p50 {med(r['lat']['p50_ms'] for r in rs):.3f} ms, "
            f"p99 {med(r['lat']['p99_ms'] for r in rs):.3f} ms; CPU s/1k exchanges "
            f"{ {k: round(v, 4) for k, v in k1.items()} }"
        )


if __name__ == "__main__":
    sys.exit(main())
