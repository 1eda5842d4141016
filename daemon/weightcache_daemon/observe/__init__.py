"""Observing the daemon: Prometheus metrics, structlog set-up, the asyncio task dump.

May import: ``records``, ``config`` and lower layers (docs/architecture.md, "Packages").
"""
