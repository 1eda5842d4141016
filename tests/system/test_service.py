"""Running as a service: systemd units, socket modes and groups, a second uid, metrics, logs,
doctor, and the Kubernetes manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, accepting, daemon_argv, start_daemon, wait_for, write_config
from tests_helpers import as_uid_argv, dir_for_others

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs systemd)")
    return path


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    _need("systemd-analyze")
    unit = tmp_path / "weightcached.service"
    text = (SYSTEMD / "weightcached.service").read_text()
    # verify checks that ExecStart exists: point it at the weightcached this checkout installed
    unit.write_text(text.replace("/usr/local/bin/weightcached", shutil.which("weightcached") or "/bin/false"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:]
    assert float(m.group(1)) <= 2.5, r.stdout[-3000:]
    for must in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=", "RuntimeDirectory=",
                 "UMask=", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/weightcache",
                 "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "CapabilityBoundingSet=CAP_LINUX_IMMUTABLE\n"):  # fmt: skip
        assert must in text, must
    assert "PrivateUsers=" not in text.replace("Not PrivateUsers=", "")


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    _need("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSTEMD / "weightcache.sysusers.conf")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    passwd, group = (root / "etc/passwd").read_text(), (root / "etc/group").read_text()
    assert passwd.startswith("weightcached:") or "\nweightcached:" in passwd
    assert "weightcache:" in group
    _need("systemd-tmpfiles")
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "weightcache.tmpfiles.conf")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = os.stat(root / "run/weightcache/client")
    assert st.st_mode & 0o777 == 0o750
    # the example config is valid for the daemon's loader
    from weightcache_daemon import config

    cfg = config.load({}, SYSTEMD / "weightcached.toml.example", euid=0)
    assert cfg.socket_group == "weightcache" and cfg.client_sources == () and cfg.max_size_percent == 90
    assert cfg.limits == config.ClientLimits()  # the example shows the defaults, and they agree
    assert (
        cfg.readonly_store is not None
        and "BindReadOnlyPaths=/var/lib/weightcache:" + str(cfg.readonly_store)
        in (SYSTEMD / "weightcached.service").read_text()
    )


GID = 4242
OTHER_UID = 54321


def _as_other(code: str, groups: list[int], setup: str = "") -> subprocess.CompletedProcess[str]:
    """Run `code` as OTHER_UID in `groups`, after `setup` (run as root)."""
    preload = textwrap.dedent("""
        import os, socket, sys
        import grpc, weightcache
        import grpc._channel, grpc._utilities  # grpc imports these lazily: load them while still root
    """) + textwrap.dedent(setup)
    return subprocess.run(as_uid_argv(OTHER_UID, groups, code, preload=preload), capture_output=True, text=True,
                          timeout=180, cwd="/tmp")  # fmt: skip


@pytest.fixture
def shared_daemon(s3, tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second uid and set socket groups")
    base = dir_for_others("wc-svc-")
    cfg = write_config(tmp_path / "w.toml", s3, client_sources=["s3://allowed-only/*"], socket_group=str(GID),
                       socket_dir_mode="0750", socket_mode="0660")  # fmt: skip
    d = start_daemon(base, s3, config=cfg)
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_socket_modes_groups_and_a_second_uid(shared_daemon: Daemon, s3_model: str, report) -> None:  # type: ignore[no-untyped-def]
    d = shared_daemon
    for p, mode in (
        (d.socket_dir, 0o750),
        (d.socket_dir / "weightcache.sock", 0o660),
        (d.socket_dir / "fd.sock", 0o660),
    ):
        st = os.stat(p)
        assert (st.st_mode & 0o777, st.st_gid) == (mode, GID), p
    assert os.stat(d.admin_socket).st_mode & 0o777 == 0o600
    os.chmod(d.admin_socket.parent, 0o755)  # even with the directory open, the socket itself refuses
    probe = textwrap.dedent("""
        import socket, sys
        for path in sys.argv[1:]:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path); print(path, "ok")
            except OSError as e:
                print(path, type(e).__name__)
    """)
    paths = [str(d.socket_dir / "weightcache.sock"), str(d.socket_dir / "fd.sock"), str(d.admin_socket)]
    out = _as_other(probe.replace("sys.argv[1:]", repr(paths)), [])
    assert out.returncode == 0, out.stderr
    assert all(line.endswith("PermissionError") for line in out.stdout.splitlines()), out.stdout
    member = _as_other(probe.replace("sys.argv[1:]", repr(paths)), [GID])
    lines = member.stdout.splitlines()
    assert lines[0].endswith(" ok") and lines[1].endswith(" ok") and lines[2].endswith("PermissionError"), lines
    # a member of the client group still cannot trigger a download outside the allow-list
    setup = f"client = weightcache.connect({str(d.socket_dir)!r})\n"  # a channel; it connects on first use
    ensure = textwrap.dedent(f"""
        try:
            client.ensure({s3_model!r})
        except weightcache.PermissionDeniedError as e:
            print("denied:", e)
    """)
    res = _as_other(ensure, [GID], setup)
    assert res.stdout.startswith("denied:") and s3_model in res.stdout, (res.stdout, res.stderr)
    assert d.ctl_json("ls") == []
    # a granted descriptor cannot be turned into a writable one by a non-root client
    d.ctl("prefetch", s3_model, "--name", "tiny")
    snap = d.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
    reopen = textwrap.dedent(f"""
        from weightcache._fd import FdConnection
        conn = FdConnection({str(d.socket_dir / "fd.sock")!r})
        for g in conn.acquire({snap!r}):
            try:
                os.open(f"/proc/self/fd/{{g.fd}}", os.O_WRONLY)
                print("WRITABLE", g.path)
            except PermissionError:
                print("refused", g.path)
    """)
    res = _as_other(reopen, [GID])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("refused") == 5 and "WRITABLE" not in res.stdout, res.stdout
    report(
        "access",
        "a second uid, outside and then inside the client group",
        "outside: no socket; inside: client sockets only, never admin; a disallowed URI is PERMISSION_DENIED; "
        "reopening a granted descriptor for writing via /proc/self/fd is refused",
        "",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_move_on_prefetch_and_hit(daemon_factory, s3_model: str) -> None:  # type: ignore[no-untyped-def]
    import weightcache

    port = _free_port()
    d = daemon_factory(metrics_address=f"127.0.0.1:{port}")
    before = _scrape(port)
    assert before["weightcache_stored_bytes"] == 0
    d.ctl("prefetch", s3_model, "--name", "tiny")
    with weightcache.connect(d.socket_dir) as c, c.open("tiny"):
        pass
    m = _scrape(port)
    bucket = s3_model.split("/")[2]
    assert m[f'weightcache_downloaded_bytes_total{{source="s3://{bucket}"}}'] > 0
    assert m['weightcache_cache_misses_total{api="prefetch"}'] == 1
    assert m['weightcache_cache_hits_total{api="ensure"}'] == 1
    assert m["weightcache_descriptor_grants_total"] == 1
    assert m["weightcache_stored_bytes"] == m["weightcache_logical_bytes"] > 0
    assert any(k.startswith('weightcache_rpc_duration_seconds_count{code="OK",rpc="Ensure"') for k in m)
    r = d.ctl("prefetch", "s3://no-such-bucket-here/x/", check=False)
    assert r.returncode != 0
    assert any(k.startswith("weightcache_ingest_failures_total") for k in _scrape(port))
    # Every metric the daemon exports is in the operator's list (prometheus_client's own
    # *_created series aside), labels and all.
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    documented = (ROOT / "docs/operations.md").read_text()
    missing = [n for n in sorted(exported) if not n.endswith("_created") and f"`{n}`" not in documented
               and f"`{n}{{" not in documented]  # fmt: skip
    assert exported and not missing, missing


def test_logs_are_json_lines_with_context(daemon: Daemon, s3_model: str) -> None:
    import weightcache

    daemon.ctl("prefetch", s3_model, "--name", "tiny")
    with weightcache.connect(daemon.socket_dir) as c, c.open("tiny"):
        pass
    # the daemon logs the grant right after sending it: the client may be done before the line is
    wait_for(lambda: '"descriptors_granted"' in daemon.log_text(), 60, "the descriptor grant in the log")
    events = [json.loads(line) for line in daemon.log_text().splitlines() if line.strip()]
    by = {e["event"]: e for e in events}
    assert {"level", "timestamp", "event"} <= set(by["ready"])
    assert by["fetch_done"]["model"] == "tiny" and by["fetch_done"]["snapshot"]
    grant = by["descriptors_granted"]
    assert grant["peer_pid"] == os.getpid() and grant["peer_uid"] == os.getuid() and grant["snapshot"]


def test_console_logs_are_readable(tmp_path: Path) -> None:
    argv = daemon_argv(tmp_path / "c", tmp_path / "s", tmp_path / "a" / "admin.sock", log_format="console")
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:  # ready (it binds fd.sock last, after logging its reconciliation) before it is asked to stop
        wait_for(lambda: accepting(tmp_path / "s" / "fd.sock") or p.poll() is not None, 120, "the daemon to start")
    finally:
        p.terminate()
    _, err = p.communicate(timeout=60)
    lines = err.splitlines()
    assert any(" reconciled " in line for line in lines) and not any(line.startswith("{") for line in lines), err


def test_doctor_reports_broken_sources_with_their_real_error(daemon_factory, s3, s3_model: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    healthy = daemon_factory("healthy")
    healthy.ctl("prefetch", s3_model, "--name", "tiny")
    r = healthy.ctl("doctor", "--socket-dir", str(healthy.socket_dir))
    assert "[PASS] source" in r.stdout and "[FAIL]" not in r.stdout, r.stdout
    bucket = s3_model.split("/")[2]
    cfg = tmp_path / "broken.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        client_sources = ["*"]
        metrics_address = ""
        [[sources]]
        prefix = "s3://{bucket}/"
        endpoint_url = "{s3.endpoint}"
        region = "us-east-1"
        access_key_id = "{s3.admin_key[0]}"
        secret_access_key = "not-the-secret"
        [[sources]]
        prefix = "s3://unreachable-bucket/"
        endpoint_url = "http://127.0.0.1:9"
        region = "us-east-1"
        access_key_id = "x"
        secret_access_key = "y"
    """)
    )
    broken = start_daemon(tmp_path / "broken", s3, config=cfg)
    try:
        # a generous probe limit (a loaded machine): both broken sources fail at once, refused or 403
        r = broken.ctl("doctor", "--json", "--socket-dir", str(broken.socket_dir), "--timeout", "30", check=False)
        assert r.returncode == 1
        checks = {c["name"]: c for c in json.loads(r.stdout)}
        creds = checks[f"source s3://{bucket}/ (configured)"]
        assert creds["status"] == "FAIL" and "SignatureDoesNotMatch" in creds["detail"]
        down = checks["source s3://unreachable-bucket/ (configured)"]
        assert down["status"] == "FAIL" and "Could not connect" in down["detail"]
        assert checks["index vs blobs"]["status"] == "PASS"
        assert checks["admin socket"]["status"] == "PASS"
        text = broken.ctl("doctor", "--socket-dir", str(broken.socket_dir), "--timeout", "30", check=False).stdout
        assert "-> check endpoint_url, credentials and network" in text
    finally:
        broken.stop()


def _yaml_docs(path: Path) -> list[Any]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_match_the_daemon(tmp_path: Path) -> None:
    docs = _yaml_docs(ROOT / "deploy/kubernetes/daemonset.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"Namespace", "ConfigMap", "DaemonSet"}
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    cfg = tomllib.loads(cms["weightcached-config"]["data"]["weightcached.toml"])
    spec = kinds["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    container = spec["containers"][0]
    # (the store's second, read-only mount is checked below)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"] if m["mountPath"] != cfg["readonly_store"]}
    assert volumes["store"]["hostPath"]["path"] == cfg["cache_dir"] == mounts["store"]
    assert cfg["socket_dir"].startswith(mounts["run"]) and cfg["admin_socket"].startswith(mounts["run"])
    assert mounts["models"] == cfg["models_dir"] and volumes["models"]["configMap"]["name"] == "weightcache-models"
    from weightcache_daemon.cache import declarative

    models = cms["weightcache-models"]["data"]
    assert models, "the example models ConfigMap declares no model"
    for filename, text in models.items():  # each file as the daemon reads it from models.d/
        (tmp_path / filename).write_text(text)
        declared = declarative.parse(tmp_path / filename)  # refuses unknown keys, bad URIs and names
        raw = tomllib.loads(text)
        assert declared.uri == raw["uri"] and declared.name == raw.get("name", declared.name), declared
        assert declared.pin is raw.get("pin", True)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # The probe checks the sockets the daemon reports on its admin socket: with or without
        # [[tenants]] (deploy/kubernetes/tenants.yaml), never a directory that may not be bound.
        assert container[probe]["exec"]["command"] == ["cachectl", "--admin-socket", cfg["admin_socket"], "health"]
    assert "resources" in container and "requests" in container["resources"]
    from weightcache_daemon import config as wconfig

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:  # the embedded config loads
        f.write(cms["weightcached-config"]["data"]["weightcached.toml"])
        f.flush()
        loaded = wconfig.load({}, Path(f.name), euid=0)
    assert str(loaded.socket_dir) == cfg["socket_dir"]
    pod = _yaml_docs(ROOT / "deploy/kubernetes/example-pod.yaml")[0]
    paths = [v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v]
    assert paths == [cfg["socket_dir"]]  # only the client socket directory
    assert int(cfg["socket_group"]) in pod["spec"]["securityContext"]["supplementalGroups"]
    # metrics off pod-reachable addresses; descriptors through a read-only mount of the store
    assert not cfg["metrics_address"].startswith("0.0.0.0") and str(loaded.metrics_address).startswith("127.")
    ro = [m for m in container["volumeMounts"] if m["mountPath"] == cfg["readonly_store"]]
    assert ro and ro[0]["name"] == "store" and ro[0].get("readOnly") is True, container["volumeMounts"]
    # pods get their own non-root uid, without capabilities
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"] != 0
    assert pod["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_sd_notify_ready_after_sockets_and_watchdog_pings(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(120)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="400000")
    argv = daemon_argv(tmp_path / "c", tmp_path / "s", tmp_path / "a" / "admin.sock", log_format=None)
    p = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    try:
        assert sock.recv(256) == b"READY=1"
        # READY comes only once every socket is bound
        assert all((tmp_path / "s" / n).exists() for n in ("weightcache.sock", "fd.sock"))
        assert (tmp_path / "a" / "admin.sock").exists()
        assert sock.recv(256) == b"WATCHDOG=1"  # pinged at half the interval
        p.terminate()
        # more pings may be queued before the stop (one every 0.2 s, and this process may be slow)
        while (msg := sock.recv(256)) == b"WATCHDOG=1":
            pass
        assert msg == b"STOPPING=1", msg
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        sock.close()


def test_task_dump_follows_awaits_through_async_generators() -> None:
    """format_tasks walks each task's await chain, through `async for` over async generators
    (whose awaitable hides its generator), to the innermost wait."""
    import asyncio

    from weightcache_daemon.observe.taskdump import format_tasks

    async def innermost(ev: asyncio.Event) -> None:
        await ev.wait()

    async def events(ev: asyncio.Event) -> Any:
        await innermost(ev)
        yield 1

    async def handler(ev: asyncio.Event) -> None:
        async for _ in events(ev):
            pass

    async def main() -> str:
        ev = asyncio.Event()
        task = asyncio.create_task(handler(ev), name="rpc-1")
        await asyncio.sleep(0)  # let it start and suspend
        text = format_tasks([task])
        ev.set()
        await task
        return text

    text = asyncio.run(main())
    lines = text.splitlines()
    assert lines[0].startswith("asyncio tasks (1)") and lines[1] == "Task rpc-1 (pending):"
    names = [ln.rsplit(" in ", 1)[1] for ln in lines[2:] if ln.startswith("  File ")]
    assert names[:4] == [
        "test_task_dump_follows_awaits_through_async_generators.<locals>.handler",
        "test_task_dump_follows_awaits_through_async_generators.<locals>.events",
        "test_task_dump_follows_awaits_through_async_generators.<locals>.innermost",
        "Event.wait",
    ]
