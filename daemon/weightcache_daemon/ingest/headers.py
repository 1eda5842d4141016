"""The safetensors headers of a model not downloaded yet, by ranged reads of its source.

A job reads every header before it fetches anything: a malformed file fails it before its
bytes move, the headers give the manifest early readers get and the ranks of the
layer-order download, and their bytes are written to the ingest files first.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from weightcache.contract.errors import CorruptedError, InvalidInputError
from weightcache_daemon.ingest.engine import read_retrying
from weightcache_daemon.safetensors_format import TensorInfo, read_header_from
from weightcache_daemon.sources import ObjectChanged, RemoteObject, Source

__all__ = ["RemoteHeader", "read_headers", "remote_header"]

log = structlog.get_logger("weightcached.remote_headers")


@dataclass(frozen=True)
class RemoteHeader:
    data_offset: int  # 8 + header length: where the tensors' bytes start
    tensors: list[TensorInfo]
    head: bytes  # bytes [0, data_offset) of the listed version; empty if it changed since


def read_headers(source: Source, objects: Sequence[RemoteObject], label: str, workers: int) -> dict[str, RemoteHeader]:
    """Every object's header, ``workers`` reads at a time: one round trip each, so the 30
    shards of a large model read one after the other would wait 30 round trips before the
    first byte of the download. If several are malformed, the error is the first one's in
    ``objects`` order, as it would be read one by one."""
    if not objects:
        return {}
    with ThreadPoolExecutor(max(1, min(workers, len(objects))), "wc-header") as ex:
        read = ex.map(lambda o: remote_header(source, o, f"file {o.relpath} of model {label}"), objects)
        return {o.relpath: h for o, h in zip(objects, read, strict=True)}


def remote_header(source: Source, obj: RemoteObject, label: str) -> RemoteHeader:
    """(data offset, tensors, the header's bytes) of a safetensors object, by ranged reads of
    the source. If the object changed, the header is read once more at its new version, and no
    bytes are returned: the download itself fetches that version, from a listing it no longer
    matches, so bytes of the new version must not be written ahead of it.

    A header that fails validation is read a second time before the file is called malformed.
    A ranged read carries no checksum, so one byte flipped on the wire (most often inside the
    JSON, which is most of what the first read holds) would otherwise fail the model as
    InvalidInputError. Two reads that differ are corruption in transit: the second is used if
    it is valid (the downloaded file is compared with it and hashed, so a wrong second read
    cannot get through), and CorruptedError is raised if neither is."""
    first: list[bytes] = []
    try:
        return _read_once(source, obj, label, first)
    except InvalidInputError as exc:
        second: list[bytes] = []
        try:
            again = _read_once(source, obj, label, second)
        except InvalidInputError:
            if second == first:
                raise exc from None  # the same bytes twice: the file is malformed
            raise CorruptedError(
                f"{label}: two reads of its header gave different bytes, neither of them a valid header "
                f"(corrupted in transit); the first: {exc}"
            ) from None
        log.warning("header_read_twice", file=label, first_read=str(exc))
        return again


def _read_once(source: Source, obj: RemoteObject, label: str, got: list[bytes]) -> RemoteHeader:
    """One attempt of remote_header; ``got`` receives the bytes it read, in order."""

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        read_retrying(source, obj, offset, memoryview(buf), lambda n: None)  # retried as the parts are
        got.append(bytes(buf))  # read_header_from reads the file's start in order
        return got[-1]

    try:
        data_offset, tensors, _ = read_header_from(read, obj.size, label)
        return RemoteHeader(data_offset, tensors, b"".join(got)[:data_offset])
    except ObjectChanged:
        got.clear()
        obj = source.stat(obj.relpath)
        data_offset, tensors, _ = read_header_from(read, obj.size, label)
        return RemoteHeader(data_offset, tensors, b"")
