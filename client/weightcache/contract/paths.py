"""Where the daemon's sockets and store live by default (see the README, "Set up").

User mode (not root): cache under ``$XDG_CACHE_HOME`` (or ``~/.cache``)``/weightcache``;
sockets under ``$XDG_RUNTIME_DIR`` (or ``/tmp/weightcache-<uid>``, created 0700, and refused
when it exists owned by someone else or open to others) ``/weightcache/``. System mode (root,
or the systemd unit): ``/var/lib/weightcache``, ``/run/weightcache/client/``,
``/run/weightcache/admin.sock``.

These functions take the environment as an argument so that the one place that reads
configuration (the daemon's config loader, or ``connect()``) decides what it sees.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import PermissionDeniedError

__all__ = [
    "ADMIN_SOCKET_NAME",
    "CLIENT_SOCKET_NAME",
    "FD_SOCKET_NAME",
    "SYSTEM_ADMIN_SOCKET",
    "SYSTEM_CACHE_DIR",
    "SYSTEM_SOCKET_DIR",
    "admin_socket",
    "check_dir_not_foreign",
    "client_socket_dir",
    "ensure_private_base",
    "tmp_runtime_base",
    "user_admin_socket",
    "user_cache_dir",
    "user_runtime_dir",
    "user_socket_dir",
]

CLIENT_SOCKET_NAME = "weightcache.sock"
FD_SOCKET_NAME = "fd.sock"
ADMIN_SOCKET_NAME = "admin.sock"

SYSTEM_CACHE_DIR = Path("/var/lib/weightcache")
SYSTEM_SOCKET_DIR = Path("/run/weightcache/client")
SYSTEM_ADMIN_SOCKET = Path("/run/weightcache/admin.sock")


def user_runtime_dir(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_RUNTIME_DIR")
    base = Path(xdg) if xdg else Path(f"/tmp/weightcache-{os.getuid()}")
    return base / "weightcache"


def tmp_runtime_base(env: Mapping[str, str]) -> Path | None:
    """The per-user directory in /tmp used when XDG_RUNTIME_DIR is unset, else None."""
    return None if env.get("XDG_RUNTIME_DIR") else Path(f"/tmp/weightcache-{os.getuid()}")


def ensure_private_base(path: Path) -> None:
    """Create `path` 0700, or accept an existing one only when it is a real directory of
    ours that nobody else can enter: in a shared directory such as /tmp anyone may create
    that name first and wait for our sockets (or plant their own)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionDeniedError(
            f"{path} exists but is not a private directory of uid {os.geteuid()} (owner uid {st.st_uid}, mode "
            f"{oct(st.st_mode & 0o7777)}{', a symlink' if stat.S_ISLNK(st.st_mode) else ''}): someone else may "
            "control it; remove it, or set XDG_RUNTIME_DIR"
        )


def check_dir_not_foreign(path: Path, what: str) -> None:
    """Refuse a directory that another user controls or could replace: the directory (if it
    exists) must belong to us, and every directory above it must belong to us or root and not
    be writable by others unless sticky (like /tmp)."""
    euid = os.geteuid()
    target = Path(os.path.realpath(path))
    here = target
    while True:
        try:
            st = os.stat(here)
        except FileNotFoundError:
            here = here.parent
            continue
        except PermissionError:
            raise PermissionDeniedError(f"{what} {path}: cannot inspect {here} (no permission)") from None
        own = here == target
        if own and st.st_uid != euid:  # (its mode is ours to set, and the daemon sets it)
            raise PermissionDeniedError(
                f"{what} {path}: owned by uid {st.st_uid}, not by the daemon's uid {euid}; another user controls it"
            )
        if not own:
            # group write counts when the group is not root's or the daemon's own
            writable = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid not in (0, os.getegid()))
            open_to_others = writable and not st.st_mode & stat.S_ISVTX
            if st.st_uid not in (0, euid) or open_to_others:
                raise PermissionDeniedError(
                    f"{what} {path}: the directory above it, {here}, is owned by uid {st.st_uid} with mode "
                    f"{oct(st.st_mode & 0o7777)}; another user could replace what is below it"
                )
        if here.parent == here:
            return
        here = here.parent


def user_socket_dir(env: Mapping[str, str]) -> Path:
    return user_runtime_dir(env) / "client"


def user_admin_socket(env: Mapping[str, str]) -> Path:
    return user_runtime_dir(env) / ADMIN_SOCKET_NAME


# The two resolvers every caller of the daemon uses (the client's connect(), cachectl and its
# doctor), so that they all find the same sockets. Results are absolute: gRPC reads
# "unix://rel/x.sock" as a host name ("rel"), not a path, so relative paths are resolved
# against the current directory here, once.


def client_socket_dir(explicit: str | os.PathLike[str] | None, env: Mapping[str, str], euid: int) -> Path:
    """Where to find the daemon's client sockets: ``explicit``, else $WEIGHTCACHE_SOCKET_DIR,
    else the first default that has a client socket (the user's, then the system's), else the
    default for this euid (which may not exist: the caller reports that)."""
    if explicit is not None:
        return Path(explicit).absolute()
    if env.get("WEIGHTCACHE_SOCKET_DIR"):
        return Path(env["WEIGHTCACHE_SOCKET_DIR"]).absolute()
    for candidate in (user_socket_dir(env), SYSTEM_SOCKET_DIR):
        if (candidate / CLIENT_SOCKET_NAME).exists():
            return candidate.absolute()
    return (SYSTEM_SOCKET_DIR if euid == 0 else user_socket_dir(env)).absolute()


def admin_socket(explicit: str | os.PathLike[str] | None, env: Mapping[str, str], euid: int) -> Path:
    """The daemon's admin socket: ``explicit``, else $WEIGHTCACHE_ADMIN_SOCKET, else the system
    (root) or user default."""
    if explicit is not None:
        return Path(explicit).absolute()
    if env.get("WEIGHTCACHE_ADMIN_SOCKET"):
        return Path(env["WEIGHTCACHE_ADMIN_SOCKET"]).absolute()
    return (SYSTEM_ADMIN_SOCKET if euid == 0 else user_admin_socket(env)).absolute()


def user_cache_dir(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", str(Path.home()))) / ".cache"
    return base / "weightcache"
