"""Prometheus metrics (names prefixed ``weightcache_``), on a registry of the daemon's own.

Counters and histograms are updated where things happen; sizes that the index already knows
(stored vs logical bytes, leases, models) are read at scrape time by a collector, so they
can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]


class _Sizes(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        help_ = {
            "stored_bytes": "Bytes of unique blobs on disk",
            "logical_bytes": "Bytes of every named model's files (before dedup)",
            "held_bytes": "Bytes of evicted blobs still open by running processes",
            "capacity_bytes": "Configured capacity (0 = unlimited)",
            "leases": "Snapshots held open over fd.sock",
            "models": "Named models in the cache",
            "active_downloads": "Download jobs running",
            "streaming_snapshots": "Snapshots being downloaded that clients may already read",
            "streaming_readers": "fd.sock leases on snapshots still being downloaded",
            "readonly_descriptors": "1 when granted descriptors are opened through a read-only mount of the store",
        }
        for key, value in self.read().items():
            yield GaugeMetricFamily(f"weightcache_{key}", help_.get(key, key), value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.hits = Counter("weightcache_cache_hits", "Ensure/Prefetch answered from the cache", ["api"], registry=r)
        self.misses = Counter("weightcache_cache_misses", "Ensure/Prefetch that had to download", ["api"], registry=r)
        self.downloaded = Counter("weightcache_downloaded_bytes", "Bytes downloaded", ["source"], registry=r)
        self.download_seconds = Counter(
            "weightcache_download_seconds", "Seconds spent in download jobs", ["source"], registry=r
        )
        self.ingest_failures = Counter(
            "weightcache_ingest_failures", "Failed download jobs by reason (error category)", ["reason"], registry=r
        )
        self.evictions = Counter("weightcache_evictions", "Models evicted", ["trigger"], registry=r)
        self.evicted_bytes = Counter("weightcache_evicted_bytes", "Bytes freed by eviction", registry=r)
        self.grants = Counter("weightcache_descriptor_grants", "Acquire requests answered with descriptors", registry=r)
        self.fd_refused = Counter(
            "weightcache_fd_refused",
            "fd.sock connections refused or closed for breaking a bound",
            ["reason"],
            registry=r,
        )
        self.fd_accept_errors = Counter(
            "weightcache_fd_accept_errors", "fd.sock accept() failures (EMFILE, ENFILE, ...)", ["errno"], registry=r
        )
        self.fd_send_errors = Counter(
            "weightcache_fd_send_errors",
            "Descriptor grants the kernel or the open-file limit refused",
            ["errno"],
            registry=r,
        )
        self.time_to_first_group = Histogram(
            "weightcache_time_to_first_group_seconds",
            "From the start of a download to the first layer group on disk (readable by early clients)",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.streaming_failures = Counter(
            "weightcache_streaming_failures",
            "Downloads that failed while clients could read them (every reader got the error)",
            ["reason"],
            registry=r,
        )
        self.commit_mismatches = Counter(
            "weightcache_commit_hash_mismatches",
            "Files whose bytes on disk, hashed after they were sealed, differ from the bytes downloaded "
            "(changed on disk before commit; nothing published)",
            registry=r,
        )
        self.rpc_bounds = Counter(
            "weightcache_rpc_bound_breaches",
            "Client API requests refused for breaking a bound (docs/security.md, 'Client socket bounds')",
            ["bound"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "weightcache_rpc_duration_seconds",
            "RPC latency",
            ["service", "rpc", "code"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600),
        )

    def watch_sizes(self, read: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_Sizes(read))

    def serve(self, address: str) -> Any:
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        return server


def source_label(uri: str) -> str:
    """s3://bucket/a/b/ -> s3://bucket ; file:///x/y -> file:// (bounded label cardinality)."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if scheme == "s3" else f"{scheme}://"
