"""Traffic policy as pure objects: request matching, target choice, retries, outlier detection,
connection-pool budgets, fault injection and mirroring.

Nothing here does I/O or reads a clock: time (`now`, seconds on any monotonic scale) and
randomness (`random.Random`) are passed in, so every decision is exact under test. The HTTP
driver (`sidecar.http.proxy`) feeds them and acts on what they say.
"""
