"""The federation controller: catalogs in etcd -> merged, versioned config -> config streams.

- `keys`, `vip`, `merge`, `generate`, `policy_file`: pure (layout, VIP maths, MCS merge,
  snapshot generation, TrafficPolicy YAML).
- `etcd`, `store`, `owned`: the etcd adapters (client opening and error translation; agents'
  leased catalog and the controller's read/watch side; controller-owned VIPs and policies).
- `server`, `controller`: distribution (gRPC servicer, per-stream bounded queues) and the loop.
- `api`: the wire contract (proto, generated code, session rules, thin client); the only part
  sidecars, gateways and agents may import, and it imports nothing else of federation.
"""
