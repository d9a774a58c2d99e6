"""`fedgate kind up|down` as plans: the shell commands, in order, that build the
three-cluster kind rig of kind-configs/ and remove it.

The plans are pure (tests check them: Docker and kind cannot run on the CI machine); the CLI
runs them one by one with `sh -c`, stopping at the first failure. Values known only once a
cluster exists (a kind node's address on the docker network) are shell substitutions in the
commands. Secret material (CA directories, etcd certificates and passwords) is generated into
a local state directory and loaded as Secrets; nothing secret is printed.
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedgate.manifests import settings as ms
from fedgate.manifests.demo import DEMO_NAMESPACE
from mesh.naming import DEFAULT_FEDERATION_DOMAIN, trust_domain_for

CLUSTERS = ("east", "west", "north")
MANAGEMENT = "east"
SERVERS = ("west", "north")  # run echo; `client` in east calls it
CLIENT = "east"
TOOLS = ("docker", "kind", "kubectl", "openssl")
DEMO_URL = "http://echo.demo.svc.clusterset.local:8080/"
DEMO_CALLS = 6
ETCD_USERS = ("root", "controller", "reader", *(f"agent-{c}" for c in CLUSTERS))
ROLLOUT_TIMEOUT = "300s"


@dataclass(frozen=True, slots=True)
class Step:
    what: str
    command: str  # one `sh -c` command line


@dataclass(frozen=True, slots=True)
class KindOptions:
    repo: Path  # the checkout: Dockerfile, kind-configs/
    state: Path  # generated CA directories, certificates and passwords
    image: str = ms.DEFAULT_IMAGE
    fedgate: str = "fedgate"  # how to run this fedgate on the host


def missing_tools(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    return [tool for tool in TOOLS if which(tool) is None]


def context(cluster: str) -> str:
    return f"kind-{cluster}"


def kubectl(cluster: str, *args: str) -> str:
    return shlex.join(["kubectl", "--context", context(cluster), *args])


def node_ip(cluster: str) -> str:
    """Shell substitution: the cluster's node address on kind's docker network."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    return f'"$(docker inspect -f {shlex.quote(fmt)} {cluster}-control-plane)"'


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _secrets(o: KindOptions) -> list[Step]:
    s, f = o.state, o.fedgate
    etcd = s / "etcd"
    users = s / "etcd-users"
    steps = [Step("state directory", f"mkdir -p {_q(etcd)} {_q(users)}")]
    # The control plane's CA is the federation's own trust domain (mesh.naming's
    # controller_identity); each cluster's is `<cluster>.<federation domain>`.
    for name in (*CLUSTERS, "control"):
        td = DEFAULT_FEDERATION_DOMAIN if name == "control" else trust_domain_for(name)
        steps.append(
            Step(
                f"CA of {name}",
                f"test -e {_q(s / 'ca' / name / 'root.pem')} || "
                f"{f} ca init --trust-domain {td} --out {_q(s / 'ca' / name)}",
            )
        )
    sans = f"subjectAltName=DNS:{ms.ETCD_SERVER_NAME},DNS:*.{ms.ETCD}.{ms.NAMESPACE}.svc"
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    steps.append(
        Step(
            "etcd CA",
            f"test -e {_q(etcd / 'ca.crt')} || openssl req -x509 {ec} -days 365 "
            f"-subj /CN=fedgate-etcd-ca -keyout {_q(etcd / 'ca.key')} -out {_q(etcd / 'ca.crt')}",
        )
    )
    steps.append(Step("etcd SANs", f"printf '%s\\n' {shlex.quote(sans)} > {_q(etcd / 'san.ext')}"))
    for cert in ("server", "peer"):
        key, csr, crt = (etcd / f"{cert}.{x}" for x in ("key", "csr", "crt"))
        steps.append(
            Step(
                f"etcd {cert} certificate",
                f"test -e {_q(crt)} || {{ openssl req {ec} -subj /CN={ms.ETCD} "
                f"-keyout {_q(key)} -out {_q(csr)} && openssl x509 -req -in {_q(csr)} "
                f"-CA {_q(etcd / 'ca.crt')} -CAkey {_q(etcd / 'ca.key')} -CAcreateserial "
                f"-days 365 -extfile {_q(etcd / 'san.ext')} -out {_q(crt)}; }}",
            )
        )
    for user in ETCD_USERS:
        path = _q(users / user)
        steps.append(
            Step(f"etcd password of {user}", f"test -e {path} || openssl rand -hex 24 > {path}")
        )
    return steps


def _apply_secret(cluster: str, *args: str, namespace: str = ms.NAMESPACE) -> str:
    """Create or update (kubectl create --dry-run | apply): re-running `up` is harmless."""
    create = kubectl(cluster, "-n", namespace, "create", *args, "--dry-run=client", "-o=yaml")
    return f"{create} | {kubectl(cluster, 'apply', '-f', '-')}"


def _bootstrap(o: KindOptions, cluster: str, namespace: str = ms.NAMESPACE) -> Step:
    """The public roots and trust domain a proxy's identity starts from (`ca.bootstrap`): in
    fedgate-system for the gateway, and in every injected namespace for the sidecars."""
    ca = o.state / "ca" / cluster
    pairs = (
        ("ca.pem", ca / "root.pem"),
        ("control.pem", o.state / "ca" / "control" / "root.pem"),
        ("trust-domain", ca / "trust-domain"),
    )
    return Step(
        f"{cluster}: bootstrap roots in {namespace}",
        _apply_secret(
            cluster,
            "configmap",
            ms.BOOTSTRAP_CONFIGMAP,
            *(f"--from-file={key}={path}" for key, path in pairs),
            namespace=namespace,
        ),
    )


def _cluster_secrets(o: KindOptions, cluster: str) -> list[Step]:
    s = o.state
    ca, etcd = s / "ca" / cluster, s / "etcd"

    def files(*pairs: tuple[str, Path]) -> list[str]:
        return [f"--from-file={key}={path}" for key, path in pairs]

    steps = [
        Step(
            f"{cluster}: namespace",
            _apply_secret(cluster, "namespace", ms.NAMESPACE),
        ),
        Step(
            f"{cluster}: CA secret",
            _apply_secret(
                cluster,
                "secret",
                "generic",
                ms.CA_SECRET,
                *files(*((n, ca / n) for n in ("root.pem", "root.key", "trust-domain"))),
            ),
        ),
        _bootstrap(o, cluster),
        Step(
            f"{cluster}: etcd client secret",
            _apply_secret(
                cluster,
                "secret",
                "generic",
                ms.ETCD_CLIENT_SECRET,
                *files(
                    ("ca.crt", etcd / "ca.crt"), ("password", s / "etcd-users" / f"agent-{cluster}")
                ),
            ),
        ),
    ]
    if cluster == MANAGEMENT:
        for secret, cert in ((ms.ETCD_SERVER_SECRET, "server"), (ms.ETCD_PEER_SECRET, "peer")):
            pairs = [("tls.crt", etcd / f"{cert}.crt"), ("tls.key", etcd / f"{cert}.key")]
            pairs.append(("ca.crt", etcd / "ca.crt"))
            steps.append(
                Step(
                    f"{cluster}: {secret}",
                    _apply_secret(cluster, "secret", "generic", secret, *files(*pairs)),
                )
            )
        control = s / "ca" / "control"
        steps.append(
            Step(
                f"{cluster}: control-plane CA",
                _apply_secret(
                    cluster,
                    "secret",
                    "generic",
                    ms.CONTROL_CA_SECRET,
                    *files(*((n, control / n) for n in ("root.pem", "root.key", "trust-domain"))),
                ),
            )
        )
        steps.append(
            Step(
                f"{cluster}: etcd users",
                _apply_secret(
                    cluster,
                    "secret",
                    "generic",
                    ms.ETCD_USERS_SECRET,
                    f"--from-file={s / 'etcd-users'}",
                ),
            )
        )
    return steps


def cluster_dns(repo: Path, cluster: str) -> str:
    """kube-dns's Service IP in a kind cluster: the 10th address of its service subnet."""
    config = yaml.safe_load((repo / "kind-configs" / f"{cluster}.yaml").read_text())
    return str(ipaddress.ip_network(config["networking"]["serviceSubnet"])[10])


def _install(o: KindOptions, cluster: str) -> Step:
    mgmt = node_ip(MANAGEMENT)
    args = [
        o.fedgate,
        "manifests",
        f"--cluster={cluster}",
        f"--image={shlex.quote(o.image)}",
        "--gateway-service=NodePort",
        f"--deploy-dir={_q(o.repo / 'deploy')}",
    ]
    if cluster == MANAGEMENT:
        args += ["--role=management", f"--clusters={','.join(CLUSTERS)}"]
    else:
        args += [
            f"--etcd={mgmt}:{ms.ETCD_NODE_PORT}",
            f"--controller={mgmt}:{ms.CONTROLLER_NODE_PORT}",
        ]
    args += [
        f"--gateway-address={node_ip(cluster)}:{ms.GATEWAY_NODE_PORT}",
        f"--ca-bundle={_q(o.state / 'ca' / cluster / 'root.pem')}",
        f"--cluster-dns={cluster_dns(o.repo, cluster)}",
    ]
    return Step(
        f"{cluster}: install fedgate",
        f"{' '.join(args)} | {kubectl(cluster, 'apply', '--server-side', '-f', '-')}",
    )


def _wait(cluster: str) -> list[Step]:
    ns = ["-n", ms.NAMESPACE]
    steps = []
    if cluster == MANAGEMENT:
        steps += [
            Step(
                f"{cluster}: etcd ready",
                kubectl(
                    cluster,
                    *ns,
                    "rollout",
                    "status",
                    f"statefulset/{ms.ETCD}",
                    f"--timeout={ROLLOUT_TIMEOUT}",
                ),
            ),
            Step(
                f"{cluster}: etcd users and roles",
                kubectl(
                    cluster,
                    *ns,
                    "wait",
                    "--for=condition=complete",
                    f"job/{ms.ETCD_PROVISION}",
                    f"--timeout={ROLLOUT_TIMEOUT}",
                ),
            ),
        ]
    for name in (ms.AGENT, ms.GATEWAY) + ((ms.CONTROLLER,) if cluster == MANAGEMENT else ()):
        steps.append(
            Step(
                f"{cluster}: {name} ready",
                kubectl(
                    cluster,
                    *ns,
                    "rollout",
                    "status",
                    f"deployment/{name}",
                    f"--timeout={ROLLOUT_TIMEOUT}",
                ),
            )
        )
    return steps


def _demo(o: KindOptions, cluster: str) -> list[Step]:
    flags = [f"--image={shlex.quote(o.image)}"]
    flags += ["--serve"] if cluster in SERVERS else []
    flags += ["--call"] if cluster == CLIENT else []
    namespace = _apply_secret(cluster, "namespace", DEMO_NAMESPACE, namespace=DEMO_NAMESPACE)
    return [
        Step(f"{cluster}: namespace {DEMO_NAMESPACE}", namespace),
        _bootstrap(o, cluster, DEMO_NAMESPACE),  # before the injected pods that mount it
        Step(
            f"{cluster}: demo workload",
            f"{o.fedgate} kind demo --cluster={cluster} {' '.join(flags)} | "
            f"{kubectl(cluster, 'apply', '--server-side', '-f', '-')}",
        ),
    ]


def up_plan(o: KindOptions) -> list[Step]:
    steps = [
        Step(
            f"create cluster {c}",
            shlex.join(
                [
                    "kind",
                    "create",
                    "cluster",
                    "--config",
                    str(o.repo / "kind-configs" / f"{c}.yaml"),
                ]
            ),
        )
        for c in CLUSTERS
    ]
    steps.append(
        Step("build the image", shlex.join(["docker", "build", "-t", o.image, str(o.repo)]))
    )
    steps += [
        Step(
            f"load the image into {c}",
            shlex.join(["kind", "load", "docker-image", o.image, "--name", c]),
        )
        for c in CLUSTERS
    ]
    steps += _secrets(o)
    # The management cluster first: the others' agents join through its etcd.
    order = (MANAGEMENT, *(c for c in CLUSTERS if c != MANAGEMENT))
    for cluster in order:
        steps += _cluster_secrets(o, cluster)
        steps.append(_install(o, cluster))
        steps += _wait(cluster)
    for cluster in CLUSTERS:
        if cluster in SERVERS or cluster == CLIENT:
            steps += _demo(o, cluster)
    for cluster in CLUSTERS:
        if cluster in SERVERS or cluster == CLIENT:
            steps.append(
                Step(
                    f"{cluster}: demo ready",
                    kubectl(
                        cluster,
                        "-n",
                        "demo",
                        "wait",
                        "--for=condition=available",
                        "deployment",
                        "--all",
                        f"--timeout={ROLLOUT_TIMEOUT}",
                    ),
                )
            )
    curl = kubectl(
        CLIENT,
        "-n",
        "demo",
        "exec",
        "deploy/client",
        "-c",
        "client",
        "--",
        "curl",
        "-sS",
        "--retry",
        "10",
        "--retry-all-errors",
        DEMO_URL,
    )
    steps += [Step(f"demo call {i + 1} from {CLIENT}", curl) for i in range(DEMO_CALLS)]
    return steps


def down_plan(o: KindOptions) -> list[Step]:
    steps = [
        Step(f"delete cluster {c}", shlex.join(["kind", "delete", "cluster", "--name", c]))
        for c in CLUSTERS
    ]
    steps.append(Step("remove the state directory", shlex.join(["rm", "-rf", str(o.state)])))
    return steps
