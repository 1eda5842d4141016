"""Where a snapshot's bytes come from: the one seam between a model handle and its files.

``Model``, ``LayerStream`` and ``weightcache.nn`` read bytes only through ``Backing``; none of
them knows whether the bytes are a shared mapping, private memory, or something else.

- ``MappedFiles``: the descriptors fd.sock granted, mapped ``MAP_PRIVATE`` (zero-copy, pages
  shared with every process until one writes). Owns the fd.sock connection, i.e. the lease.
- ``FetchedFiles``: whole files read over the gRPC ``ReadRange`` stream into private memory,
  each on first use (for a client that cannot receive descriptors).

The protocol also carries readiness (``ready``/``wait_ready``) and completion
(``complete``/``wait_complete``) for a backing whose bytes arrive range by range while the
daemon downloads them (``_early``): ``read_into`` and ``view`` return only once their range
is on disk; ``complete`` says every file is verified and committed. A ready byte may still
fail verification, so a user that hands out a whole-model result (``state_dict``, a path, the
final layer group of a stream) calls ``wait_complete()`` first. Once such a download failed,
every method raises that failure. For the two backings here every byte is ready and verified
as soon as the backing exists.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .contract.errors import CorruptedError, NotFoundError
from .contract.readahead import willneed

if TYPE_CHECKING:
    from ._fd import FdConnection
    from ._records import FileInfo

__all__ = ["Backing", "FetchedFiles", "MappedFiles", "Prefaulting", "check_range"]


@runtime_checkable
class Backing(Protocol):
    """The bytes of one snapshot's files, addressed by (file path, offset)."""

    @property
    def zero_copy(self) -> bool:
        """True when ``view`` shares page-cache pages rather than private memory."""
        ...

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        """Copy bytes [offset, offset + len(dest)) of ``file`` into ``dest`` (waiting until
        they are ready). Safe to call from several threads at once."""
        ...

    def view(self, file: str, offset: int, length: int) -> memoryview:
        """A writable view of bytes [offset, offset + length) of ``file``, without copying
        where the backing allows (waiting until they are ready). Writes stay in this process."""
        ...

    def ready(self, file: str, offset: int, length: int) -> bool:
        """Whether that range can be read now without waiting."""
        ...

    def wait_ready(self, file: str, offset: int, length: int, timeout: float | None = None) -> bool:
        """Block until that range is ready; False if ``timeout`` passed first."""
        ...

    def complete(self) -> bool:
        """Whether every byte is on disk and verified (the snapshot is committed)."""
        ...

    def wait_complete(self, timeout: float | None = None) -> bool:
        """Block until ``complete()``; False if ``timeout`` passed first."""
        ...

    def advise(self, file: str, offset: int, length: int) -> None:
        """A hint that the range is wanted soon (asynchronous readahead); may do nothing."""
        ...

    def descriptors(self) -> Mapping[str, int] | None:
        """Open descriptors per file path (for path-based loaders), or None without descriptors."""
        ...

    def close(self) -> None:
        """Release what the backing holds. Views already handed out stay valid."""
        ...


@runtime_checkable
class Prefaulting(Backing, Protocol):
    """A backing whose views are lazily mapped pages and that can fault a range in ahead of
    use. ``stream(copy=False)`` uses it when the backing has it; without it, a stream of views
    waits for each whole group instead (see _stream.py)."""

    def prefault(self, file: str, offset: int, length: int) -> None:
        """Read the range into the page cache and map it now (blocking), so views of it do not
        fault one page at a time."""
        ...


def check_range(file: str, size: int, offset: int, length: int) -> None:
    """CorruptedError unless [offset, offset+length) lies inside a file of ``size`` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise CorruptedError(f"bytes {offset}..{offset + length} of {file} are outside the file ({size} bytes)")


PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
# madvise(2) advice: fault a range's pages in, reading them from the file as needed, or making
# them writable (Linux 5.14; Python's mmap module does not name them yet).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _populate(start: int, end: int, advice: int) -> None:
    """madvise(2) over the page-aligned [start, end), through ctypes, which lets go of the GIL
    for the call: ``mmap.madvise`` holds it, so a populate that waits for the disk would stop
    every other thread of the process meanwhile, the one queuing the readahead included (a
    cold 164 MiB group of views: 308 ms held against 126 ms let go, docs/benchmarks.md).
    A kernel before 5.14 refuses the advice; then the pages fault in at first use as before."""
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def populate_write(dest: memoryview) -> None:
    """Make the pages wholly inside a writable buffer now, in one madvise(2) call, rather than
    one page fault at a time when they are first written."""
    if len(dest) < PAGE:
        return
    addr = ctypes.addressof(ctypes.c_char.from_buffer(dest))
    _populate(-(-addr // PAGE) * PAGE, (addr + len(dest)) // PAGE * PAGE, MADV_POPULATE_WRITE)


def _resident(addr: int, length: int) -> bool:
    """Whether every page of the mapped range [addr, addr + length) is in the page cache
    (mincore(2); False when that cannot be told)."""
    start = addr - addr % PAGE
    n = (addr + length - start + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(n)
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * PAGE), vec) != 0:
        return False
    return vec.raw[:n].count(0) == 0


class MappedFiles:
    """Descriptors from fd.sock, each file mapped ``MAP_PRIVATE``; ``close()`` ends the lease.

    Besides the ``Backing`` methods it offers ``prefault`` (it is ``Prefaulting``)."""

    zero_copy = True

    def __init__(self, conn: FdConnection, snapshot_id: str) -> None:
        self._conn = conn
        self._snapshot_id = snapshot_id
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._views: dict[str, memoryview] = {}
        self._maps: dict[str, mmap.mmap] = {}  # for prefault()'s madvise
        self._addrs: dict[str, int] = {}  # where each mapping starts, for advise()'s mincore
        granted = conn.acquire(snapshot_id)
        try:
            for g in granted:
                # Every descriptor stays open until close(), empty files included: a path-based
                # loader links to them, and a mapping alone cannot be reopened by name.
                self._fds[g.path] = g.fd
                self._sizes[g.path] = g.size
                if g.size:
                    # MAP_PRIVATE: pages are shared with every process until one writes; a write
                    # makes a private copy, never touching the blob or another process.
                    mm = mmap.mmap(g.fd, g.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    # The mapping is never closed explicitly: tensors viewing it keep it alive,
                    # and it goes when the last of them does.
                    self._views[g.path] = memoryview(mm)
                    self._maps[g.path] = mm
                    self._addrs[g.path] = ctypes.addressof(ctypes.c_char.from_buffer(mm))
                else:
                    self._views[g.path] = memoryview(bytearray())
        except BaseException:
            for g in granted:
                if g.path not in self._fds:
                    os.close(g.fd)
            self.close()
            raise

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None or fd < 0:
            raise NotFoundError(f"file {file!r} is not in snapshot {self._snapshot_id} (or the handle is closed)")
        return fd

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        # pread from the page cache rather than memcpy from the mapping: one copy either way,
        # but a cold read gets kernel readahead and does not fault page by page.
        fd = self._fd(file)
        check_range(file, self._sizes[file], offset, len(dest))
        done = 0
        while done < len(dest):
            n = os.preadv(fd, [dest[done:]], offset + done)
            if n <= 0:
                raise CorruptedError(f"{file} ended at {offset + done}, expected {offset + len(dest)}")
            done += n

    def view(self, file: str, offset: int, length: int) -> memoryview:
        v = self._views.get(file)
        if v is None:
            raise NotFoundError(f"file {file!r} is not in snapshot {self._snapshot_id} (or the handle is closed)")
        check_range(file, len(v), offset, length)
        return v[offset : offset + length]

    def ready(self, file: str, offset: int, length: int) -> bool:
        return True

    def wait_ready(self, file: str, offset: int, length: int, timeout: float | None = None) -> bool:
        return True

    def complete(self) -> bool:
        return True  # a committed snapshot

    def wait_complete(self, timeout: float | None = None) -> bool:
        return True

    def advise(self, file: str, offset: int, length: int) -> None:
        fd = self._fds.get(file, -1)
        addr = self._addrs.get(file)
        if fd < 0 or addr is None or length <= 0:
            return
        if _resident(addr + offset, length):
            return  # warm: one mincore instead of a call per window
        willneed(fd, offset, length)

    def read_sequentially(self) -> None:
        """Mark every mapping for sequential readahead (``MADV_SEQUENTIAL``). Weights are read
        front to back (layer order is file order): sequential readahead streams a cold file
        ahead of the faults, where the default read-around reads one window around each fault
        and waits for it (cold, 1.2 GB touched in order: 0.50-0.67 s against 0.57-1.86 s, same
        run). Only for files that are complete: on a file still being written it would read
        ahead into bytes not written yet, caching zeros."""
        for mm in self._maps.values():
            mm.madvise(mmap.MADV_SEQUENTIAL)

    def prefault(self, file: str, offset: int, length: int) -> None:
        """Read the range into the page cache and map it into this process now (blocking), so
        that views of it are used without faulting one page at a time, each fault a small
        synchronous read when the pages are not cached."""
        mm, fd = self._maps.get(file), self._fds.get(file, -1)
        addr = self._addrs.get(file)
        if mm is None or fd < 0 or addr is None or length <= 0:
            return
        check_range(file, len(mm), offset, length)
        if not _resident(addr + offset, length):
            # One call: it queues the first readahead window now, and the faults below carry
            # the readahead on from there. Queuing every window first (``willneed``) was slower
            # here (133 MiB cold: 70-100 ms against 45 ms).
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        begin = addr + offset
        _populate(begin - begin % PAGE, -(-(begin + length) // PAGE) * PAGE, MADV_POPULATE_READ)

    def descriptors(self) -> Mapping[str, int] | None:
        return dict(self._fds)

    def close(self) -> None:
        self._conn.close()
        self._views = {}  # views handed out keep their mappings alive
        self._maps = {}
        self._addrs = {}
        for path, fd in self._fds.items():
            if fd >= 0:
                os.close(fd)
                self._fds[path] = -1


class FetchedFiles:
    """Whole files read over gRPC into private memory, once each, on first use.

    ``fetch(path, buf)`` fills ``buf`` (sized to the file) with the file's bytes.
    """

    zero_copy = False

    def __init__(self, snapshot_id: str, files: Iterable[FileInfo], fetch: Callable[[str, bytearray], None]) -> None:
        self._snapshot_id = snapshot_id
        self._sizes = {f.path: f.size for f in files}
        self._fetch = fetch
        self._bufs: dict[str, bytearray] = {}
        # One lock per file: stream readers ask for the same file from several threads at once,
        # and it must be fetched once, while other files are fetched in parallel.
        self._locks = {p: threading.Lock() for p in self._sizes}

    def _buf(self, file: str) -> bytearray:
        buf = self._bufs.get(file)
        if buf is not None:
            return buf
        lock = self._locks.get(file)
        if lock is None:
            raise NotFoundError(f"file {file!r} is not in snapshot {self._snapshot_id}")
        with lock:
            buf = self._bufs.get(file)
            if buf is None:
                buf = bytearray(self._sizes[file])
                self._fetch(file, buf)
                self._bufs[file] = buf
        return buf

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        buf = self._buf(file)
        check_range(file, len(buf), offset, len(dest))
        dest[:] = memoryview(buf)[offset : offset + len(dest)]

    def view(self, file: str, offset: int, length: int) -> memoryview:
        buf = self._buf(file)
        check_range(file, len(buf), offset, length)
        return memoryview(buf)[offset : offset + length]

    def ready(self, file: str, offset: int, length: int) -> bool:
        return True  # fetched on demand: reading never waits for bytes still to arrive

    def wait_ready(self, file: str, offset: int, length: int, timeout: float | None = None) -> bool:
        return True

    def complete(self) -> bool:
        return True  # a committed snapshot

    def wait_complete(self, timeout: float | None = None) -> bool:
        return True

    def advise(self, file: str, offset: int, length: int) -> None:
        pass

    def descriptors(self) -> Mapping[str, int] | None:
        return None

    def close(self) -> None:
        # Views handed out keep their buffers alive; dropping ours frees the rest.
        self._bufs = {}
