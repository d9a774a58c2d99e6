"""The issue-7 benchmark's one command works as a new user runs it: `bench/transports.py`
builds its own rig, runs direct TCP, the gateway hops and a whole `tls` chain (sidecars
multiplexing), reports every figure for each, and leaves no namespace behind. Timing is not
asserted (benchmarks never fail on it); that every measured call was served is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clusters.rig import netns
from tests.e2e.conftest import _why_no_rig

pytestmark = pytest.mark.rig

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "fgbt"  # not the bench's default "fgb": a user's bench run is never touched
CHAINS = ("direct", "gw-tls", "tls")


def test_the_bench_runs_on_its_own_rig_and_cleans_up(tmp_path: Path) -> None:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "results.json"
    argv = [sys.executable, str(ROOT / "bench" / "transports.py"), "--chains", ",".join(CHAINS)]
    argv += ["--seconds", "0.3", "--repeat", "1", "--where", "rig", "--rig-prefix", PREFIX]
    done = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rig: fgbt-east-client" in done.stdout  # it ran inside its rig, not on loopback
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(CHAINS)
    for name, r in results.items():
        assert r["mbps_1"] > 0, name
        assert r["mbps_16"] > 0, name
        for rate in (100, 1000, 5000):
            assert r[f"lat_{rate}"]["lost"] == 0, (name, rate)
        assert r["newconn"]["n"] > 0, name
        assert r["burst"]["failed"] == 0, name
        assert r["paced"]["served"] == 1000, name
    # The hops were measured as the separate processes they are.
    assert set(results["tls"]["cpu_s_per_gb"]) == {
        "gw-east",
        "gw-west",
        "sc-src",
        "sc-dst",
        "server",
    }
    assert not [n for n in netns.list_netns() if n.startswith(f"{PREFIX}-")]
