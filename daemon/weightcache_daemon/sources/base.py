"""The Source protocol and the URI and path rules shared by every source."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from weightcache.contract.errors import InvalidInputError
from weightcache_daemon.uris import normalize


@dataclass(frozen=True, slots=True)
class RemoteObject:
    relpath: str  # path inside the model ("model-00001-of-00002.safetensors")
    size: int
    version: str  # ETag for S3; size+mtime+inode for files
    uri: str  # full URI of the object, for messages and the source-object cache


class ObjectChanged(Exception):
    """The object no longer has the version that was listed (S3: If-Match failed)."""

    def __init__(self, obj: RemoteObject) -> None:
        super().__init__(f"{obj.uri} changed during the download")
        self.obj = obj


class Source(Protocol):
    """A model's files at a URI.

    list() -> objects; stat(relpath) -> the current version of one object;
    read_into(obj, offset, buf, on_bytes) fills buf with bytes [offset, offset+len(buf)) of
    the object at version obj.version (calling on_bytes(n) as data lands, so a caller can
    resume after an error), or raises ObjectChanged; a range outside obj.size is refused
    (check_range). list() is sorted by relpath, so two listings of the same files compare
    equal. Every relpath a source is given passes check_relpath first. Implementations are
    thread-safe: the engine calls read_into() from many threads at once.
    tests/system/test_source_conformance.py is the executable form of this contract.
    """

    uri: str

    def list(self) -> list[RemoteObject]: ...

    def stat(self, relpath: str) -> RemoteObject: ...

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None: ...

    def expected_sha256(self, objects: Sequence[RemoteObject]) -> dict[str, str]:
        """sha256 (hex) the source vouches for, by relative path, where it has one."""
        ...

    def close(self) -> None: ...


def parse_uri(uri: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b/' -> ('s3', 'bucket', 'a/b/'); 'file:///d/' -> ('file', '', '/d/').

    The URI is normalised first (uris.normalize: no '..', no query, decoded once), so a source
    never sees a path that another parser could read differently."""
    canonical = normalize(uri)
    scheme, _, rest = canonical.partition("://")
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        return scheme, bucket, prefix
    return scheme, "", rest


def check_relpath(relpath: str, uri: str) -> str:
    """Refuse object names that would escape the snapshot directory."""
    if not relpath or relpath.startswith("/") or "\\" in relpath or "\x00" in relpath:
        raise InvalidInputError(f"source {uri!r}: object name {relpath!r} is empty, absolute or has a backslash/NUL")
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(relpath) != relpath:
        raise InvalidInputError(f"source {uri!r}: object name {relpath!r} has an empty, '.' or '..' component")
    return relpath


def check_range(obj: RemoteObject, offset: int, length: int) -> None:
    """Refuse a read outside the object as listed: a short read must never pass for success,
    and an out-of-range request is the caller's mistake, not a changed object to restart."""
    if offset < 0 or length < 0 or offset + length > obj.size:
        raise InvalidInputError(
            f"source {obj.uri}: bytes [{offset}, {offset + length}) are outside the object's {obj.size} bytes"
        )
