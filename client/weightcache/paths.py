"""Where the daemon's sockets and store live by default (DESIGN "Interfaces").

User mode (not root): cache under ``$XDG_CACHE_HOME`` (or ``~/.cache``)``/weightcache``;
sockets under ``$XDG_RUNTIME_DIR`` (or ``/tmp/weightcache-<uid>``, created 0700)
``/weightcache/``. System mode (root, or the systemd unit): ``/var/lib/weightcache``,
``/run/weightcache/client/``, ``/run/weightcache/admin.sock``.

These functions take the environment as an argument so that the one place that reads
configuration (the daemon's config loader, or ``connect()``) decides what it sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "ADMIN_SOCKET_NAME",
    "CLIENT_SOCKET_NAME",
    "FD_SOCKET_NAME",
    "SYSTEM_ADMIN_SOCKET",
    "SYSTEM_CACHE_DIR",
    "SYSTEM_SOCKET_DIR",
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


def user_socket_dir(env: Mapping[str, str]) -> Path:
    return user_runtime_dir(env) / "client"


def user_admin_socket(env: Mapping[str, str]) -> Path:
    return user_runtime_dir(env) / ADMIN_SOCKET_NAME


def user_cache_dir(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", str(Path.home()))) / ".cache"
    return base / "weightcache"
