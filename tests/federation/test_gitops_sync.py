"""The GitOps sync against real git repositories and a real etcd."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client

from federation.errors import NotLeaderError
from federation.fedconfig import config_from_entries
from federation.gitops.errors import GitError, SyncNotRunningError
from federation.gitops.git import GitRepository, redact
from federation.gitops.store import (
    COMMIT_KEY,
    FEDERATION_KEY,
    REJECTION_KEY,
    ConfigStore,
)
from federation.gitops.sync import GitOpsSync
from mesh.codec import decode, policy_from_json
from mesh.model import ClusterWeight, TrafficPolicy
from tests.federation.gitops_fixtures import AUTHZ, FULL_POLICY, Origin, git, policy
from tests.helpers import until

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

ECHO_KEY = "/fedgate/config/policies/demo/echo"


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def make_sync(origin: Origin, etcd: Etcd3Client, tmp_path: Path, **kwargs: object) -> GitOpsSync:
    repo = GitRepository(str(origin.url), "main", tmp_path / "clone", fetch_timeout=10)
    store = ConfigStore(etcd, **kwargs)  # type: ignore[arg-type]
    return GitOpsSync(repo, store, poll_interval=3600, now=lambda: "2025-01-01T00:00:00+00:00")


async def raw(etcd: Etcd3Client) -> dict[str, tuple[bytes, int]]:
    assert etcd.kv is not None
    response = await etcd.kv.get(b"/fedgate/", b"/fedgate0")
    return {i.key.decode(): (bytes(i.value), int(i.mod_revision)) for i in response.kvs}


async def echo_weights(etcd: Etcd3Client) -> tuple[ClusterWeight, ...]:
    value = (await raw(etcd))[ECHO_KEY][0]
    p: TrafficPolicy = decode(value, policy_from_json, ECHO_KEY)
    return p.cluster_weights


async def test_a_commit_changing_weights_is_applied_in_one_transaction(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    sync = make_sync(origin, etcd, tmp_path)
    first = origin.commit("echo 70/30", policies__echo_yaml=policy(70, 30), authz_yaml=AUTHZ)
    outcome = await sync.sync_once()
    assert (outcome.result, outcome.sha) == ("applied", first)
    assert await echo_weights(etcd) == (ClusterWeight("local", 70), ClusterWeight("remote", 30))

    second = origin.commit("echo 50/50", policies__echo_yaml=policy(50, 50), authz_yaml=None)
    assert (await sync.sync_once()).result == "applied"
    keys = await raw(etcd)
    assert await echo_weights(etcd) == (ClusterWeight("local", 50), ClusterWeight("remote", 50))
    record = json.loads(keys[COMMIT_KEY][0])
    assert record == {
        "sha": second,
        "branch": "main",
        "subject": "echo 50/50",
        "appliedAt": "2025-01-01T00:00:00+00:00",
    }
    # One transaction: the changed policy and the commit record share one revision, and the
    # authorization policy removed from the repository is gone from etcd.
    assert keys[ECHO_KEY][1] == keys[COMMIT_KEY][1]
    config, problems = config_from_entries({k: v for k, (v, _) in keys.items()})
    assert (config.authorization, problems) == ((), ())
    assert FEDERATION_KEY in keys
    assert (await sync.sync_once()).result == "up-to-date"
    assert sync.counts["applied"] == 2


BAD_COMMITS = {
    "bad-yaml": (
        {"policies__echo_yaml": policy(50, 50) + "  timeout: [2s\n"},
        "policies/echo.yaml",
        "",
        "not valid YAML",
    ),
    "unknown-field": (
        {"policies__echo_yaml": policy(50, 50) + "  timeOut: 2s\n"},
        "policies/echo.yaml",
        "spec.timeOut",
        "unknown field (did you mean 'timeout'?)",
    ),
    "unknown-cluster": (
        {"policies__echo_yaml": policy(50, 50).replace("cluster: remote", "cluster: mars")},
        "policies/echo.yaml",
        "spec.clusterWeights[1].cluster",
        "cluster 'mars' is not declared in the Federation",
    ),
    "weights-do-not-add-up": (
        {"policies__echo_yaml": policy(50, 60)},
        "policies/echo.yaml",
        "spec.clusterWeights",
        "weights add up to 110; they must add up to 100",
    ),
    "duplicate-policy": (
        {"policies__echo2_yaml": policy(50, 50).replace("name: echo\n", "name: echo2\n")},
        "policies/echo2.yaml",
        "spec.host",
        "duplicate policy: echo.demo.svc.clusterset.local already has a TrafficPolicy in "
        "policies/echo.yaml document 1",
    ),
    "bad-duration": (
        {"policies__echo_yaml": policy(50, 50) + "  retries: {attempts: 2, perTryTimeout: 2}\n"},
        "policies/echo.yaml",
        "spec.retries.perTryTimeout",
        "must be a duration string",
    ),
}


@pytest.mark.parametrize("case", BAD_COMMITS)
async def test_a_bad_commit_is_rejected_and_the_applied_config_stays(
    case: str, origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    changes, file, field, reason = BAD_COMMITS[case]
    sync = make_sync(origin, etcd, tmp_path)
    origin.commit("good", policies__echo_yaml=policy(70, 30))
    assert (await sync.sync_once()).result == "applied"
    before = await raw(etcd)

    bad = origin.commit(f"bad: {case}", **changes)
    outcome = await sync.sync_once()
    assert (outcome.result, outcome.sha) == ("rejected", bad)
    after = await raw(etcd)
    rejection = json.loads(after.pop(REJECTION_KEY)[0])
    assert after == before  # not one managed key (nor the commit record) changed
    assert rejection["sha"] == bad
    assert any(
        i["file"] == file and i["field"] == field and reason in i["reason"]
        for i in rejection["issues"]
    ), rejection
    assert sync.rejections == 1
    # Not validated (nor logged, nor counted) again until a newer commit arrives.
    assert (await sync.sync_once()).result == "still-rejected"
    assert sync.rejections == 1

    fixed = origin.commit("fix", policies__echo_yaml=policy(40, 60), policies__echo2_yaml=None)
    assert (await sync.sync_once()).sha == fixed
    keys = await raw(etcd)
    assert REJECTION_KEY not in keys  # applying a commit clears the rejection
    assert await echo_weights(etcd) == (ClusterWeight("local", 40), ClusterWeight("remote", 60))


async def test_force_push_is_followed_only_when_valid(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    sync = make_sync(origin, etcd, tmp_path)
    base = origin.commit("70/30", policies__echo_yaml=policy(70, 30))
    await sync.sync_once()
    origin.commit("50/50", policies__echo_yaml=policy(50, 50))
    await sync.sync_once()

    # History rewritten to a bad commit: rejected, the 50/50 commit (now gone from the remote)
    # stays applied.
    bad = origin.rewrite(base, "rewritten, bad", policies__echo_yaml=policy(10, 10))
    assert (await sync.sync_once()).result == "rejected"
    assert await echo_weights(etcd) == (ClusterWeight("local", 50), ClusterWeight("remote", 50))

    # Rewritten again, to a good commit: applied, and the log says history was rewritten.
    good = origin.rewrite(base, "rewritten, good", policies__echo_yaml=policy(90, 10))
    outcome = await sync.sync_once()
    assert (outcome.result, outcome.sha, outcome.detail) == ("applied", good, "history rewritten")
    assert good != bad
    assert await echo_weights(etcd) == (ClusterWeight("local", 90), ClusterWeight("remote", 10))


async def test_a_repository_that_disappears_keeps_the_applied_config(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    sync = make_sync(origin, etcd, tmp_path)
    origin.commit("70/30", policies__echo_yaml=policy(70, 30))
    await sync.sync_once()
    before = await raw(etcd)

    shutil.rmtree(origin.url)
    outcome = await sync.sync_once()
    assert outcome.result == "fetch-failed"
    assert "does not appear to be a git repository" in outcome.detail
    assert await raw(etcd) == before
    assert sync.counts["fetch-failed"] == 1

    # It comes back (re-created, pushed to): the sync resumes.
    git(origin.url.parent, "init", "--quiet", "--bare", "--initial-branch", "main", str(origin.url))
    sha = origin.commit("back", policies__echo_yaml=policy(60, 40))
    outcome = await sync.sync_once()
    assert (outcome.result, outcome.sha) == ("applied", sha)
    assert await echo_weights(etcd) == (ClusterWeight("local", 60), ClusterWeight("remote", 40))


async def test_trigger_runs_a_round_now(origin: Origin, etcd: Etcd3Client, tmp_path: Path) -> None:
    sync = make_sync(origin, etcd, tmp_path)
    with pytest.raises(SyncNotRunningError):
        await sync.trigger()
    origin.commit("70/30", policies__echo_yaml=policy(70, 30))
    task = asyncio.create_task(sync.run(), name="test:gitops-sync")
    try:
        async with asyncio.timeout(10):
            await until(lambda: sync.counts["applied"] == 1)  # the first round, at start
            sha = origin.commit("50/50", policies__echo_yaml=policy(50, 50))
            outcome = await sync.trigger()  # the poll interval is an hour: only this syncs
        assert (outcome.result, outcome.sha) == ("applied", sha)
        assert sync.status()["appliedCommit"] == sha
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_unmanaged_keys_are_kept_and_removed_policies_deleted(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    assert etcd.kv is not None
    await etcd.kv.put("/fedgate/config/denied/spiffe-x", b"{}")
    sync = make_sync(origin, etcd, tmp_path)
    origin.commit("two", policies__echo_yaml=policy(), policies__api_yaml=FULL_POLICY)
    await sync.sync_once()
    assert "/fedgate/config/policies/shop/api" in await raw(etcd)
    origin.commit("one", policies__api_yaml=None)
    await sync.sync_once()
    keys = await raw(etcd)
    assert "/fedgate/config/policies/shop/api" not in keys
    assert "/fedgate/config/denied/spiffe-x" in keys


async def test_a_commit_too_large_for_one_transaction_is_rejected(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    sync = make_sync(origin, etcd, tmp_path, max_txn_ops=3)
    many = {
        f"p{i}_yaml": policy().replace("echo", f"echo{i}").replace("  name: echo", f"  name: e{i}")
        for i in range(4)
    }
    sha = origin.commit("four policies", **many)  # type: ignore[arg-type]
    outcome = await sync.sync_once()
    assert (outcome.result, outcome.sha) == ("rejected", sha)
    assert "at most 3 operations" in outcome.detail
    keys = await raw(etcd)
    assert COMMIT_KEY not in keys
    assert "at most 3 operations" in keys[REJECTION_KEY][0].decode()


async def test_git_commands_are_bounded_by_their_timeout(tmp_path: Path) -> None:
    slow_git = tmp_path / "git"
    slow_git.write_text("#!/bin/sh\nsleep 30\n")
    slow_git.chmod(0o755)
    repo = GitRepository(str(tmp_path), "main", tmp_path / "clone", git=str(slow_git))
    repo._local_timeout = 0.3
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GitError, match=r"git init timed out after 0.3 s"):
        await repo.fetch()
    assert loop.time() - started < 5


def test_bad_branch_and_option_like_urls_are_refused(tmp_path: Path) -> None:
    for branch in ("-x", "a..b", "x.lock", ""):
        with pytest.raises(GitError, match="branch"):
            GitRepository(str(tmp_path), branch, tmp_path / "c")
    with pytest.raises(GitError, match="not a path or URL"):
        GitRepository("--upload-pack=touch /tmp/x", "main", tmp_path / "c")


async def test_a_failing_leader_fence_writes_nothing(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    assert etcd.kv is not None
    stale_term = [etcd.kv.txn_compare_create_revision("/fedgate/leader", 424242)]

    def not_leader() -> list[object]:
        raise NotLeaderError("replica x is not the leader")

    origin.commit("70/30", policies__echo_yaml=policy(70, 30))
    for fence in (lambda: stale_term, not_leader):
        sync = make_sync(origin, etcd, tmp_path)
        sync._fence = fence
        outcome = await sync.sync_once()
        assert outcome.result == "store-failed", outcome
        assert await raw(etcd) == {}


async def test_only_the_config_path_is_read_and_a_new_leader_keeps_a_rejection(
    origin: Origin, etcd: Etcd3Client, tmp_path: Path
) -> None:
    # `path`: the config lives in config/; YAML elsewhere in the repository (CI, charts) is not
    # config. The Federation document at the root is outside it, so only local/remote exist.
    origin.commit("ci", ci__workflow_yaml="on: push\n", config__echo_yaml=policy(70, 30))
    sync = make_sync(origin, etcd, tmp_path)
    sync._path = "config"
    assert (await sync.sync_once()).result == "applied"
    assert FEDERATION_KEY not in await raw(etcd)

    bad = origin.commit("bad", config__echo_yaml=policy(70, 70))
    assert (await sync.sync_once()).result == "rejected"
    # Another replica takes over: it knows the head was rejected (etcd's record) and neither
    # validates, logs nor counts it again.
    successor = make_sync(origin, etcd, tmp_path / "successor")
    successor._path = "config"
    outcome = await successor.sync_once()
    assert (outcome.result, outcome.sha, successor.rejections) == ("still-rejected", bad, 0)


def test_urls_keep_their_form_and_credentials_stay_out_of_messages(tmp_path: Path) -> None:
    repo = GitRepository("git@github.com:org/config.git", "main", tmp_path)
    assert repo.url == "git@github.com:org/config.git"
    assert GitRepository("relative/dir", "main", tmp_path).url.endswith("/relative/dir")
    token_url = "https://bot:s3cret@git.example.com/config.git"
    assert "s3cret" not in redact(f"fatal: unable to access '{token_url}/': 403")
    sync = GitOpsSync(GitRepository(token_url, "main", tmp_path), None)  # type: ignore[arg-type]
    assert sync.status()["repository"] == "https://***@git.example.com/config.git"
