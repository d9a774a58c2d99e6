"""The federation controller: catalogs in etcd -> merged, versioned config -> config streams.

- `keys`, `vip`, `merge`, `generate`, `policy_file`: pure (layout, VIP maths, MCS merge,
  snapshot generation, TrafficPolicy YAML).
- `etcd`, `store`, `owned`: the etcd adapters (client opening and error translation; agents'
  leased catalog and the controller's read/watch side; controller-owned VIPs and policies).
- `server`: distribution (gRPC servicer, per-stream bounded queues).
- `controller`, `controller_ports`, `controller_status`: the loop, a core without etcd or gRPC
  that takes ports (an event feed, a leader-only writer, a snapshot sink) and writes status
  back through them; `controller_etcd`: its etcd adapters and wiring.
- `catalog`, `liveness`, `fedconfig`, `status`: pure (the in-memory view of /fedgate/ fed by
  watch events, cluster liveness with flap damping, the config read from /fedgate/config/,
  the status records the leader writes back); `leader`: election and write fencing;
  `etcd_auth`: etcd users and roles (an agent writes only its own prefix); `aio`: helpers.
- `schema`, `schema_types`, `gitops`: the GitOps config documents (pydantic models), their
  validation, and the leader's sync from a git repository into /fedgate/config/ (one
  transaction per commit). `policy_file` reads a config directory with the same validation.
- `api`: the wire contract (proto, generated code, session rules, thin client); the only part
  sidecars, gateways and agents may import, and it imports nothing else of federation.
"""
