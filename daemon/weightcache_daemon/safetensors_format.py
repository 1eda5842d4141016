"""The safetensors format: header parsing and the validation rules (docs/architecture.md, decision 6).

Layout: 8 bytes little-endian header length N, N bytes of UTF-8 JSON object, then the
data section. Every tensor entry is ``{"dtype", "shape", "data_offsets": [begin, end]}``
with offsets relative to the start of the data section. A valid file:

* has N >= 2 and the header inside the file, and N <= MAX_HEADER (64 MiB);
* has at most MAX_TENSORS (131072) tensors: the JSON parser stops at the first object
  past that, so a header of hundreds of thousands of empty tensors is refused in
  milliseconds instead of building them all (the largest public checkpoints have a few
  tens of thousands per file);
* has a UTF-8 JSON object header starting with ``{`` and no duplicate keys;
* has ``__metadata__`` (optional) mapping strings to strings;
* names known dtypes; shapes are lists of non-negative integers;
* has bytes == product(shape) * dtype bits / 8 (exact Python ints, so no overflow);
* has data offsets sorted, contiguous from 0, without overlap, ending exactly at the
  end of the file (no trailing bytes, no gaps).

``parse_header`` raises InvalidInputError naming the file and the rule it broke.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightcache.contract.errors import InvalidInputError

__all__ = ["DTYPE_BITS", "MAX_HEADER", "MAX_TENSORS", "TensorInfo", "parse_header", "read_header"]

# Below the format's own 100 MB: a header of MAX_TENSORS entries with long names is ~30 MB.
MAX_HEADER = 64 << 20
MAX_TENSORS = 131_072
MAX_ELEMENTS = 2**64
MAX_DIMS = 64  # real tensors have a handful; bounds the work a hostile shape can cause

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte within the file
    length: int


class _Objects:
    """object_pairs_hook: refuses duplicate keys, and stops the parse once the header holds
    more JSON objects than a valid one can (one per tensor, the top level, __metadata__)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self.count += 1
        if self.count > self.limit:
            raise _TooMany()
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _Dup(key)
            out[key] = value
        return out


class _Dup(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


class _TooMany(Exception):
    pass


def _header_length(first8: bytes, file_size: int, label: str) -> int:
    """The header length a file's first 8 bytes give, checked against the length rules."""
    n = int.from_bytes(first8[:8], "little")
    if n > MAX_HEADER:
        raise InvalidInputError(f"{label}: header length {n} exceeds the {MAX_HEADER}-byte limit")
    if n < 2:
        raise InvalidInputError(f"{label}: header length {n} is too small to hold a JSON object")
    if 8 + n > file_size:
        raise InvalidInputError(f"{label}: header length {n} runs past the end of the {file_size}-byte file")
    return n


def _check_size(file_size: int, label: str) -> None:
    if file_size < 8:
        raise InvalidInputError(f"{label}: file is {file_size} bytes, shorter than the 8-byte header length")


def read_header(fd: int, file_size: int, label: str) -> tuple[int, bytes]:
    """Read (header length, header bytes) from an open file, checking the length rules."""
    _check_size(file_size, label)
    n = _header_length(os.pread(fd, 8, 0), file_size, label)
    header = os.pread(fd, n, 8)
    if len(header) != n:
        raise InvalidInputError(f"{label}: file ended inside the {n}-byte header")
    return n, header


def parse_header(header: bytes, file_size: int, label: str) -> tuple[list[TensorInfo], dict[str, str]]:
    """Validate a header against the file size; return tensors in offset order and metadata."""
    obj = _header_json(header, label)
    metadata = _metadata(obj.pop("__metadata__", None), label)
    entries = [_entry(name, entry, f"{label}: tensor {name!r}") for name, entry in obj.items()]
    return _layout(entries, 8 + len(header), file_size, label), metadata


def _header_json(header: bytes, label: str) -> dict[str, Any]:
    """The header as a JSON object: UTF-8, no duplicate keys, at most MAX_TENSORS entries."""
    if not header.startswith(b"{"):
        raise InvalidInputError(f"{label}: header does not start with '{{' (not a JSON object)")
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{label}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_Objects(MAX_TENSORS + 2))
    except _Dup as dup:
        raise InvalidInputError(f"{label}: header has duplicate key {dup.key!r}") from None
    except _TooMany:
        raise InvalidInputError(f"{label}: header has more than {MAX_TENSORS} tensors (the limit)") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"{label}: header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{label}: header is not a JSON object")
    if len(obj) - ("__metadata__" in obj) > MAX_TENSORS:  # the hook above stops only the far-too-many
        raise InvalidInputError(f"{label}: header has more than {MAX_TENSORS} tensors (the limit)")
    return obj


def _metadata(raw: object, label: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise InvalidInputError(f"{label}: __metadata__ must map strings to strings")
    return dict(raw)


_Entry = tuple[int, int, str, str, tuple[int, ...]]  # begin, end, name, dtype, shape


def _entry(name: str, entry: object, where: str) -> _Entry:
    """One tensor's entry: its fields, dtype, shape, and offsets that span exactly its bytes."""
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{where}: entry is not an object")
    unknown = set(entry) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing:
        raise InvalidInputError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    if unknown:
        raise InvalidInputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidInputError(f"{where}: unknown dtype {dtype!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInputError(f"{where}: shape {str(shape)[:100]} is not a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InvalidInputError(f"{where}: {len(shape)} dimensions, more than {MAX_DIMS}")
    offs = entry["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int and o >= 0 for o in offs)):
        raise InvalidInputError(f"{where}: data_offsets {offs!r} is not [begin, end] of non-negative integers")
    begin, end = offs
    if end < begin:
        raise InvalidInputError(f"{where}: data_offsets end {end} is before begin {begin}")
    nbytes = _nbytes(shape, dtype, where)
    if nbytes != end - begin:
        raise InvalidInputError(
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span {end - begin}"
        )
    return begin, end, name, dtype, tuple(shape)


def _nbytes(shape: list[int], dtype: str, where: str) -> int:
    nelem = 0 if 0 in shape else 1
    for d in shape if nelem else ():
        nelem *= d  # Python ints: exact, no overflow...
        if nelem > MAX_ELEMENTS:  # ...and no giant numbers: stop once absurd
            raise InvalidInputError(f"{where}: shape {shape[:8]} has more than 2**64 elements")
    bits = nelem * DTYPE_BITS[dtype]
    if bits % 8:
        raise InvalidInputError(f"{where}: {nelem} elements of {dtype} do not fill whole bytes")
    return bits // 8


def _layout(entries: list[_Entry], data_start: int, file_size: int, label: str) -> list[TensorInfo]:
    """Tensors in offset order, contiguous from 0 and covering the data exactly."""
    data_size = file_size - data_start
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    tensors: list[TensorInfo] = []
    for begin, end, name, dtype, shape in entries:
        if begin < cursor:
            raise InvalidInputError(
                f"{label}: tensor {name!r} at [{begin}, {end}) overlaps the previous tensor ending at {cursor}"
            )
        if begin > cursor:
            raise InvalidInputError(
                f"{label}: gap of {begin - cursor} bytes before tensor {name!r} (offsets must be contiguous from 0)"
            )
        cursor = end
        tensors.append(TensorInfo(name, dtype, shape, data_start + begin, end - begin))
    if cursor != data_size:
        if cursor > data_size:
            raise InvalidInputError(f"{label}: tensors need {cursor} data bytes but the file has {data_size}")
        raise InvalidInputError(f"{label}: {data_size - cursor} trailing bytes after the last tensor")
    return tensors


FIRST_READ = 256 << 10  # one ranged read holds the header of nearly every checkpoint


def read_header_from(
    read: Callable[[int, int], bytes], file_size: int, label: str
) -> tuple[int, list[TensorInfo], dict[str, str]]:
    """(data offset, tensors, metadata) of a safetensors file that is not on disk yet, from
    `read(offset, length)` (a ranged read of the source): usually one read of FIRST_READ
    bytes, a second only for a larger header. The same rules as for a file on disk."""
    _check_size(file_size, label)
    head = read(0, min(file_size, FIRST_READ))
    n = _header_length(head, file_size, label)
    header = head[8 : 8 + n]
    if len(header) < n:
        header += read(len(head), 8 + n - len(head))
    tensors, metadata = parse_header(header, file_size, label)
    return 8 + n, tensors, metadata


def validate_file(path: str, label: str | None = None) -> tuple[list[TensorInfo], dict[str, str]]:
    """Open and validate a safetensors file on disk."""
    label = label or path
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        _, header = read_header(fd, size, label)
        return parse_header(header, size, label)
    finally:
        os.close(fd)
