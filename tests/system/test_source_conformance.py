"""The Source contract (daemon/weightcache_daemon/sources/base.py), run against every source.

Each behaviour is one test run once per source, the way containerd's ContentSuite runs one
suite over every content store. A new source (HTTP, ...) joins by adding a ``Kit`` to ``KITS``:
a way to publish a directory of files under a URI, to replace one of them, and whether the
source vouches for sha256 checksums. Sources are opened as the daemon opens them,
``open_source(uri, config)`` with a config from ``config.load``, against real storage: a temp
directory for ``file://`` and the SeaweedFS server for ``s3://``.

Every test also checks, when its source is closed, that the source left no descriptor open
(a file or a pooled connection), error paths included.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3server
from harness import make_model, write_config

from weightcache.errors import InvalidInputError, NotFoundError
from weightcache_daemon import config as configmod
from weightcache_daemon.sources import ObjectChanged, RemoteObject, Source, open_source

BIG = random.Random(7).randbytes((5 << 20) + 123)  # crosses the S3 (1 MiB) and file (4 MiB) read chunks

FILES: Mapping[str, bytes] = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": random.Random(1).randbytes(10240),  # no period: a shifted read cannot match
    "big.safetensors": BIG,
    "empty.txt": b"",
    "sub/tokenizer.json": b'{"version": "1.0"}',
    "sub/deeper/weights.bin": random.Random(2).randbytes(3000),
    # '-' < '.' < '/': the order of whole paths, not of a per-directory walk
    "a/z.bin": b"z",
    "a-b.bin": b"ab",
    "a.bin": b"a",
}


@dataclass(frozen=True)
class Kit:
    """One source implementation as the suite sees it."""

    name: str
    publish: Callable[[Path], str]  # make a local directory's files visible under a new URI
    replace: Callable[[str, str, bytes], None]  # (uri, relpath, data): give one object new content
    open: Callable[[str], Source]
    vouches: bool  # expected_sha256() knows every published file's digest


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _config(tmp_path: Path, s3: s3server.S3Server | None) -> configmod.Config:
    path = write_config(tmp_path / "wc.toml", s3, cache_dir=str(tmp_path / "cache"), socket_dir=str(tmp_path / "sock"))
    return configmod.load({}, path)


def _file_kit(tmp_path: Path) -> Kit:
    cfg = _config(tmp_path, None)

    def replace(uri: str, rel: str, data: bytes) -> None:
        # a new file renamed over the old one, as tools publish: a new inode, whatever the
        # clock's granularity (an in-place rewrite of the same size within one timestamp tick
        # keeps size, mtime and inode: the version tag cannot see it)
        path = Path(uri.removeprefix("file://"), rel)
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    return Kit("file", lambda d: f"file://{d}/", replace, lambda uri: open_source(uri, cfg), vouches=False)


def _s3_kit(tmp_path: Path, s3: s3server.S3Server) -> Kit:
    cfg = _config(tmp_path, s3)
    # One bucket for the whole suite (each test publishes under its own prefix): SeaweedFS
    # gives every bucket volumes of its own, out of a fixed number per server.
    bucket = f"conf-{abs(hash(s3.endpoint)) % 10**12:012d}"

    def put(items: Mapping[str, bytes]) -> None:
        client = s3.client()
        try:
            for key, data in items.items():
                # a full-object SHA256 checksum: what expected_sha256() reads back
                client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
        finally:
            client.close()

    def publish(d: Path) -> str:
        prefix = f"models/{uuid.uuid4().hex[:8]}/"
        put({prefix + p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()})
        return f"s3://{bucket}/{prefix}"

    def replace(uri: str, rel: str, data: bytes) -> None:
        put({uri.removeprefix(f"s3://{bucket}/") + rel: data})

    client = s3.client()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except client.exceptions.BucketAlreadyExists:
        pass
    finally:
        client.close()
    return Kit("s3", publish, replace, lambda uri: open_source(uri, cfg), vouches=True)


KITS = ["file", "s3"]


@pytest.fixture(params=KITS)
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Kit:
    if request.param == "file":
        return _file_kit(tmp_path)
    return _s3_kit(tmp_path, request.getfixturevalue("s3"))


def _open_fds() -> dict[int, str]:
    """This process's descriptors and what they point to (the one listing the directory is
    closed before it is read back, so it drops out)."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass
    return out


@pytest.fixture
def model(kit: Kit, tmp_path: Path) -> Iterator[tuple[str, Source]]:
    """The FILES tree published by the kit, and a source opened on it; closed at the end, after
    which nothing it opened may still be open."""
    uri = kit.publish(_write_tree(tmp_path / "model", FILES))
    before = _open_fds()
    src = kit.open(uri)
    yield uri, src
    src.close()
    left = {fd: target for fd, target in _open_fds().items() if before.get(fd) != target}
    assert not left, f"{kit.name} source left descriptors open after close(): {left}"


def _read(src: Source, obj: RemoteObject, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    landed: list[int] = []
    src.read_into(obj, offset, memoryview(buf), landed.append)
    assert all(n > 0 for n in landed), f"on_bytes got a non-positive count: {landed}"
    assert sum(landed) == length, f"on_bytes reported {sum(landed)} of {length} bytes"
    return bytes(buf)


def _by_path(src: Source) -> dict[str, RemoteObject]:
    return {o.relpath: o for o in src.list()}


# ---------------------------------------------------------------- list


def test_list_names_every_file_with_its_size_version_and_uri(model: tuple[str, Source]) -> None:
    uri, src = model
    objs = src.list()
    assert sorted(o.relpath for o in objs) == sorted(FILES)
    for o in objs:
        assert o.size == len(FILES[o.relpath]), o
        assert isinstance(o.version, str) and o.version, f"{o.relpath}: empty version tag"
        assert o.uri == uri + o.relpath, o
    assert len({o.uri for o in objs}) == len(objs)


def test_list_is_sorted_by_path_and_repeatable(model: tuple[str, Source]) -> None:
    _, src = model
    first = src.list()
    assert [o.relpath for o in first] == sorted(FILES)
    assert src.list() == first  # same files, same records: versions do not drift between listings


def test_nested_directories_are_slash_separated_relative_paths(model: tuple[str, Source]) -> None:
    _, src = model
    objs = _by_path(src)
    assert objs["sub/deeper/weights.bin"].size == 3000
    assert "sub" not in objs and "sub/deeper" not in objs and "a" not in objs  # directories are not objects
    assert not any(rel.startswith("/") or "\\" in rel or "//" in rel for rel in objs)


def test_empty_file_is_listed_and_reads_as_nothing(model: tuple[str, Source]) -> None:
    _, src = model
    empty = _by_path(src)["empty.txt"]
    assert empty.size == 0 and empty.version
    assert src.stat("empty.txt") == empty
    assert _read(src, empty, 0, 0) == b""


def test_a_location_with_nothing_under_it_lists_nothing_or_is_not_found(kit: Kit, tmp_path: Path) -> None:
    """S3 has no directories, so an unused prefix lists empty; a directory that does not exist is
    NotFoundError naming it. Never another category, never an invented object."""
    empty = tmp_path / "nothing"
    uri = kit.publish(empty) if kit.name == "s3" else f"file://{empty}/"
    src = kit.open(uri)
    try:
        try:
            assert src.list() == []
        except NotFoundError as exc:
            assert str(empty) in str(exc) or uri.rstrip("/") in str(exc), exc
    finally:
        src.close()


# ---------------------------------------------------------------- stat


def test_stat_agrees_with_listing(model: tuple[str, Source]) -> None:
    _, src = model
    for rel, obj in _by_path(src).items():
        assert src.stat(rel) == obj


def test_stat_of_a_missing_object_is_not_found_naming_it(model: tuple[str, Source]) -> None:
    _, src = model
    for rel in ("no-such-file.json", "sub/no-such-file.json", "sub/deeper/no-such-dir/x.bin"):
        with pytest.raises(NotFoundError, match=re.escape(rel)):
            src.stat(rel)


# ---------------------------------------------------------------- read_into


@pytest.mark.parametrize(
    ("rel", "offset", "length"),
    [
        ("model.safetensors", 0, 100),
        ("model.safetensors", 5000, 1234),
        ("model.safetensors", 10240 - 17, 17),
        ("model.safetensors", 0, 10240),
        ("model.safetensors", 4096, 0),
        ("model.safetensors", 10240, 0),
        ("big.safetensors", (1 << 20) - 7, 14),
        ("big.safetensors", (4 << 20) - 7, 14),
        ("big.safetensors", 0, len(BIG)),
    ],
    ids=["start", "middle", "end", "whole", "zero-length", "zero-length-at-end", "across-1MiB", "across-4MiB",
         "whole-multi-chunk"],
)  # fmt: skip
def test_byte_ranges(model: tuple[str, Source], rel: str, offset: int, length: int) -> None:
    _, src = model
    obj = _by_path(src)[rel]
    assert _read(src, obj, offset, length) == FILES[rel][offset : offset + length]


def test_every_file_reads_back_as_published(model: tuple[str, Source]) -> None:
    _, src = model
    for rel, obj in _by_path(src).items():
        assert _sha(_read(src, obj, 0, obj.size)) == _sha(FILES[rel]), rel


@pytest.mark.parametrize(("offset", "length"), [(10240 - 10, 20), (10240, 1), (10240 + 100, 10), (-1, 5)],
                         ids=["overlapping-end", "one-past-end", "far-past-end", "negative-offset"])  # fmt: skip
def test_range_outside_the_object_is_refused(model: tuple[str, Source], offset: int, length: int) -> None:
    """Never a short read reported as success, and not ObjectChanged (the engine would restart
    the file for ever): the caller asked for bytes the listed object does not have."""
    _, src = model
    obj = _by_path(src)["model.safetensors"]
    buf = bytearray(b"\xaa" * length)
    landed: list[int] = []
    with pytest.raises(InvalidInputError, match="outside the object's 10240 bytes") as info:
        src.read_into(obj, offset, memoryview(buf), landed.append)
    assert obj.uri in str(info.value)
    assert landed == [] and buf == b"\xaa" * length


def test_concurrent_reads_each_get_their_own_bytes(model: tuple[str, Source]) -> None:
    _, src = model
    obj = _by_path(src)["big.safetensors"]
    rng = random.Random(3)
    ranges = [(o, rng.randrange(1, 300_000)) for o in (rng.randrange(0, len(BIG) - 300_000) for _ in range(48))]
    with ThreadPoolExecutor(max_workers=12) as ex:
        got = list(ex.map(lambda r: _read(src, obj, *r), ranges))
    for (offset, length), data in zip(ranges, got, strict=True):
        assert data == BIG[offset : offset + length], (offset, length)


# ---------------------------------------------------------------- versions


def test_version_changes_with_content_and_only_there(kit: Kit, model: tuple[str, Source]) -> None:
    uri, src = model
    before = _by_path(src)
    kit.replace(uri, "model.safetensors", bytes(b ^ 0xFF for b in FILES["model.safetensors"]))  # same size
    kit.replace(uri, "config.json", b"{}")  # another size
    after = _by_path(src)
    assert after["model.safetensors"].size == before["model.safetensors"].size
    assert after["model.safetensors"].version != before["model.safetensors"].version
    assert after["config.json"].version != before["config.json"].version and after["config.json"].size == 2
    unchanged = set(FILES) - {"model.safetensors", "config.json"}
    assert {rel: after[rel] for rel in unchanged} == {rel: before[rel] for rel in unchanged}
    assert src.stat("model.safetensors") == after["model.safetensors"]


@pytest.mark.parametrize("new", [b"\x00" * 10240, b"{}"], ids=["same-size", "resized"])
def test_object_changed_between_stat_and_read_raises(kit: Kit, model: tuple[str, Source], new: bytes) -> None:
    uri, src = model
    obj = src.stat("model.safetensors")
    kit.replace(uri, "model.safetensors", new)
    with pytest.raises(ObjectChanged) as info:
        _read(src, obj, 0, 2)
    assert info.value.obj == obj and obj.uri in str(info.value)
    fresh = src.stat("model.safetensors")  # what the engine does next: restart at the new version
    assert fresh.version != obj.version
    assert _read(src, fresh, 0, fresh.size) == new


# ---------------------------------------------------------------- object names

ESCAPES = ["../escape.json", "sub/../config.json", "sub/../../escape.json", "/etc/passwd", "a//z.bin", "./config.json",
           "sub/./tokenizer.json", "sub/", "a\\z.bin", "config.json\x00", "", ".."]  # fmt: skip


@pytest.mark.parametrize("relpath", ESCAPES, ids=repr)
def test_names_that_are_not_plain_relative_paths_are_refused(model: tuple[str, Source], relpath: str) -> None:
    """Several of these name a real file if resolved (sub/../config.json, ./config.json,
    /etc/passwd): a source that did not check would find it rather than refuse it."""
    uri, src = model
    with pytest.raises(InvalidInputError) as info:
        src.stat(relpath)
    assert repr(relpath) in str(info.value) and uri.rstrip("/") in str(info.value), info.value
    forged = RemoteObject(relpath, 10, "v", uri + relpath)
    with pytest.raises(InvalidInputError) as info:
        _read(src, forged, 0, 2)
    assert repr(relpath) in str(info.value)
    with pytest.raises(InvalidInputError):
        _read(src, forged, 0, 0)


# ---------------------------------------------------------------- expected_sha256


def test_expected_sha256_vouches_only_for_the_listed_bytes(kit: Kit, model: tuple[str, Source]) -> None:
    uri, src = model
    objs = src.list()
    got = src.expected_sha256(objs)
    assert got == ({rel: _sha(data) for rel, data in FILES.items()} if kit.vouches else {})
    subset = [o for o in objs if o.relpath.startswith("sub/")]
    assert set(src.expected_sha256(subset)) == ({o.relpath for o in subset} if kit.vouches else set())
    assert src.expected_sha256([]) == {}
    # an object replaced since it was listed: its new digest must not be given for the old version
    listed = _by_path(src)["config.json"]
    kit.replace(uri, "config.json", b'{"model_type": "changed"}')
    stale = src.expected_sha256([listed])
    assert stale.get("config.json") in (None, _sha(FILES["config.json"])), stale


# ---------------------------------------------------------------- close and a real model


def test_close_is_idempotent(kit: Kit, model: tuple[str, Source]) -> None:
    _, src = model
    obj = src.stat("config.json")
    assert _read(src, obj, 0, obj.size) == FILES["config.json"]
    src.close()  # the fixture closes it again and checks that nothing was left open


def test_a_real_model_lists_and_reads(kit: Kit, tmp_path: Path) -> None:
    d = make_model(tmp_path / "tiny")
    src = kit.open(kit.publish(d))
    try:
        objs = _by_path(src)
        local = {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")}
        assert set(objs) == set(local)
        for rel, p in local.items():
            assert _read(src, objs[rel], 0, objs[rel].size) == p.read_bytes(), rel
    finally:
        src.close()
