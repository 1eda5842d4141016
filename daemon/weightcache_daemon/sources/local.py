"""file:///dir/ sources: a local or NFS directory."""

from __future__ import annotations

import os
import stat as statmod
from collections.abc import Callable, Sequence
from pathlib import Path

from weightcache.errors import NotFoundError, PermissionDeniedError, SourceError

from .base import ObjectChanged, RemoteObject, check_relpath, parse_uri

CHUNK = 4 << 20


class LocalSource:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        _, _, path = parse_uri(uri)
        self.root = Path(path)

    def _object(self, relpath: str, st: os.stat_result) -> RemoteObject:
        version = f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"
        return RemoteObject(relpath, st.st_size, version, f"file://{self.root / relpath}")

    def list(self) -> list[RemoteObject]:
        if not self.root.is_dir():
            raise NotFoundError(f"source {self.uri}: directory {self.root} does not exist")
        out: list[RemoteObject] = []
        # Symlinks to regular files are followed (Hugging Face cache snapshots are made of
        # them); symlinked directories are not, so a listing cannot loop.
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = Path(dirpath) / fn
                try:
                    st = full.stat()
                except OSError as exc:
                    raise SourceError(f"source {self.uri}: cannot stat {full}: {exc.strerror}") from None
                if not statmod.S_ISREG(st.st_mode):
                    continue
                rel = check_relpath(full.relative_to(self.root).as_posix(), self.uri)
                out.append(self._object(rel, st))
        return out

    def _walk_error(self, exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            raise PermissionDeniedError(f"source {self.uri}: {exc.filename}: permission denied")
        raise SourceError(f"source {self.uri}: {exc}")

    def stat(self, relpath: str) -> RemoteObject:
        try:
            return self._object(relpath, (self.root / relpath).stat())
        except FileNotFoundError:
            raise NotFoundError(f"source {self.uri}: {relpath} disappeared") from None

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        path = self.root / obj.relpath
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectChanged(obj) from None
        except PermissionError:
            raise PermissionDeniedError(f"source {obj.uri}: permission denied") from None
        try:
            if self._object(obj.relpath, os.fstat(fd)).version != obj.version:
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
