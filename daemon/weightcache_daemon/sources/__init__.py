"""Where models come from. ``open_source(uri, config)`` picks the implementation by scheme.

Every source lists a model as ``RemoteObject`` records (relative path, size, version tag)
and reads byte ranges of one object *at the version it listed*: a changed object raises
``ObjectChanged`` instead of returning bytes of another version, so the engine restarts
that file rather than splicing two versions.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from weightcache.contract.errors import InvalidInputError
from weightcache_daemon.config import Config, SourceConfig
from weightcache_daemon.sources.base import ObjectChanged, RemoteObject, Source, check_relpath, parse_uri

__all__ = ["Clients", "ObjectChanged", "RemoteObject", "Source", "check_relpath", "open_source", "parse_uri"]


class Clients:
    """S3 clients kept across downloads, one per source configuration: building one costs more
    CPU than a small model's whole listing, and it sits on the path to a cold model's first
    byte. Clients are thread-safe; closed with the daemon."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[SourceConfig, int], Any] = {}

    def get(self, cfg: SourceConfig, concurrency: int) -> Any:
        from weightcache_daemon.sources.s3 import make_client

        with self._lock:
            client = self._clients.get((cfg, concurrency))
            if client is None:
                client = self._clients[(cfg, concurrency)] = make_client(cfg, concurrency)
            return client

    def prewarm(self, configs: Sequence[SourceConfig], concurrency: int) -> threading.Event:
        """Build the configured sources' clients in the background (at start-up), so that the
        first cold open does not wait for one; the event is set when done. A failure here is
        only a lost head start: the download builds the client again and reports why."""
        done = threading.Event()

        def build() -> None:
            try:
                for cfg in configs:
                    if cfg.prefix.startswith("s3://"):
                        try:
                            self.get(cfg, concurrency)
                        except Exception:  # noqa: BLE001
                            pass
            finally:
                done.set()

        threading.Thread(target=build, name="wc-s3-clients", daemon=True).start()
        return done

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def open_source(uri: str, config: Config, clients: Clients | None = None, *, links: bool = False) -> Source:
    """The source for a URI. With ``clients``, an S3 source borrows a kept client. ``links``: a
    file:// source may follow a Hugging Face cache snapshot's links into its own blobs (for
    admin requests only; sources/hfcache.py)."""
    scheme, _, _ = parse_uri(uri)
    if scheme == "s3":
        from weightcache_daemon.sources.s3 import S3Source

        cfg = config.source_for(uri)
        concurrency = config.download.concurrency
        return S3Source(uri, cfg, concurrency, clients.get(cfg, concurrency) if clients is not None else None)
    if scheme == "file":
        from weightcache_daemon.sources.local import LocalSource

        return LocalSource(uri, links=links)
    raise InvalidInputError(f"source {uri!r}: unsupported scheme {scheme!r} (supported: s3://, file://)")
