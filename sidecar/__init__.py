"""The per-workload proxy (one per pod): capture, clusterset DNS, route table, mTLS proxying.

Entry point: `sidecar.sidecar.Sidecar` with `sidecar.settings.SidecarSettings`; the wiring in
fedgate/ feeds it an SVID (`set_identity`) and snapshots (`apply`).
"""
