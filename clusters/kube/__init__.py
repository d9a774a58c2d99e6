"""The Kubernetes cluster adapter: ServiceExports, Services, EndpointSlices and Pods -> exports.

`translate` and `cache` are pure; `informer` (threads around the `kubernetes` client) and
`source` (`KubeClusterSource`, the `ClusterSource`) are the thin drivers.
"""
