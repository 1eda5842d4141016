"""An operator's first hour: mistakes a new operator makes, each against a real daemon."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from harness import daemon_argv


def test_a_second_daemon_that_fails_to_start_leaves_the_running_ones_sockets(daemon: Any, tmp_path: Path) -> None:
    before = {p: p.stat().st_ino for p in (daemon.socket_dir / "weightcache.sock", daemon.socket_dir / "fd.sock",
                                           daemon.admin_socket)}  # fmt: skip
    # Another store (so the store lock does not stop it first), the running daemon's sockets.
    argv = daemon_argv(tmp_path / "other-store", daemon.socket_dir, daemon.admin_socket, log_format=None)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "in use by another process" in r.stderr, r.stderr
    assert {p: p.stat().st_ino for p in before} == before  # the same files, not re-created ones
    health = daemon.ctl("health", "--socket-dir", str(daemon.socket_dir), check=False)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
    assert daemon.ctl_json("stats")["cache_dir"] == str(daemon.cache_dir)
