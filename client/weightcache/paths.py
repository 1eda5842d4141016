"""Where the daemon's sockets and store live by default (see the README, "Set up").

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
    "env_or_default_admin_socket",
    "env_or_default_socket_dir",
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


def env_or_default_socket_dir(env: Mapping[str, str], euid: int) -> Path:
    """$WEIGHTCACHE_SOCKET_DIR, else the system (root) or user default."""
    if env.get("WEIGHTCACHE_SOCKET_DIR"):
        return Path(env["WEIGHTCACHE_SOCKET_DIR"])
    return SYSTEM_SOCKET_DIR if euid == 0 else user_socket_dir(env)


def env_or_default_admin_socket(env: Mapping[str, str], euid: int) -> Path:
    """$WEIGHTCACHE_ADMIN_SOCKET, else the system (root) or user default."""
    if env.get("WEIGHTCACHE_ADMIN_SOCKET"):
        return Path(env["WEIGHTCACHE_ADMIN_SOCKET"])
    return SYSTEM_ADMIN_SOCKET if euid == 0 else user_admin_socket(env)


def user_cache_dir(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", str(Path.home()))) / ".cache"
    return base / "weightcache"
