"""Kubernetes manifests for one cluster, rendered as plain dicts (`fedgate manifests`).

`render(settings)` is pure: the same settings give the same objects, in apply order (CRDs and
the namespace first). Every object is built here in Python rather than templated with kustomize
because the per-cluster values (cluster name, trust domain, the management cluster's
addresses, the gateway Service type, the etcd member list) feed several objects at once and
must agree with the `fedgate` command lines in the containers; a function keeps them in one
place and lets the tests validate the exact output with `kubernetes-validate`. The only files
read are the MCS CRDs, vendored verbatim from kubernetes-sigs/mcs-api under `deploy/crds/`.

Secret material is never rendered: the Secrets the workloads mount are created by the operator
(`docs/kubernetes.md`, or `fedgate kind up`), so manifests can be kept in git.

Modules: `settings` (the options, names and ports), `render` (`render`, `to_yaml`, the CRDs),
`common`, `rbac`, `member`, `management`, `demo`. The package imports nothing itself, so the
CLI's option lists (`settings`) do not load YAML.
"""
