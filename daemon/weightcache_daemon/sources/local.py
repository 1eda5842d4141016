"""file:///dir/ sources: a local or NFS directory, read without ever following a link.

Every open walks from ``/`` one component at a time, each ``openat``-relative to the
directory before it with ``O_NOFOLLOW`` (``O_DIRECTORY`` for directories), so neither a
symlinked file nor a symlinked directory anywhere on the way (the model directory's own
path included) can lead outside it. Files are opened ``O_NONBLOCK`` and checked with
``fstat`` before a byte is read: a FIFO, a device or a socket is refused at once, so it can
never hang a download thread or keep a buffer of the pool.

The listing refuses (does not skip) a symlink, FIFO, device or socket in the model directory,
naming it: a model that silently misses its ``config.json`` would fail later, and less clearly.
Entries whose name starts with ``.`` are ignored, as before. The one exception, for the admin
only (``links=True``): a Hugging Face cache snapshot, whose files are links into its own
repository's ``blobs/``; ``hfcache.py`` says which links qualify and how they are opened.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

from weightcache.contract.errors import (
    ExhaustedError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    SourceError,
    WeightcacheError,
)
from weightcache_daemon.sources.base import ObjectChanged, RemoteObject, check_range, check_relpath, parse_uri
from weightcache_daemon.sources.hfcache import LINK_ADVICE, blob_name, repo_of

CHUNK = 4 << 20
MAX_ENTRIES = 100_000  # directory entries one listing may visit (a model has tens to thousands)
MAX_DEPTH = 32

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _kind(mode: int) -> str:
    if statmod.S_ISLNK(mode):
        return "a symbolic link"
    if statmod.S_ISFIFO(mode):
        return "a FIFO"
    if statmod.S_ISSOCK(mode):
        return "a socket"
    if statmod.S_ISCHR(mode) or statmod.S_ISBLK(mode):
        return "a device"
    if statmod.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


class LocalSource:
    def __init__(self, uri: str, links: bool = False) -> None:
        """links: follow the links of a Hugging Face cache snapshot into its own blobs (admin
        requests); a client's request follows none."""
        self.uri = uri
        _, _, path = parse_uri(uri)
        self.root = PurePosixPath(path)
        self.links = links
        self.repo = repo_of(self.root) if links else None

    def _link_error(self, relpath: str) -> InvalidInputError:
        if self.repo is not None:
            why = (f"it does not lead to this repository's blobs/ by its own text (../ up to {self.repo.name}/, "
                   "then blobs/NAME), so it is not followed")  # fmt: skip
        elif self.links:
            why = ("links are followed only inside a Hugging Face cache snapshot (…/hub/models--ORG--NAME/snapshots/"
                   "REV/), into that repository's own blobs/")  # fmt: skip
        elif repo_of(self.root) is not None:
            why = ("a client's request never follows links; this is a Hugging Face cache snapshot, which an admin "
                   f"may prefetch: cachectl prefetch {self.uri}")  # fmt: skip
        else:
            why = "a client's request never follows links"
        return InvalidInputError(f"source {self.uri}: {relpath} is a symbolic link; {why}; {LINK_ADVICE}")

    def _open_linked(self, relpath: str, parent: int) -> int:
        """The blob a snapshot's link leads to (hfcache.py), opened without following anything."""
        try:
            target = os.readlink(relpath.rsplit("/", 1)[-1], dir_fd=parent)
        except OSError as exc:
            raise self._error(exc, relpath) from None
        name = blob_name(target, relpath.count("/")) if self.repo is not None else None
        if name is None or self.repo is None:
            raise self._link_error(relpath)
        blobs = self._walk_dirs([*self.repo.parts[1:], "blobs"], None, "/")
        try:
            return os.open(name, _FILE, dir_fd=blobs)
        except OSError as exc:
            raise self._error(exc, f"{relpath} -> {target}") from None
        finally:
            os.close(blobs)

    # ---------------------------------------------------------------- opening, link-free

    def _error(self, exc: OSError, what: str) -> WeightcacheError:
        if exc.errno == errno.ELOOP or exc.errno == errno.ENOTDIR:
            return InvalidInputError(
                f"source {self.uri}: {what} is a symbolic link or not a directory; sources never follow links "
                f"(give the real path, with real files in it): {LINK_ADVICE}"
            )
        if exc.errno == errno.ENOENT:
            return NotFoundError(f"source {self.uri}: {what} does not exist")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return PermissionDeniedError(f"source {self.uri}: {what}: permission denied")
        return SourceError(f"source {self.uri}: {what}: {exc.strerror or exc}")

    def _walk_dirs(self, parts: Sequence[str], start: int | None, shown: str) -> int:
        """An O_PATH descriptor of directory start/parts[0]/parts[1]/..., no link followed."""
        fd = os.open("/", _DIR) if start is None else os.dup(start)
        path = "/" if start is None else shown
        try:
            for part in parts:
                path = f"{path.rstrip('/')}/{part}"
                try:
                    nfd = os.open(part, _DIR, dir_fd=fd)
                except OSError as exc:
                    raise self._error(exc, path) from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _root(self) -> int:
        return self._walk_dirs(self.root.parts[1:], None, "/")

    def _open(self, relpath: str) -> tuple[int, os.stat_result]:
        """A read-only descriptor of a regular file under the root, and its fstat."""
        check_relpath(relpath, self.uri)
        *dirs, leaf = relpath.split("/")
        root = self._root()
        try:
            parent = self._walk_dirs(dirs, root, str(self.root))
        finally:
            os.close(root)
        try:
            try:
                fd = os.open(leaf, _FILE, dir_fd=parent)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise self._error(exc, relpath) from None
                if not self.links:
                    raise self._link_error(relpath) from None
                fd = self._open_linked(relpath, parent)
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            if not statmod.S_ISREG(st.st_mode):
                raise InvalidInputError(
                    f"source {self.uri}: {relpath} is {_kind(st.st_mode)}; only regular files are read"
                )
            return fd, st
        except BaseException:
            os.close(fd)
            raise

    # ---------------------------------------------------------------- Source

    def _object(self, relpath: str, st: os.stat_result) -> RemoteObject:
        version = f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"
        return RemoteObject(relpath, st.st_size, version, f"file://{self.root / relpath}")

    def list(self) -> list[RemoteObject]:
        root = self._root()
        out: list[RemoteObject] = []
        seen = 0
        # (descriptor, relative path of the directory); each descriptor is closed once read
        stack: list[tuple[int, str]] = [(root, "")]
        try:
            while stack:
                dfd, rel = stack.pop()
                try:
                    try:
                        rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
                    except OSError as exc:
                        raise self._error(exc, rel or str(self.root)) from None
                    try:
                        names = sorted(os.listdir(rfd))
                    finally:
                        os.close(rfd)
                    for name in names:
                        if name.startswith("."):
                            continue
                        seen += 1
                        if seen > MAX_ENTRIES:
                            raise ExhaustedError(
                                f"source {self.uri}: more than {MAX_ENTRIES} directory entries; not a model directory"
                            )
                        child = f"{rel}/{name}" if rel else name
                        try:
                            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        except OSError as exc:
                            raise self._error(exc, child) from None
                        if statmod.S_ISDIR(st.st_mode):
                            if child.count("/") + 1 >= MAX_DEPTH:
                                raise InvalidInputError(f"source {self.uri}: {child} is nested deeper than {MAX_DEPTH}")
                            stack.append((self._walk_dirs([name], dfd, child), child))
                        elif statmod.S_ISREG(st.st_mode):
                            out.append(self._object(check_relpath(child, self.uri), st))
                        elif statmod.S_ISLNK(st.st_mode) and self.links:
                            fd = self._open_linked(check_relpath(child, self.uri), dfd)
                            try:
                                st = os.fstat(fd)
                            finally:
                                os.close(fd)
                            if not statmod.S_ISREG(st.st_mode):
                                raise InvalidInputError(
                                    f"source {self.uri}: {child} leads to {_kind(st.st_mode)}; only regular files "
                                    "are read"
                                )
                            out.append(self._object(child, st))
                        elif statmod.S_ISLNK(st.st_mode):
                            raise self._link_error(child)
                        else:
                            raise InvalidInputError(
                                f"source {self.uri}: {child} is {_kind(st.st_mode)}; a model directory may hold only "
                                "regular files and directories (links are never followed)"
                            )
                finally:
                    os.close(dfd)
        finally:
            for dfd, _ in stack:
                os.close(dfd)
        out.sort(key=lambda o: o.relpath)
        return out

    def stat(self, relpath: str) -> RemoteObject:
        try:
            fd, st = self._open(relpath)
        except NotFoundError:
            raise NotFoundError(f"source {self.uri}: {relpath} disappeared") from None
        os.close(fd)
        return self._object(relpath, st)

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        check_relpath(obj.relpath, self.uri)
        check_range(obj, offset, len(buf))
        try:
            fd, st = self._open(obj.relpath)
        except NotFoundError:
            raise ObjectChanged(obj) from None
        try:
            if self._object(obj.relpath, st).version != obj.version:
                raise ObjectChanged(obj)
            done = 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done : done + CHUNK]], offset + done)
                if n <= 0:
                    raise ObjectChanged(obj)  # shrank under us
                done += n
                on_bytes(n)
            if self._object(obj.relpath, os.fstat(fd)).version != obj.version:
                raise ObjectChanged(obj)
        finally:
            os.close(fd)

    def expected_sha256(self, objects: Sequence[RemoteObject]) -> dict[str, str]:
        return {}  # a directory vouches for nothing: the bytes read are the bytes hashed

    def close(self) -> None:
        pass
