"""GitOps: the federation's desired state from a git repository, validated, applied atomically.

- `load`: config files of a directory or commit -> YAML documents (strict loader, line map).
- `validate` (+ `checks`, `convert`, `issues`): every document against `federation.schema`,
  then the cross-field and cross-document rules -> every issue, or the runtime config.
- `store`: the applied config in etcd under /fedgate/config/ (one transaction per commit).
- `git`: the git CLI, async, in a private bare clone.
- `sync`: `GitOpsSync`, the leader's loop tying them together (`run()`, `trigger()`).

What it does not do: decide who is leader (the controller's election), serve HTTP (the admin
port calls `trigger()`), or give the fields runtime meaning (the sidecar's traffic policy).
"""
