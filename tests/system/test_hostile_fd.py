"""Hostile clients of fd.sock, leases and the daemon's places, against a real daemon.

The daemon runs as root with its client sockets in a group; the attacker is a real second uid
in that group (it can reach fd.sock and weightcache.sock, nothing else). Every case checks that
the attacker gets a clear error, that a legitimate client is served meanwhile, that the
daemon's descriptors and memory come back, and that the store did not change.

A root daemon is exempt from the kernel's limit on descriptors in flight (ETOOMANYREFS hits
only a sender without CAP_SYS_RESOURCE and CAP_SYS_ADMIN), so the test of that bound runs its
daemon with both dropped from its bounding set (setpriv).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Daemon, make_model, start_daemon, wait_for, write_config
from tests_helpers import as_uid_argv, dir_for_others, write_u8_model

from weightcache import paths
from weightcache._fd import FdConnection
from weightcache.contract.fdproto import MAX_REQUEST_FRAME, pack, recv_frame
from weightcache.errors import InvalidInputError, PermissionDeniedError
from weightcache.v1 import weightcache_pb2 as pb

GID = 4243
ATTACKER = 54331
OTHER = 54332

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a second uid, groups, prlimit")


# ---------------------------------------------------------------- helpers


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


ATTACK_PRELUDE = textwrap.dedent("""
    import json, os, socket, struct, sys, time
    import grpc, weightcache
    import grpc._channel, grpc._utilities
    import weightcache_daemon.server  # imported while still root (it lives under root's home)
    from weightcache.contract.fdproto import pack, recv_frame
    from weightcache.v1 import weightcache_pb2 as pb
    def acquire(sid):
        return pack(pb.FdRequest(acquire=pb.AcquireRequest(snapshot_id=sid)).SerializeToString())
    def connect(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(path)
        return s
    def error_of(s):
        # every frame until the daemon's error (descriptors that came first are closed)
        while True:
            try:
                payload, fds = recv_frame(s)
            except ConnectionError as e:
                return "closed", str(e)
            for fd in fds:
                os.close(fd)
            r = pb.FdResponse()
            r.ParseFromString(payload)
            if r.WhichOneof("response") == "error":
                return r.error.code, r.error.message
""")


def _as(uid: int, groups: list[int], code: str, background: bool = False) -> Any:
    """Run `code` as a real other uid, with ATTACK_PRELUDE's imports and helpers."""
    argv = as_uid_argv(uid, groups, code, preload=ATTACK_PRELUDE)
    if background:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/tmp")  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd="/tmp")


def _store_state(d: Daemon) -> tuple[list[Any], list[str]]:
    blobs = sorted(p.name for p in (d.cache_dir / "blobs" / "sha256").rglob("*") if p.is_file())
    return sorted((m["name"], m["snapshot_id"]) for m in d.ctl_json("ls")), blobs


def _legit_acquire(d: Daemon, sid: str) -> float:
    """A legitimate client (root, another uid than the attacker): acquire and check; seconds."""
    t = time.monotonic()
    with FdConnection(d.socket_dir / "fd.sock") as c:
        granted = c.acquire(sid)
        try:
            assert granted and all(os.fstat(g.fd).st_size == g.size for g in granted)
        finally:
            for g in granted:
                os.close(g.fd)
    return time.monotonic() - t


def _start(tmp_path: Path, s3: Any, **cfg: Any) -> tuple[Daemon, Path]:
    base = dir_for_others("wc-fd-")
    cfg.setdefault("client_sources", ["s3://allowed-only/*"])
    conf = write_config(tmp_path / "w.toml", s3, socket_group=str(GID), socket_dir_mode="0750",
                        socket_mode="0660", **cfg)  # fmt: skip
    return start_daemon(base, s3, config=conf), base


@pytest.fixture
def fd_daemon(s3: Any, tmp_path: Path, tiny_model: Path) -> Any:
    d, base = _start(tmp_path, s3, max_clients_per_uid=8, fd_frame_timeout=2, fd_idle_timeout=3)
    d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _snapshot(d: Daemon, name: str) -> str:
    return str(d.ctl_json("show", name)["manifest"]["snapshot_id"])


def _baseline(d: Daemon, sid: str) -> tuple[int, int]:
    for _ in range(3):  # warm: gRPC, the index, the fd server's first grant
        _legit_acquire(d, sid)
    return _fds(d.proc.pid), _rss_kib(d.proc.pid)


def _comes_back(d: Daemon, fds0: int, rss0: int) -> tuple[int, int]:
    wait_for(lambda: _fds(d.proc.pid) <= fds0 + 2, 60, f"daemon descriptors back to {fds0}")
    rss = _rss_kib(d.proc.pid)
    # nothing a client sends is buffered beyond MAX_REQUEST_FRAME: allocator noise only
    assert rss - rss0 < 32 * 1024, (rss0, rss)
    return _fds(d.proc.pid), rss


# ---------------------------------------------------------------- fd.sock bounds


def test_frames_timeouts_and_connection_caps(fd_daemon: Daemon, report: Any) -> None:
    d = fd_daemon
    sid = _snapshot(d, "tiny")
    state0 = _store_state(d)
    fds0, rss0 = _baseline(d, sid)
    fd_sock = str(d.socket_dir / "fd.sock")
    attack = f"""
        out = {{}}
        path, sid = {fd_sock!r}, {sid!r}
        # 1. a frame header announcing 16 MiB, then the bytes, 30 times
        t = time.monotonic()
        for i in range(30):
            s = connect(path)
            s.sendall(struct.pack(">I", 16 << 20))
            try:
                s.sendall(b"x" * (1 << 20))
            except OSError:
                pass
            out["big"] = error_of(s)
            s.close()
        # 2. half a frame, then silence
        s = connect(path); s.sendall(b"\\0\\0"); t = time.monotonic()
        out["partial"] = error_of(s) + (round(time.monotonic() - t, 2),); s.close()
        # 3. connect and say nothing
        s = connect(path); t = time.monotonic()
        out["idle"] = error_of(s) + (round(time.monotonic() - t, 2),); s.close()
        # 4. not a request at all
        s = connect(path); s.sendall(pack(b"\\xff\\xff\\xff")); out["garbage"] = error_of(s); s.close()
        # 5. as many connections as allowed, each holding a lease; then one more
        held = []
        for i in range(8):
            s = connect(path); s.sendall(acquire(sid))
            payload, fds = recv_frame(s)
            for fd in fds: os.close(fd)
            held.append(s)
        extra = connect(path)
        out["ninth"] = error_of(extra)
        print(json.dumps(out), flush=True)
        sys.stdin.readline()  # hold them while the legitimate client works
    """
    p = _as(ATTACKER, [GID], attack, background=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, p.stderr.read() if p.stderr else ""
    out = json.loads(line)
    # the legitimate client (root) is served while the attacker holds its maximum
    latency = max(_legit_acquire(d, sid) for _ in range(5))
    p.kill()
    p.wait()
    code, msg = out["big"]
    assert code == "INVALID_ARGUMENT" and f"exceeds the limit of {MAX_REQUEST_FRAME}" in msg, out["big"]
    code, msg, waited = out["partial"]
    assert code == "DEADLINE_EXCEEDED" and "not completed within 2 s" in msg and waited >= 1.5, out["partial"]
    code, msg, waited = out["idle"]
    assert code == "DEADLINE_EXCEEDED" and "no request for 3 s" in msg and waited >= 2.5, out["idle"]
    assert out["garbage"][0] == "INVALID_ARGUMENT" and "not an FdRequest" in out["garbage"][1], out["garbage"]
    code, msg = out["ninth"]
    assert code == "RESOURCE_EXHAUSTED" and f"uid {ATTACKER} already has 8 connections" in msg, out["ninth"]
    fds1, rss1 = _comes_back(d, fds0, rss0)
    wait_for(lambda: int(d.ctl_json("stats")["leases"]) == 0, 60, "the attacker's leases released")
    assert _store_state(d) == state0 and d.ctl("verify").returncode == 0
    log = d.log_text()
    assert "fd_client_refused" in log and "Traceback" not in log
    report(
        "hostile requests",
        "fd.sock, a second uid: 30 frames announcing 16 MiB, half a frame, an idle connection, garbage, "
        "8 lease-holding connections + 1",
        "INVALID_ARGUMENT (frame > 4 KiB), DEADLINE_EXCEEDED (2 s frame, 3 s idle), RESOURCE_EXHAUSTED "
        "(per-uid cap) to the attacker only; another uid served meanwhile; store unchanged",
        f"legit Acquire ≤ {latency * 1000:.0f} ms; daemon fds {fds0}→{fds1}, RSS {rss0 // 1024}→{rss1 // 1024} MiB",
    )


def test_unread_descriptors_cost_only_the_client_that_does_not_read(fd_daemon: Daemon, report: Any) -> None:
    d = fd_daemon
    sid = _snapshot(d, "tiny")
    state0 = _store_state(d)
    fds0, rss0 = _baseline(d, sid)
    attack = f"""
        out = []
        socks = []
        for i in range(6):  # pipelined Acquires, never read, on six connections
            s = connect({str(d.socket_dir / "fd.sock")!r})
            s.sendall(acquire({sid!r}) * 200)
            socks.append(s)
        print("sent", flush=True)
        sys.stdin.readline()
        # refused, the six still count against this uid while their descriptors are unread:
        # two more connections fit under the cap of 8, a third does not
        more = [connect({str(d.socket_dir / "fd.sock")!r}) for i in range(3)]
        capped = error_of(more[2])
        for s in socks:
            out.append(error_of(s))
        print(json.dumps({{"refused": out, "capped": capped}}), flush=True)
    """
    p = _as(ATTACKER, [GID], attack, background=True)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "sent", p.stderr.read() if p.stderr else ""
    refused = lambda: d.log_text().count('"request while descriptors unread"') >= 6  # noqa: E731
    wait_for(refused, 60, "six connections refused")
    latency = max(_legit_acquire(d, sid) for _ in range(5))
    p.stdin.write("\n")
    p.stdin.flush()
    res = json.loads(p.stdout.readline())
    p.wait(timeout=60)
    for code, msg in res["refused"]:
        assert code == "INVALID_ARGUMENT" and "read each response before sending the next request" in msg, res
    assert res["capped"][0] == "RESOURCE_EXHAUSTED" and "already has 8 connections" in res["capped"][1], res
    fds1, _ = _comes_back(d, fds0, rss0)
    assert _store_state(d) == state0
    report(
        "hostile requests",
        "fd.sock, a second uid: 6 connections, 200 pipelined Acquires, responses never read",
        "each connection gets one response, then INVALID_ARGUMENT; it keeps counting against the uid's "
        "connection cap until its descriptors are read; another uid served meanwhile",
        f"legit Acquire ≤ {latency * 1000:.0f} ms; daemon fds {fds0}→{fds1}",
    )


def test_accept_survives_emfile_and_health_tells_the_truth(s3: Any, tmp_path: Path, tiny_model: Path,
                                                           report: Any) -> None:  # fmt: skip
    from test_service import _free_port, _scrape

    port = _free_port()
    d, base = _start(tmp_path, s3, metrics_address=f"127.0.0.1:{port}")
    try:
        d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
        sid = _snapshot(d, "tiny")
        _baseline(d, sid)
        channel = grpc.insecure_channel(f"unix://{d.socket_dir / 'weightcache.sock'}")
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service="weightcache.v1.Cache"), timeout=10).status  # type: ignore[no-any-return]

        assert status() == health_pb2.HealthCheckResponse.SERVING  # the channel is connected from here on
        pid = d.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_fds(pid) + 2, hard))
        waiting: list[socket.socket] = []
        try:
            for _ in range(6):  # more than the descriptors left: accept() fails with EMFILE
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket_dir / "fd.sock"))
                waiting.append(s)
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 60, "NOT_SERVING while EMFILE")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING again")
        for s in waiting:  # the clients that waited in the backlog are served
            s.settimeout(30)
            s.sendall(pack(pb.FdRequest(acquire=pb.AcquireRequest(snapshot_id=sid)).SerializeToString()))
            payload, fds = recv_frame(s)
            for fd in fds:
                os.close(fd)
            assert pb.FdResponse.FromString(payload).WhichOneof("response") == "acquire"
            s.close()
        _legit_acquire(d, sid)
        errors = _scrape(port).get('weightcache_fd_accept_errors_total{errno="EMFILE"}', 0)
        assert errors >= 1 and "fd_accept_failed" in d.log_text() and d.proc.poll() is None
        channel.close()
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    report(
        "hostile requests",
        "the daemon's open-file limit lowered under 6 waiting fd.sock clients (EMFILE in accept)",
        "accept loop backs off and survives; gRPC health NOT_SERVING while it fails, SERVING after; "
        "the waiting clients are then served",
        f"weightcache_fd_accept_errors_total = {errors:.0f}",
    )


def test_model_with_more_files_than_the_open_file_limit(s3: Any, tmp_path: Path, tiny_model: Path,
                                                         report: Any) -> None:  # fmt: skip
    many = make_model(tmp_path / "many", shards=1)
    for i in range(600):
        (many / f"extra-{i:04d}.json").write_text(json.dumps({"i": i}))
    n_files = sum(1 for _ in many.iterdir())
    assert n_files > 600
    d, base = _start(tmp_path, s3, fd_frame_timeout=30)
    try:
        d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
        d.ctl("prefetch", f"file://{many}/", "--name", "many")
        tiny, big = _snapshot(d, "tiny"), _snapshot(d, "many")
        fds0, _ = _baseline(d, tiny)
        pid = d.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        limit = fds0 + 150  # far fewer than the model's files
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        failures: list[BaseException] = []
        served = [0]

        def others() -> None:
            try:
                for _ in range(15):
                    _legit_acquire(d, tiny)
                    served[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=others) for _ in range(3)]
        try:
            for t in threads:
                t.start()
            with FdConnection(d.socket_dir / "fd.sock", timeout=120) as c:
                granted = c.acquire(big)
                try:
                    files = {g.path: g for g in granted}
                    assert len(granted) == n_files, (len(granted), n_files)
                    assert os.pread(files["extra-0599.json"].fd, 100, 0) == b'{"i": 599}'
                    assert max(_fds(pid) for _ in range(3)) < limit
                finally:
                    for g in granted:
                        os.close(g.fd)
            for t in threads:
                t.join(timeout=300)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        noted = [ln for ln in d.log_text().splitlines() if '"warning"' in ln or '"error"' in ln]
        assert not failures and served[0] == 45, (failures, noted[-10:])
        wait_for(lambda: _fds(pid) <= fds0 + 2, 60, "daemon descriptors back")
        assert "Traceback" not in d.log_text()
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    report(
        "load",
        f"a {n_files}-file model acquired while the daemon's open-file limit leaves ~150 descriptors; "
        "3 other clients acquire meanwhile",
        "granted in batches (each opened, sent, closed); every concurrent Acquire served",
        f"open-file limit {limit}; 45/45 concurrent Acquires",
    )


# ---------------------------------------------------------------- leases and disk


def test_leases_cannot_hold_the_disk_hostage(s3: Any, tmp_path: Path, report: Any) -> None:
    size = 2 << 20
    models = {n: write_u8_model(tmp_path / "m" / n, size, i) for i, n in enumerate("abcde")}
    model_bytes = sum(p.stat().st_size for p in models["a"].iterdir())
    capacity = int(model_bytes * 3.5)
    d, base = _start(tmp_path, s3, max_size=capacity, lease_quota=int(model_bytes * 1.5))
    try:
        for n in "abc":
            d.ctl("prefetch", f"file://{models[n]}/", "--name", n)
        sids = {n: _snapshot(d, n) for n in "abc"}
        attack = f"""
            s = connect({str(d.socket_dir / "fd.sock")!r})
            out = {{}}
            for name, sid in {sids!r}.items():
                s.sendall(acquire(sid))
                payload, fds = recv_frame(s)
                r = pb.FdResponse.FromString(payload)
                while r.WhichOneof("response") == "acquire" and len(fds) < len(r.acquire.files):
                    more, more_fds = recv_frame(s); fds += more_fds
                out[name] = r.error.code + ": " + r.error.message if r.WhichOneof("response") == "error" else "leased"
            print(json.dumps(out), flush=True)
            sys.stdin.readline()
        """
        p = _as(ATTACKER, [GID], attack, background=True)
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert line, p.stderr.read() if p.stderr else ""
        out = json.loads(line)
        assert out["a"] == "leased" and out["b"].startswith("RESOURCE_EXHAUSTED") and "lease quota" in out["b"], out
        assert out["c"].startswith("RESOURCE_EXHAUSTED"), out
        _legit_acquire(d, sids["b"])  # another uid has its own quota
        # the admin's prefetches need room: everything the attacker could not lease is evictable
        d.ctl("prefetch", f"file://{models['d']}/", "--name", "d")
        d.ctl("prefetch", f"file://{models['e']}/", "--name", "e")
        names = sorted(m["name"] for m in d.ctl_json("ls"))
        assert "a" in names and "d" in names and "e" in names, names
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=60)
        wait_for(lambda: int(d.ctl_json("stats")["leases"]) == 0, 60, "leases released")
        st = d.ctl_json("stats")
        assert int(st["stored_bytes"]) <= capacity and int(st["held_bytes"]) == 0
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    report(
        "hostile requests",
        "a second uid leases every snapshot it can and holds them; an admin then prefetches two models "
        "into a full cache",
        "past its lease quota the attacker gets RESOURCE_EXHAUSTED; the admin's prefetches evict the rest",
        f"capacity {capacity >> 20} MiB, lease quota {int(model_bytes * 1.5) >> 20} MiB per uid",
    )


CHURN = textwrap.dedent("""
    import random, sys, time, weightcache
    from weightcache.errors import WeightcacheError
    names, rounds, ok, failed = sys.argv[2].split(","), int(sys.argv[3]), 0, 0
    with weightcache.connect(sys.argv[1]) as c:
        for i in range(rounds):
            try:
                with c.open(random.choice(names)) as m:
                    m.keys()
                ok += 1
            except WeightcacheError:
                failed += 1  # evicted meanwhile, or not cached yet: a clear error is fine
    print(ok, failed)
""")


def test_downloads_and_lease_churn_under_a_small_capacity(s3: Any, tmp_path: Path, report: Any) -> None:
    size = 1 << 20
    names = [f"m{i}" for i in range(10)]
    models = {n: write_u8_model(tmp_path / "m" / n, size, 100 + i) for i, n in enumerate(names)}
    model_bytes = sum(p.stat().st_size for p in models["m0"].iterdir())
    capacity = int(model_bytes * 4.5)
    d, base = _start(tmp_path, s3, max_size=capacity, lease_quota="100%")
    try:
        d.ctl("prefetch", f"file://{models['m0']}/", "--name", "m0")
        env = d.env
        churn = [
            subprocess.Popen(
                [sys.executable, "-c", CHURN, str(d.socket_dir), ",".join(names), "60"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(3)
        ]
        pre = [
            subprocess.Popen(
                ["cachectl", "prefetch", f"file://{models[n]}/", "--name", n],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for n in names[1:]
        ]
        results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in pre]
        opened = [p.communicate(timeout=300) for p in churn]
        for rc, err in results:
            # success, or a clear refusal while clients held what was left
            assert rc == 0 or "ExhaustedError" in err, (
                err,
                d.log_text()[-4000:],
            )
        assert all(p.returncode == 0 for p in churn), opened
        assert sum(rc == 0 for rc, _ in results) >= 1
        wait_for(lambda: int(d.ctl_json("stats")["leases"]) == 0, 60, "leases released")
        st = d.ctl_json("stats")
        on_disk = sum(p.stat().st_size for p in (d.cache_dir / "blobs" / "sha256").rglob("*") if p.is_file())
        assert int(st["held_bytes"]) == 0 and int(st["stored_bytes"]) == on_disk <= capacity, (st, on_disk)
        assert int(st["active_downloads"]) == 0 and d.ctl("verify").returncode == 0
        log = d.log_text()
        assert "Traceback" not in log and "fetch_crashed" not in log, log[-3000:]
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    ok = sum(int(o.split()[0]) for o, _ in opened)
    report(
        "load",
        "9 concurrent prefetches into a 4.5-model cache while 3 client processes open and close models",
        "no daemon exception; held bytes back to 0; stored bytes = bytes on disk ≤ capacity",
        f"{sum(rc == 0 for rc, _ in results)}/9 prefetches admitted; {ok}/180 opens served",
    )


# ---------------------------------------------------------------- modes and places


def test_store_is_private_whatever_the_umask(s3: Any, tmp_path: Path) -> None:
    old = os.umask(0o002)  # the daemon inherits a permissive umask
    try:
        daemon = start_daemon(tmp_path / "d", s3)
    finally:
        os.umask(old)
    daemon.stop()
    assert os.stat(daemon.cache_dir).st_mode & 0o777 == 0o700
    for name in ("index.db", "lock"):
        assert os.stat(daemon.cache_dir / name).st_mode & 0o777 == 0o600, name


def test_config_refuses_unsafe_places(tmp_path: Path) -> None:
    from weightcache_daemon import config

    sock = tmp_path / "client"
    with pytest.raises(InvalidInputError, match="must not be inside the client socket directory"):
        config.load({}, None, {"socket_dir": sock, "admin_socket": sock / "sub" / "admin.sock"}, euid=1000)
    f = tmp_path / "w.toml"
    f.write_text('socket_dir_mode = "0770"\n')
    with pytest.raises(InvalidInputError, match="must not let the group write"):
        config.load({}, f, euid=0)


def test_daemon_refuses_directories_others_control(s3: Any, tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = root / "store"
    store.mkdir(parents=True)
    os.chown(store, OTHER, OTHER)
    d = start_daemon(root, s3, wait=False)
    assert d.proc.wait(timeout=60) == 1
    assert f"store directory {store}: owned by uid {OTHER}" in d.log_text()
    open_dir = Path(tempfile.mkdtemp(prefix="wc-open-", dir="/tmp"))
    try:
        os.chmod(open_dir, 0o777)  # writable by anyone, not sticky: the socket directory could be replaced
        conf = write_config(tmp_path / "w.toml", s3)
        d = start_daemon(tmp_path / "d2", s3, config=conf, wait=False, extra_args=["--socket-dir", str(open_dir / "s")])
        assert d.proc.wait(timeout=60) == 1
        assert f"the directory above it, {open_dir}" in d.log_text()
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


def test_tmp_runtime_dir_of_someone_else_is_refused(tmp_path: Path) -> None:
    base = Path(f"/tmp/weightcache-{ATTACKER}")
    shutil.rmtree(base, ignore_errors=True)
    home = dir_for_others("wc-fd-") / "home"
    home.mkdir()
    os.chown(home, ATTACKER, ATTACKER)
    probe = f"""
        from pathlib import Path
        from weightcache_daemon import config, server
        cfg = config.load({{"HOME": {str(home)!r}}}, None, {{}}, euid={ATTACKER})
        try:
            server.check_places(cfg, {{}})
            print("ok", oct(os.stat({str(base)!r}).st_mode & 0o777))
        except weightcache.WeightcacheError as e:
            print("refused", e)
    """
    try:
        for owner, mode, want in ((OTHER, 0o700, "refused"), (ATTACKER, 0o755, "refused"), (None, 0, "ok 0o700")):
            shutil.rmtree(base, ignore_errors=True)
            if owner is not None:
                base.mkdir(mode=mode)
                os.chmod(base, mode)
                os.chown(base, owner, owner)
            r = _as(ATTACKER, [], probe)
            assert r.stdout.startswith(want), (owner, mode, r.stdout, r.stderr)
            if want == "refused":
                assert str(base) in r.stdout and "not a private directory" in r.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(home.parent, ignore_errors=True)


def test_client_paths_helpers_refuse_foreign_base(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    os.chown(d, OTHER, OTHER)
    with pytest.raises(PermissionDeniedError, match=f"owned by uid {OTHER}"):
        paths.check_dir_not_foreign(d, "socket directory")
    paths.check_dir_not_foreign(tmp_path / "absent" / "deeper", "socket directory")  # ours to create


# ---------------------------------------------------------------- root in a container


def _supports_immutable(where: Path) -> bool:
    from weightcache_daemon.storage.blobs import set_immutable

    f = where / ".probe"
    f.write_bytes(b"")
    try:
        set_immutable(f, True)
        set_immutable(f, False)
        return True
    except OSError:
        return False
    finally:
        f.unlink()


def test_root_cannot_reopen_a_granted_descriptor_for_writing(s3: Any, tmp_path: Path, tiny_model: Path,
                                                             report: Any) -> None:  # fmt: skip
    if not _supports_immutable(tmp_path):
        pytest.skip(f"{tmp_path}: the filesystem has no FS_IMMUTABLE_FL")
    d = start_daemon(tmp_path / "d", s3, immutable_blobs=True)
    try:
        d.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
        sid = _snapshot(d, "tiny")
        refused = 0
        with FdConnection(d.socket_dir / "fd.sock") as c:  # this client is root, with every capability
            granted = c.acquire(sid)
            for g in granted:
                for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
                    with pytest.raises(PermissionError):
                        os.open(f"/proc/self/fd/{g.fd}", flags)
                    refused += 1
                os.close(g.fd)
        blob = next((d.cache_dir / "blobs" / "sha256").rglob("*/*"))
        with pytest.raises(PermissionError):
            os.chmod(blob, 0o644)
        # eviction clears the flag before it unlinks
        d.ctl("evict", "tiny")
        assert d.ctl_json("ls") == [] and not any(p.is_file() for p in (d.cache_dir / "blobs").rglob("*"))
    finally:
        d.stop()
        for p in (d.cache_dir / "blobs").rglob("*"):
            if p.is_file():
                subprocess.run(["chattr", "-i", str(p)], check=False)
    report(
        "access",
        "root (all capabilities) reopens each granted descriptor via /proc/self/fd with O_WRONLY, O_RDWR, O_APPEND",
        "EPERM every time: committed blobs carry FS_IMMUTABLE_FL (immutable_blobs = true); evict still works",
        f"{refused} opens refused",
    )


def test_frame_limit_fits_real_requests() -> None:
    longest = pb.FdRequest(acquire=pb.AcquireRequest(snapshot_id="f" * 32)).SerializeToString()
    assert len(pack(longest)) < MAX_REQUEST_FRAME // 16
    assert struct.unpack(">I", pack(longest)[:4])[0] == len(longest)


def test_lease_table_is_consistent_under_threads() -> None:
    """Grants and releases (the event loop) race evictions that count held bytes (download
    threads): held bytes exist only while their snapshot is leased, and the quota holds per uid."""
    from weightcache.errors import ExhaustedError
    from weightcache_daemon.cache.leases import Leases

    leases = Leases(quota=300)
    a = leases.acquire("s1", 1, 1000, 1000, 200)
    leases.acquire("s1", 2, 1000, 1000, 200)  # the same snapshot again: counted once
    with pytest.raises(ExhaustedError, match="per-uid lease quota"):
        leases.acquire("s2", 3, 1000, 1000, 200)
    leases.acquire("s2", 4, 2000, 2000, 200)  # another uid has its own quota
    assert leases.of_uid(1000) == 200 and leases.hold_if_leased("s1", 50) and not leases.hold_if_leased("s3", 1)
    leases.release(a.token)
    assert leases.held_bytes() == 50  # one lease on s1 is left
    for le in leases.of("s1"):
        leases.release(le.token)
    assert leases.held_bytes() == 0

    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(uid: int) -> None:
        try:
            for _ in range(3000):
                le = leases.acquire(f"s{uid % 3}", uid, uid, uid, 1)
                leases.release(le.token)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def evict() -> None:
        try:
            while not stop.is_set():
                for s in ("s0", "s1", "s2"):
                    leases.hold_if_leased(s, 10)
                leases.held()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    churners = [threading.Thread(target=churn, args=(u,)) for u in range(6)]
    evictor = threading.Thread(target=evict)
    for t in [*churners, evictor]:
        t.start()
    for t in churners:
        t.join(timeout=120)
    stop.set()
    evictor.join(timeout=60)
    assert not errors and len(leases) == 1 and leases.held() == {"s2"}
    for le in leases.of("s2"):
        leases.release(le.token)
    assert leases.held_bytes() == 0 and len(leases) == 0


def _capless_daemon(tmp_path: Path, s3: Any, **cfg: Any) -> tuple[Daemon, Path]:
    """A daemon (root, for the socket group) without CAP_SYS_RESOURCE and CAP_SYS_ADMIN: like an
    unprivileged one, the kernel holds it to RLIMIT_NOFILE for descriptors in flight."""
    from harness import daemon_argv

    base = dir_for_others("wc-fd-")
    cfg.setdefault("client_sources", ["s3://allowed-only/*"])
    conf = write_config(tmp_path / "w.toml", s3, socket_group=str(GID), socket_dir_mode="0750",
                        socket_mode="0660", **cfg)  # fmt: skip
    cache, sock, admin = base / "store", base / "sock", base / "admin" / "admin.sock"
    log = base / "daemon.log"
    with open(log, "ab") as lf:
        proc = subprocess.Popen(
            ["setpriv", "--bounding-set", "-sys_resource,-sys_admin", "--inh-caps=-all",
             *daemon_argv(cache, sock, admin, config=conf)],
            stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    d = Daemon(base, cache, sock, admin, proc, log)
    d.wait_ready()
    return d, base


def test_unread_descriptors_never_reach_the_kernel_limit(s3: Any, tmp_path: Path, report: Any) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    model = make_model(tmp_path / "wide", shards=1)
    for i in range(25):
        (model / f"extra-{i:02d}.json").write_text(json.dumps({"i": i}))
    n_files = sum(1 for _ in model.iterdir())
    d, base = _capless_daemon(tmp_path, s3, max_clients_per_uid=8, fd_frame_timeout=2)
    try:
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        cap_eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16)
        assert not cap_eff & (1 << 24 | 1 << 21), "the daemon still has CAP_SYS_RESOURCE or CAP_SYS_ADMIN"
        d.ctl("prefetch", f"file://{model}/", "--name", "wide")
        sid = _snapshot(d, "wide")
        fds0, rss0 = _baseline(d, sid)
        pid = d.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        limit = fds0 + 120  # the kernel refuses the daemon's sendmsg past this many in flight
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        attack = f"""
            socks = []
            for i in range(8):  # the uid's connection cap, each with 50 pipelined Acquires, never read
                s = connect({str(d.socket_dir / "fd.sock")!r})
                s.sendall(acquire({sid!r}) * 50)
                socks.append(s)
            print("sent", flush=True)
            sys.stdin.readline()
            print(json.dumps([error_of(s) for s in socks]), flush=True)
        """
        p = _as(ATTACKER, [GID], attack, background=True)
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "sent", p.stderr.read() if p.stderr else ""
        wait_for(lambda: d.log_text().count('"fd_client_refused"') >= 8, 60, "all eight connections refused")
        # without the bound, 8 x 50 x n_files descriptors would be in flight: far past the limit,
        # and every sendmsg with descriptors (this one's too) would fail with ETOOMANYREFS
        latency = max(_legit_acquire(d, sid) for _ in range(10))
        p.stdin.write("\n")
        p.stdin.flush()
        out = json.loads(p.stdout.readline())
        p.wait(timeout=60)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        codes = sorted({code for code, _ in out})
        assert set(codes) <= {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED"}, out
        assert "fd_send_failed" not in d.log_text() and "Traceback" not in d.log_text()
        fds1, _ = _comes_back(d, fds0, rss0)
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    report(
        "hostile requests",
        f"daemon without CAP_SYS_RESOURCE, open-file limit {limit}; a second uid pipelines 50 Acquires of a "
        f"{n_files}-file model on each of 8 connections and never reads",
        f"the attacker's connections refused ({', '.join(codes)}); no ETOOMANYREFS; another uid served meanwhile",
        f"legit Acquire ≤ {latency * 1000:.0f} ms; daemon fds {fds0}→{fds1}",
    )
