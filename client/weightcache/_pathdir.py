"""A directory that path-based loaders can open, backed by the descriptors the daemon granted.

A container mounts only the client socket directory, so the store's snapshot view
(``snapshots/<model>/<snapshot>/``) does not exist there. What the container does have are
the read-only descriptors ``fd.sock`` passed for every file of the snapshot. This module
builds a private directory (mode 0700, under ``tempfile.gettempdir()``, named after the pid
and the snapshot) whose entries are symlinks to ``/proc/<opener pid>/fd/<n>``:

- Opening such a magic link reopens the very inode behind the descriptor (the kernel does not
  look the store's path up again), so it works in a mount namespace where the store is hidden,
  reads the same page-cache pages as every other process on the node, and copies nothing.
- It works for any process of the same uid that can see the opener in ``/proc`` — the
  inference server's spawned workers included — for as long as the opener holds the
  descriptors, i.e. until ``Model.close()`` or the opener's exit.
- When the opener closes the handle or exits, the links dangle: a new ``open()`` fails with
  ENOENT (``FileNotFoundError``). Files another process already opened or mapped keep working.

Lifecycle: built on the first ``Model.path`` access, removed by ``Model.close()`` (and at
interpreter exit). A process killed with SIGKILL leaves its few dangling links behind in the
temp directory; they hold nothing.
"""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping

from .contract.errors import InternalError, InvalidInputError

__all__ = ["DescriptorDirectory"]

# The first weakref.finalize of a process registers weakref's exit hook, and exit hooks run
# last-registered first. multiprocessing registers its own hook (join every non-daemonic child)
# when multiprocessing.util is first imported. Were our finalizer the process's first, created
# before the application imports multiprocessing, weakref's hook would run *after* that join:
# an engine that stops its child processes from a finalizer (vLLM does) would wait forever for
# children nobody told to stop. Importing multiprocessing.util first keeps Python's usual order.
_ = multiprocessing.util


def _remove(path: str, owner_pid: int) -> None:
    # A forked child inherits the handle (and this finalizer) but not the directory: the links
    # name the parent's pid, and only the parent removes them.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


class DescriptorDirectory:
    """``path``: a directory of ``/proc/<pid>/fd/<n>`` links, one per file of a snapshot."""

    def __init__(self, snapshot_id: str, fds: Mapping[str, int], base: str | None = None) -> None:
        pid = os.getpid()
        self.path = tempfile.mkdtemp(prefix=f"weightcache-{pid}-{snapshot_id[:16]}-", dir=base)  # 0700
        # A finalizer rather than __del__: it also runs at interpreter exit, and never twice.
        self._finalizer = weakref.finalize(self, _remove, self.path, pid)
        try:
            for relpath, fd in fds.items():
                link = os.path.join(self.path, relpath)
                # The daemon refuses absolute and '..' paths; checked again here because this
                # directory is ours to keep clean.
                if os.path.isabs(relpath) or ".." in relpath.split("/"):
                    raise InvalidInputError(f"file path {relpath!r} of snapshot {snapshot_id} escapes its directory")
                os.makedirs(os.path.dirname(link), mode=0o700, exist_ok=True)
                os.symlink(f"/proc/{pid}/fd/{fd}", link)
            self._check_proc(pid, fds)
        except BaseException:
            self.close()
            raise

    def _check_proc(self, pid: int, fds: Mapping[str, int]) -> None:
        """/proc must show this process under its own pid (it does not when /proc belongs to
        another pid namespace); otherwise every link would point at the wrong process."""
        if not fds:
            return
        relpath, fd = next(iter(fds.items()))  # one file proves the mapping; the rest share the same /proc
        try:
            seen = os.stat(os.path.join(self.path, relpath))
        except OSError as exc:
            raise InternalError(
                f"/proc/{pid}/fd/{fd} ({relpath}) cannot be opened: {exc.strerror}; the descriptor-backed "
                "directory needs /proc mounted for this process's pid namespace"
            ) from None
        mine = os.fstat(fd)
        if (seen.st_dev, seen.st_ino) != (mine.st_dev, mine.st_ino):
            raise InternalError(
                f"/proc/{pid}/fd/{fd} is not this process's descriptor for {relpath}: /proc belongs to "
                "another pid namespace; mount /proc for this one"
            )

    def close(self) -> None:
        """Remove the directory (the descriptors themselves belong to the model handle)."""
        self._finalizer()
