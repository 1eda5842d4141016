"""The cache's decisions, one request end to end: the core the edges call, naming, the
catalog, admission and eviction, verify, leases, what a download job needs from the cache
(``ingest_links``), start-up reconciliation, ``models.d/`` and the daemon's half of
``cachectl doctor``.

May import: ``ingest`` and every lower layer; never the edges, the CLI or the server
(docs/architecture.md, "Packages").
"""
