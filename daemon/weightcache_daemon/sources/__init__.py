"""Where models come from. ``open_source(uri, config)`` picks the implementation by scheme.

Every source lists a model as ``RemoteObject`` records (relative path, size, version tag)
and reads byte ranges of one object *at the version it listed*: a changed object raises
``ObjectChanged`` instead of returning bytes of another version, so the engine restarts
that file rather than splicing two versions.
"""

from __future__ import annotations

from weightcache.errors import InvalidInputError

from ..config import Config
from .base import ObjectChanged, RemoteObject, Source, check_relpath, parse_uri

__all__ = ["ObjectChanged", "RemoteObject", "Source", "check_relpath", "open_source", "parse_uri"]


def open_source(uri: str, config: Config) -> Source:
    scheme, _, _ = parse_uri(uri)
    if scheme == "s3":
        from .s3 import S3Source

        return S3Source(uri, config.source_for(uri), config.download.concurrency)
    if scheme == "file":
        from .local import LocalSource

        return LocalSource(uri)
    raise InvalidInputError(f"source {uri!r}: unsupported scheme {scheme!r} (supported: s3://, file://)")
