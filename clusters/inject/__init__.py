"""Sidecar injection for Kubernetes workloads: `fedgate inject` and the agent's admission webhook.

`spec` (what an injected pod holds), `objects` (which kinds carry a pod template, `List`s, the
opt-out and refusal rules), `patch` (RFC 6902 JSON Patch between two documents) and `admission`
(AdmissionReview v1 in and out, the `MutatingWebhookConfiguration`) are pure: no I/O, no clock,
no Kubernetes client (import-linter keeps it so). `webhook` is the thin HTTPS driver the agent
runs. The CLI and the agent wiring live in fedgate/.
"""
