"""cachectl without a daemon: clear errors, and doctor still runs its own checks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def _ctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WEIGHTCACHE_ADMIN_SOCKET=str(tmp_path / "admin.sock"),
               WEIGHTCACHE_SOCKET_DIR=str(tmp_path / "sock"))  # fmt: skip
    return subprocess.run(["cachectl", *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_doctor_with_the_daemon_down_runs_every_local_check(tmp_path: Path) -> None:
    r = _ctl(tmp_path, "doctor", "--json")
    assert r.returncode == 1, r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    # the client-side checks ran and say what is wrong, and the admin API is one more FAIL
    assert checks["client health service"]["status"] == "FAIL"
    assert checks["descriptor socket"]["status"] == "FAIL" and "No such file" in checks["descriptor socket"]["detail"]
    admin = checks["admin API"]
    assert admin["status"] == "FAIL" and str(tmp_path / "admin.sock") in admin["detail"]
    assert "start weightcached" in admin["hint"]


def test_commands_with_the_daemon_down_name_the_socket(tmp_path: Path) -> None:
    r = _ctl(tmp_path, "ls")
    assert r.returncode == 1
    assert str(tmp_path / "admin.sock") in r.stderr and "is weightcached running?" in r.stderr


def test_relative_paths_work_for_the_daemon_and_cachectl(tmp_path: Path) -> None:
    from harness import accepting, daemon_argv, wait_for

    argv = daemon_argv(Path("store"), Path("sock"), Path("admin/admin.sock"), log_format=None)
    with open(tmp_path / "daemon.log", "wb") as log:
        p = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: accepting(tmp_path / "sock" / "fd.sock") or p.poll() is not None, 120, "the daemon")
        assert p.poll() is None, (tmp_path / "daemon.log").read_text()
        r = subprocess.run(["cachectl", "--admin-socket", "admin/admin.sock", "stats", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cache_dir"] == str(tmp_path / "store")
    finally:
        p.terminate()
        p.wait(timeout=60)
