"""The download engine on its own (download.download with real sources): priority order across
files, sha256 with out-of-order arrival and read-back, readiness reports only for bytes on
disk, resume, restarts at a new version, and tiny pools that must still finish."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import wait_for
from tests_helpers import st_bytes

from weightcache.errors import DeadlineError
from weightcache_daemon.config import Config, DownloadConfig, SourceConfig
from weightcache_daemon.ingest.engine import (
    WRITE_PIECE,
    BufferPool,
    HashedFile,
    IgnoredEvents,
    RateLimiter,
    download,
    ingest_name,
)
from weightcache_daemon.ingest.schedule import (
    HEADER_RANK,
    OTHER_FILE_RANK,
    other_file_ranks,
    part_count,
    part_ranks,
    safetensors_ranks,
)
from weightcache_daemon.sources import RemoteObject, Source, open_source

PART = 1 << 20


class Recorder:
    """A real source whose reads, and the engine's reports, go into one ordered log."""

    def __init__(self, inner: Source, before_read: Callable[[RemoteObject, int], None] | None = None) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.before_read = before_read
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int, int]] = []  # (event, relpath, start, end)

    def note(self, event: str, relpath: str, start: int, end: int) -> None:
        with self.lock:
            self.log.append((event, relpath, start, end))

    def reads(self) -> list[tuple[str, int]]:
        """(relpath, part index) of each part's first read, in the order the reads began."""
        seen: list[tuple[str, int]] = []
        for event, rel, start, _ in self.log:
            if event == "read" and (rel, start // PART) not in seen:
                seen.append((rel, start // PART))
        return seen

    def list(self) -> list[RemoteObject]:
        return self.inner.list()

    def stat(self, relpath: str) -> RemoteObject:
        return self.inner.stat(relpath)

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        if self.before_read is not None:
            self.before_read(obj, offset)
        self.note("read", obj.relpath, offset, offset + len(buf))
        self.inner.read_into(obj, offset, buf, on_bytes)

    def expected_sha256(self, objects: Sequence[RemoteObject]) -> dict[str, str]:
        return self.inner.expected_sha256(objects)

    def close(self) -> None:
        self.inner.close()


def _config(tmp: Path, **download: Any) -> Config:
    return Config(tmp / "cache", tmp / "sock", tmp / "admin.sock", download=DownloadConfig(part_size=PART, **download))


def _model(directory: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = {name: rng.randbytes(size) for name, size in sizes.items()}
    for name, body in data.items():
        (directory / name).write_bytes(body)
    return data


def _local(tmp: Path, sizes: dict[str, int], seed: int = 0, **kw: Any) -> tuple[Recorder, dict[str, bytes]]:
    data = _model(tmp / "src", sizes, seed)
    return Recorder(open_source(f"file://{tmp / 'src'}/", _config(tmp)), **kw), data


def _run(
    source: Recorder,
    ingest: Path,
    *,
    concurrency: int,
    buffers: int,
    priority: dict[str, list[int]] | None = None,
    check: dict[str, bytes] | None = None,
    then: Callable[[], None] | None = None,
    part: int = PART,
    **kw: Any,
) -> list[HashedFile]:
    """download() every object of source into ingest; with `check`, each on_written range is
    read back from the ingest file in the callback and compared with those bytes; `then` runs
    after each report."""
    ingest.mkdir(exist_ok=True)
    objects = source.list()

    def on_written(obj: RemoteObject, start: int, end: int) -> None:
        source.note("written", obj.relpath, start, end)
        if check is not None:
            fd = os.open(ingest / ingest_name(obj.relpath), os.O_RDONLY)
            try:
                got = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
            assert got == check[obj.relpath][start:end], (
                f"{obj.relpath} [{start}, {end}) reported before it was written"
            )
        if then is not None:
            then()

    on_state = kw.pop("on_state", None)
    on_restart = kw.pop("on_restart", None)

    class Events(IgnoredEvents):
        def written(self, obj: RemoteObject, start: int, end: int) -> None:
            on_written(obj, start, end)

        def resume_state(self, files: list[tuple[RemoteObject, str, list[int]]]) -> None:
            if on_state is not None:
                on_state(files)

        def restarted(self, obj: RemoteObject) -> None:
            if on_restart is not None:
                on_restart(obj)

    cfg = DownloadConfig(concurrency=concurrency, part_size=part)
    pool = kw.pop("pool", None) or BufferPool(buffers, part)
    return download(source, objects, ingest, cfg, pool, RateLimiter(0), Events(), kw.pop("cancelled", threading.Event()),
                    priority=priority, **kw)  # fmt: skip


def _expected_order(sizes: dict[str, int], priority: dict[str, list[int]]) -> list[tuple[str, int]]:
    names = sorted(sizes)  # the local source lists in name order: that is the file position
    keyed = [(priority[n][i], pos, i, n) for pos, n in enumerate(names) for i in range(part_count(sizes[n], PART))]
    return [(n, i) for _, _, i, n in sorted(keyed)]


def _covers_exactly(log: list[tuple[str, str, int, int]], relpath: str, size: int) -> None:
    ranges = sorted((s, e) for ev, rel, s, e in log if ev == "written" and rel == relpath)
    at = 0
    for s, e in ranges:
        assert s == at, f"{relpath}: reports {ranges} leave a gap or overlap at {at}"
        at = e
    assert at == size, f"{relpath}: reports {ranges} end at {at}, not {size}"


def _check_hashes(got: list[HashedFile], data: dict[str, bytes]) -> None:
    assert {d.obj.relpath: d.sha256 for d in got} == {n: hashlib.sha256(b).hexdigest() for n, b in data.items()}
    for d in got:
        assert d.path.read_bytes() == data[d.obj.relpath]


# ---------------------------------------------------------------- schedule.py


def test_part_ranks_take_the_lowest_rank_of_each_part() -> None:
    spans = [(0, 100, -1), (100, 3 * PART + 10, 5), (PART + 7, PART + 9, 2), (3 * PART + 10, 4 * PART, 1)]
    assert part_ranks(4 * PART + 1, PART, spans, 9) == [-1, 2, 5, 1, 9]
    assert part_ranks(0, PART, [], 3) == [3]  # an empty file is one empty part, as the engine cuts it
    assert part_ranks(2 * PART, PART, [(PART, PART, 0)], 4) == [4, 4]  # an empty tensor needs no part
    with pytest.raises(ValueError, match="not inside"):
        part_ranks(PART, PART, [(0, PART + 1, 0)], 0)


def test_safetensors_header_and_other_files_go_first() -> None:
    ranks = safetensors_ranks(3 * PART, PART, 4096, [(4096, 2 * PART, 7), (2 * PART, 3 * PART, 3)], 99)
    assert ranks == [HEADER_RANK, 7, 3]
    assert other_file_ranks(10, PART) == [OTHER_FILE_RANK] < [HEADER_RANK]


def test_a_header_written_ahead_leaves_its_part_to_its_tensors() -> None:
    # The shard starts with lm_head (rank 3): with its header already on disk, the first part
    # goes with lm_head, not ahead of every layer. A header filling whole parts takes the rank
    # of the file's first tensor, however the tensors are listed.
    tensors = [(2 * PART, 3 * PART, 0), (4096, 2 * PART, 3)]
    assert safetensors_ranks(3 * PART, PART, 4096, tensors, 99, header_written=True) == [3, 3, 0]
    assert safetensors_ranks(4 * PART, PART, PART + 8, [(PART + 8, 4 * PART, 5)], 99, True) == [5, 5, 5, 5]
    assert safetensors_ranks(PART, PART, 100, [], 99, header_written=True) == [99]  # no tensor: no rank


# ---------------------------------------------------------------- the engine


def test_parts_are_fetched_in_priority_order_across_files(tmp_path: Path) -> None:
    sizes = {"a.bin": 5 * PART + 3, "b.bin": 4 * PART, "c.json": 10}
    rng = random.Random(1)
    priority = {n: [rng.randrange(6) for _ in range(part_count(s, PART))] for n, s in sizes.items()}
    expected = _expected_order(sizes, priority)
    for concurrency in (1, 4):
        source, data = _local(tmp_path / f"c{concurrency}", sizes)
        got = _run(source, tmp_path / f"c{concurrency}" / "ingest", concurrency=concurrency, buffers=concurrency + 2,
                   priority=priority)  # fmt: skip
        _check_hashes(got, data)
        reads = source.reads()
        assert sorted(reads) == sorted(expected)
        if concurrency == 1:
            assert reads == expected
        # A part is submitted only when fewer than `concurrency` are in flight, in priority order:
        # its read can start at most concurrency - 1 places away from its rank's place.
        for place, part in enumerate(reads):
            assert abs(expected.index(part) - place) < concurrency, (part, place, reads)


@pytest.mark.parametrize("order", ["reversed", "interleaved", "shuffled"])
def test_sha256_with_out_of_order_arrival(tmp_path: Path, order: str) -> None:
    sizes = {"a.safetensors": 6 * PART + 4097, "b.safetensors": 5 * PART, "empty": 0, "small.json": 300}
    source, data = _local(tmp_path, sizes, seed=2)
    counts = {n: part_count(s, PART) for n, s in sizes.items()}
    if order == "reversed":
        priority = {n: list(range(c, 0, -1)) for n, c in counts.items()}
    elif order == "interleaved":  # a0 b0 a1 b1 ..., each file back to front
        priority = {n: [2 * (c - i) + k for i in range(c)] for k, (n, c) in enumerate(sorted(counts.items()))}
    else:
        rng = random.Random(3)
        priority = {n: rng.sample(range(100), c) for n, c in counts.items()}
    # 2 parts in flight, 3 buffers: at most one landed part can wait for the cursor in memory,
    # the rest is hashed by reading it back from the ingest file.
    got = _run(source, tmp_path / "ingest", concurrency=2, buffers=3, priority=priority, check=data)
    _check_hashes(got, data)
    assert sum(d.read_back for d in got) > 0
    for n, s in sizes.items():
        _covers_exactly(source.log, n, s)


def test_heads_known_ahead_are_on_disk_before_any_part_is_fetched(tmp_path: Path) -> None:
    """A header the daemon read to build the manifest is written and reported before the
    first fetch, so a reader has it while its part waits for its rank; the zeros padding an
    O_DIRECT write past it clobber nothing, and the part still comes, for the hash."""
    sizes = {"a.safetensors": 3 * PART + 5, "tiny.safetensors": 100}
    source, data = _local(tmp_path, sizes, seed=6)
    heads = {"a.safetensors": data["a.safetensors"][:5000], "tiny.safetensors": data["tiny.safetensors"]}
    priority = {"a.safetensors": [7, 0, 1, 2], "tiny.safetensors": [9]}  # both heads' parts go last
    got = _run(source, tmp_path / "ingest", concurrency=2, buffers=3, priority=priority, check=data, heads=heads)
    _check_hashes(got, data)
    first_read = next(k for k, (ev, *_) in enumerate(source.log) if ev == "read")
    assert sorted(source.log[:first_read]) == [
        ("written", "a.safetensors", 0, 5000), ("written", "tiny.safetensors", 0, 100)]  # fmt: skip
    assert source.reads()[-2:] == [("a.safetensors", 0), ("tiny.safetensors", 0)]
    with pytest.raises(ValueError, match=r"head of tiny\.safetensors: 101 bytes"):
        _run(source, tmp_path / "ingest2", concurrency=1, buffers=2, heads={"tiny.safetensors": bytes(101)})


def test_headers_are_read_at_once_and_their_bytes_kept(tmp_path: Path) -> None:
    """Every shard's header is read concurrently (each read waits here until all four are in
    flight, so reads one after the other would break the barrier), and its bytes come back for
    the engine to write first. Of several malformed files, the error names the first listed."""
    from weightcache.errors import InvalidInputError
    from weightcache_daemon.ingest.headers import read_headers

    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):
        header = {f"w{k}": {"dtype": "F32", "shape": [4, k + 1], "data_offsets": [0, 16 * (k + 1)]}}
        (src / f"s{k}.safetensors").write_bytes(st_bytes(header, bytes(16 * (k + 1))))
    together = threading.Barrier(4, timeout=60)
    source = Recorder(open_source(f"file://{src}/", _config(tmp_path)), lambda obj, offset: together.wait())
    objects = sorted(source.list(), key=lambda o: o.relpath)
    got = read_headers(source, objects, "llama", workers=4)
    assert sorted(got) == [o.relpath for o in objects]
    for rel, h in got.items():
        raw = (src / rel).read_bytes()
        assert h.head == raw[: h.data_offset] and h.data_offset == 8 + int.from_bytes(raw[:8], "little")
        assert [t.name for t in h.tensors] == [f"w{rel[1]}"]
    (src / "s1.safetensors").write_bytes(b"\xff" * 64)
    (src / "s3.safetensors").write_bytes(b"\xff" * 64)
    source = Recorder(open_source(f"file://{src}/", _config(tmp_path)))
    with pytest.raises(InvalidInputError, match=r"file s1\.safetensors of model llama: header length"):
        read_headers(source, sorted(source.list(), key=lambda o: o.relpath), "llama", workers=4)


class Flipping(Recorder):
    """Flips one byte (XOR 0xFF, as the fault proxy does) in each of the first reads from
    offset 0, at the next position of ``flips``: a ranged read on the wire has no checksum."""

    def __init__(self, inner: Source, flips: list[int]) -> None:
        super().__init__(inner)
        self.flips = list(flips)

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        super().read_into(obj, offset, buf, on_bytes)
        if offset == 0 and self.flips:
            buf[self.flips.pop(0)] ^= 0xFF


def test_a_header_flipped_in_transit_is_read_again_not_called_malformed(tmp_path: Path) -> None:
    """One byte flipped inside a header's JSON makes it invalid UTF-8. Read once, that failed a
    good model as malformed (InvalidInputError). Now an invalid header is read a second time: a
    valid second read is used, two different invalid reads are CorruptedError, and the same
    invalid bytes twice are the file's own fault."""
    from weightcache.errors import CorruptedError, InvalidInputError
    from weightcache_daemon.ingest.headers import read_headers

    src = tmp_path / "src"
    src.mkdir()
    names = [f"model.layers.{k}.self_attn.q_proj.weight" for k in range(4)]
    raw = st_bytes({n: {"dtype": "F32", "shape": [2], "data_offsets": [8 * k, 8 * k + 8]} for k, n in enumerate(names)},
                   bytes(32))  # fmt: skip
    (src / "s.safetensors").write_bytes(raw)
    data_offset = len(raw) - 32
    assert all(raw[at] < 0x80 and 8 < at < data_offset for at in (100, 101))  # inside the JSON

    def headers(flips: list[int]) -> tuple[Flipping, dict[str, Any]]:
        source = Flipping(open_source(f"file://{src}/", _config(tmp_path)), flips)
        return source, read_headers(source, source.list(), "llama", workers=2)

    source, got = headers([100])
    assert got["s.safetensors"].head == raw[:data_offset]
    assert [t.name for t in got["s.safetensors"].tensors] == names
    assert [e for e in source.log if e[0] == "read"] == [("read", "s.safetensors", 0, len(raw))] * 2
    with pytest.raises(CorruptedError, match=r"file s\.safetensors of model llama: two reads of its header gave "
                       r"different bytes.*corrupted in transit.*not valid UTF-8"):  # fmt: skip
        headers([100, 101])
    with pytest.raises(InvalidInputError, match=r"file s\.safetensors of model llama: header is not valid UTF-8"):
        headers([100, 100])  # the same bytes twice: what the source holds
    _, got = headers([])  # a clean header is read once
    assert got["s.safetensors"].head == raw[:data_offset]


def test_reports_only_bytes_on_disk_and_cover_each_file_once(tmp_path: Path) -> None:
    sizes = {"a.bin": 7 * PART + 123, "b.bin": 3 * PART}
    source, data = _local(tmp_path, sizes, seed=4)
    priority = {"a.bin": [3, 0, 7, 1, 5, 2, 6, 4], "b.bin": [2, 6, 0]}
    got = _run(source, tmp_path / "ingest", concurrency=3, buffers=5, priority=priority, check=data)
    _check_hashes(got, data)
    for n, s in sizes.items():
        _covers_exactly(source.log, n, s)
    # every report follows the read of its part
    for k, (ev, rel, start, _) in enumerate(source.log):
        if ev == "written":
            assert ("read", rel, start) in [(e, r, s) for e, r, s, _ in source.log[:k]]


def test_a_part_is_reported_piece_by_piece_as_it_arrives(tmp_path: Path) -> None:
    """A reader waiting for the first bytes of a part (a layer's end, sharing the part with the
    next layer) gets them once they are written, not once the whole part is."""
    part = 4 * WRITE_PIECE
    sizes = {"a.bin": 2 * part + 5}
    source, data = _local(tmp_path, sizes, seed=8)
    first_piece = threading.Event()
    inner_read = source.read_into

    def read_into(obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        if offset != 0:
            inner_read(obj, offset, buf, on_bytes)
            return
        half = WRITE_PIECE + WRITE_PIECE // 2
        inner_read(obj, 0, buf[:half], on_bytes)
        # The rest of part 0 arrives only once its first piece was reported (or never: the
        # assertion below then fails rather than the test hanging).
        first_piece.wait(timeout=60)
        source.note("rest", obj.relpath, half, len(buf))
        inner_read(obj, half, buf[half:], on_bytes)

    source.read_into = read_into  # type: ignore[method-assign]

    def then() -> None:
        if any(ev == "written" and s == 0 and e == WRITE_PIECE for ev, _, s, e in source.log):
            first_piece.set()

    got = _run(source, tmp_path / "ingest", concurrency=2, buffers=3, check=data, then=then, part=part)
    _check_hashes(got, data)
    _covers_exactly(source.log, "a.bin", sizes["a.bin"])
    events = [(ev, s, e) for ev, _, s, e in source.log if ev in ("written", "rest")]
    assert events.index(("written", 0, WRITE_PIECE)) < events.index(("rest", WRITE_PIECE + WRITE_PIECE // 2, part))


def test_file_order_reads_nothing_back(tmp_path: Path) -> None:
    sizes = {"a.bin": 4 * PART + 5, "b.bin": 3 * PART}
    source, data = _local(tmp_path, sizes, seed=5)
    # No priority: file order. Parts land out of order within the pipeline, but a buffer whose
    # part is behind only parts in flight is waited for, never taken back and read back later.
    got = _run(source, tmp_path / "ingest", concurrency=4, buffers=5)
    _check_hashes(got, data)
    file_order = {n: [k] * part_count(s, PART) for k, (n, s) in enumerate(sorted(sizes.items()))}
    assert sorted(source.reads()) == _expected_order(sizes, file_order)
    assert [d.read_back for d in got] == [0, 0]


def test_resume_after_an_interrupted_run_from_s3(tmp_path: Path, s3: Any, bucket: str) -> None:
    """A real S3 download cancelled half way, then resumed from its last on_state record: the
    resumed parts are reported first and never fetched again, and the hash is right."""
    sizes = {"a.safetensors": 6 * PART + 10, "b.safetensors": 6 * PART}
    data = _model(tmp_path / "src", sizes, seed=6)
    c = s3.client()
    for name, body in data.items():
        c.put_object(Bucket=bucket, Key=f"m/{name}", Body=body)
    cfg = Config(tmp_path / "cache", tmp_path / "sock", tmp_path / "admin.sock",
                 download=DownloadConfig(concurrency=2, part_size=PART),
                 sources=(SourceConfig("s3://", endpoint_url=s3.endpoint, region=s3.region,
                                       access_key_id=s3.admin_key[0], secret_access_key=s3.admin_key[1]),))  # fmt: skip
    priority = {"a.safetensors": [0, 2, 4, 6, 8, 10, 12], "b.safetensors": [11, 9, 7, 5, 3, 1]}
    ingest = tmp_path / "ingest"
    first = Recorder(open_source(f"s3://{bucket}/m/", cfg))
    cancelled = threading.Event()
    states: list[list[tuple[RemoteObject, str, list[int]]]] = []

    def stop_after_three() -> None:
        if sum(ev == "written" for ev, *_ in first.log) >= 3:
            cancelled.set()

    with pytest.raises(DeadlineError):
        _run(first, ingest, concurrency=2, buffers=3, priority=priority, cancelled=cancelled, on_state=states.append,
             then=stop_after_three)  # fmt: skip
    resume = {obj.relpath: set(parts) for obj, _, parts in states[-1] if parts}
    resumed = sum(len(p) for p in resume.values())
    total = sum(part_count(s, PART) for s in sizes.values())
    assert 3 <= resumed < total, resume

    second = Recorder(open_source(f"s3://{bucket}/m/", cfg))
    got = _run(second, ingest, concurrency=2, buffers=3, priority=priority, resume=resume, check=data)
    _check_hashes(got, data)
    first_read = next(k for k, (ev, *_) in enumerate(second.log) if ev == "read")
    reported_first = {(rel, s // PART) for ev, rel, s, e in second.log[:first_read] for s in range(s, e, PART)}
    assert reported_first == {(rel, i) for rel, parts in resume.items() for i in parts}
    assert not {(rel, i) for rel, i in second.reads() if i in resume.get(rel, set())}
    assert sorted(second.reads()) == sorted(p for p in _expected_order(sizes, priority)
                                            if p[1] not in resume.get(p[0], set()))  # fmt: skip
    assert sum(d.read_back for d in got) >= resumed * PART
    for n, s in sizes.items():
        _covers_exactly(second.log, n, s)


def test_parts_to_read_back_are_asked_for_before_the_cursor_reads_them(tmp_path: Path, monkeypatch: Any) -> None:
    """Back to front: every part but the first lands before the cursor can start, most of them
    to be read back. Once the last part is requested, the engine asks the kernel for all of those
    at once (read_ahead), before the cursor reads back any, so the hash reads them from the page
    cache instead of from the disk after the last byte."""
    import sys

    import weightcache_daemon.ingest.engine as engine

    sizes = {"a.bin": 8 * PART}
    source, data = _local(tmp_path, sizes, seed=9)
    names = {ingest_name(n): n for n in sizes}
    real = engine.willneed

    def spy(fd: int, offset: int, length: int) -> None:
        caller = sys._getframe(1).f_code.co_name  # read_ahead, or the cursor's advance
        source.note(caller, names[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))], offset, offset + length)
        real(fd, offset, length)

    monkeypatch.setattr(engine, "willneed", spy)
    priority = {"a.bin": list(range(8, 0, -1))}
    got = _run(source, tmp_path / "ingest", concurrency=2, buffers=3, priority=priority, check=data)
    _check_hashes(got, data)
    assert got[0].read_back >= 4 * PART
    ahead = [(k, s, e) for k, (ev, _, s, e) in enumerate(source.log) if ev == "read_ahead"]
    cursor = [(k, s, e) for k, (ev, _, s, e) in enumerate(source.log) if ev == "advance"]
    assert ahead and sum(e - s for _, s, e in ahead) == got[0].read_back
    assert max(k for k, _, _ in ahead) < min((k for k, _, _ in cursor), default=len(source.log))
    for _, s, e in cursor:  # what the cursor reads back was all asked for ahead
        assert any(a <= s and e <= b for _, a, b in ahead), (s, e)


def test_the_rate_limit_serves_the_part_started_first() -> None:
    """Two parts wait for the link: the one started first (lower ticket) goes first, even though
    it asked second. The clock is the test's, so the order does not depend on timing."""
    clock = [0.0]
    limiter = RateLimiter(1000, clock=lambda: clock[0])
    early, late = limiter.ticket(), limiter.ticket()
    limiter.take(1000)  # the link is busy for the next second of the test's clock
    served: list[str] = []

    def take(ticket: int, who: str) -> None:
        limiter.take(10, ticket)
        served.append(who)

    second = threading.Thread(target=take, args=(late, "late"), daemon=True)
    second.start()
    wait_for(lambda: len(limiter._waiting) == 1, 30, "the late part to wait")
    first = threading.Thread(target=take, args=(early, "early"), daemon=True)
    first.start()
    wait_for(lambda: len(limiter._waiting) == 2, 30, "the early part to wait")
    assert served == []
    clock[0] = 10.0  # the waits end on their own (each waits at most one second of real time)
    first.join(timeout=60)
    second.join(timeout=60)
    assert served == ["early", "late"]


def test_a_wait_for_the_rate_limit_ends_when_the_download_is_cancelled() -> None:
    """A part waiting for the link (here behind 1000 s of paid-for time) gives up as soon as its
    job is cancelled, so a daemon shutting down does not wait for the rate limit."""
    from weightcache_daemon.ingest.engine import _Cancelled

    clock = [0.0]
    limiter = RateLimiter(1000, clock=lambda: clock[0])
    limiter.take(1000 * 1000)
    cancelled = threading.Event()
    box: dict[str, BaseException] = {}

    def take() -> None:
        try:
            limiter.take(10, limiter.ticket(), cancelled)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["raised"] = exc

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    wait_for(lambda: len(limiter._waiting) == 1, 30, "the part to wait")
    cancelled.set()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and isinstance(box.get("raised"), _Cancelled)
    assert limiter._waiting == []


def test_tiny_pool_with_reversed_priority_completes(tmp_path: Path) -> None:
    sizes = {"a.bin": 9 * PART + 1, "b.bin": 8 * PART, "c.bin": 1}
    source, data = _local(tmp_path, sizes, seed=7)
    priority = {n: list(range(part_count(s, PART), 0, -1)) for n, s in sizes.items()}
    for buffers in (3, 2):  # 2 parts in flight; one spare buffer, then none
        got = _run(source, tmp_path / f"ingest{buffers}", concurrency=2, buffers=buffers, priority=priority)
        _check_hashes(got, data)


def test_jobs_sharing_a_tiny_pool_both_complete(tmp_path: Path) -> None:
    """Two jobs, one pool with fewer buffers than their parts in flight: buffers one job keeps
    for its hash cursor are taken back for the other's fetches, and both finish."""
    sizes = {"a.bin": 6 * PART + 9, "b.bin": 5 * PART}
    priority = {n: list(range(part_count(s, PART), 0, -1)) for n, s in sizes.items()}
    pool = BufferPool(3, PART)
    jobs = [_local(tmp_path / f"job{k}", sizes, seed=10 + k) for k in range(2)]
    with ThreadPoolExecutor(2) as ex:
        running = [ex.submit(_run, source, tmp_path / f"job{k}" / "ingest", concurrency=2, buffers=0,
                             priority=priority, pool=pool) for k, (source, _) in enumerate(jobs)]  # fmt: skip
        for fut, (_, data) in zip(running, jobs, strict=True):
            _check_hashes(fut.result(), data)
    assert sum(pool.try_get() is not None for _ in range(4)) == 3  # every buffer came back


def test_a_file_changed_at_the_source_restarts_in_priority_order(tmp_path: Path) -> None:
    sizes = {"a.bin": 4 * PART, "b.bin": 2 * PART}
    changed: list[bytes] = []

    def change_once(obj: RemoteObject, offset: int) -> None:
        # The third read of a.bin finds a new version: same size, new bytes, a new mtime.
        if obj.relpath == "a.bin" and not changed and sum(r == "a.bin" for _, r, *_ in source.log) == 2:
            path = tmp_path / "src" / "a.bin"
            changed.append(random.Random(9).randbytes(sizes["a.bin"]))
            path.write_bytes(changed[0])
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    source, data = _local(tmp_path, sizes, seed=8, before_read=change_once)
    restarts: list[str] = []

    def on_restart(obj: RemoteObject) -> None:
        source.note("restart", obj.relpath, 0, 0)
        restarts.append(obj.relpath)

    priority = {"a.bin": [3, 1, 2, 0], "b.bin": [4, 1]}
    got = _run(source, tmp_path / "ingest", concurrency=1, buffers=2, priority=priority, on_restart=on_restart)
    data["a.bin"] = changed[0]
    _check_hashes(got, data)
    assert restarts == ["a.bin"] and [d.restarts for d in got] == [1, 0]
    at = source.log.index(("restart", "a.bin", 0, 0))
    after = source.log[at + 1 :]
    # a.bin again from its first rank; nothing of its old version reported after the restart
    reads_a = [s // PART for ev, rel, s, _ in after if ev == "read" and rel == "a.bin"]
    assert reads_a == [3, 1, 2, 0]
    _covers_exactly(after, "a.bin", sizes["a.bin"])
