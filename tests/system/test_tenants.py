"""Tenants are sockets, not uids (docs/security.md, "Tenants").

A real daemon declares two tenants, each with its own client socket directory. The second
tenant acts from separate processes, under uids of its choosing, and tries what a hostile
container would: list, open and read the first tenant's private model (by name, snapshot id,
ReadRange, fd.sock Acquire), take, shadow or squat its names, escape its lease quota with many
uids, evict the other tenant's models with its downloads. Each attempt is refused, or sees
exactly what it would see if the model did not exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Daemon, make_model, start_daemon, toml_text, upload_dir, wait_for, write_config
from tests_helpers import as_uid_argv, dir_for_others, write_u8_model

from weightcache import BusyError, ExhaustedError, InvalidInputError, NotFoundError, PermissionDeniedError, connect
from weightcache._fd import FdConnection
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

GROUP = 4242  # the client socket group; the tenants' processes run as other uids in it
SNAPSHOT = re.compile(r"[0-9a-f]{32}")

CHILD_PRELUDE = """
import json, sys
import grpc, grpc._channel, grpc._utilities
from weightcache import connect, WeightcacheError
from weightcache._fd import FdConnection
grpc.insecure_channel("unix:///nonexistent").close()  # grpc's lazy imports, while still root

def outcome(fn):
    try:
        return {"ok": fn()}
    except WeightcacheError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
"""


def tenant_daemon(root: Path, s3: Any, bucket: str, **tenant_extra: Any) -> tuple[Daemon, Path, Path]:
    """A daemon with tenants "a" (on the harness's socket directory) and "b"; both may fetch
    from the test bucket and see shared models named "shared-*"."""
    tenants = []
    for name, sock in (("a", root / "sock"), ("b", root / "sock-b")):
        tenants.append({"name": name, "socket_dir": str(sock), "client_sources": [f"s3://{bucket}/**"],
                        "shared_models": ["shared-*"], **tenant_extra.get(name, {})})  # fmt: skip
    top = {k: v for k, v in tenant_extra.items() if k not in ("a", "b")}
    cfg = write_config(root / "weightcached.toml", s3, socket_group=str(GROUP), **top)
    with open(cfg, "a") as f:
        f.write(toml_text({}, None, {"tenants": tenants}))
    d = start_daemon(root, s3, config=cfg)
    return d, root / "sock", root / "sock-b"


def as_tenant(uid: int, code: str, *args: str) -> Any:
    """Run `code` (which prints one JSON line) as `uid` in the socket group, in its own process."""
    argv = as_uid_argv(uid, [GROUP], code, preload=CHILD_PRELUDE) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def root() -> Iterator[Path]:
    d = dir_for_others("wc-tenants-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _model(s3: Any, bucket: str, tmp: Path, prefix: str, seed: int, size: int = 0) -> str:
    """A tiny Llama-shaped model, or (with `size`) one safetensors file of that many bytes."""
    path = write_u8_model(tmp / prefix, size, seed) if size else make_model(tmp / prefix, seed=seed)
    upload_dir(s3, bucket, f"{prefix}/", path)
    return f"s3://{bucket}/{prefix}/"


def _same_shape(a: str, a_model: str, b: str, b_model: str) -> bool:
    return a.replace(a_model, "MODEL") == b.replace(b_model, "MODEL")


def test_second_tenant_cannot_list_open_or_read_a_private_model(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket)
    try:
        uri = _model(s3, bucket, tmp_path, "private", seed=1)
        with connect(sock_a) as a:
            m = a.ensure(uri, name="private")
            assert m.name == "private"
        sid = m.snapshot_id
        missing = "f" * 32
        shard = next(f.path for f in m.files if f.path.endswith(".safetensors"))
        code = """
sock, sid, missing, shard = sys.argv[1:]
with connect(sock) as c:
    out = {
        "list": [x.name for x in c.list()],
        "ensure_name": outcome(lambda: c.ensure("private").snapshot_id),
        "ensure_missing_name": outcome(lambda: c.ensure("no-such-model").snapshot_id),
        "ensure_sid": outcome(lambda: c.ensure(sid).snapshot_id),
        "ensure_missing_sid": outcome(lambda: c.ensure(missing).snapshot_id),
        "open_sid": outcome(lambda: c.open(sid).snapshot_id),
        "read": outcome(lambda: len(c.read_range(sid, shard))),
        "read_missing": outcome(lambda: len(c.read_range(missing, shard))),
    }
with FdConnection(sock + "/fd.sock") as fd:
    out["acquire"] = outcome(lambda: len(fd.acquire(sid)))
    out["acquire_missing"] = outcome(lambda: len(fd.acquire(missing)))
print(json.dumps(out))
"""
        seen = as_tenant(2001, code, str(sock_b), sid, missing, shard)
        assert seen["list"] == []
        for what, model, twin, twin_model in (
            ("ensure_name", "private", "ensure_missing_name", "no-such-model"),
            ("ensure_sid", sid, "ensure_missing_sid", missing),
            ("open_sid", sid, "ensure_missing_sid", missing),
            ("read", sid, "read_missing", missing),
            ("acquire", sid, "acquire_missing", missing),
        ):
            got, ref = seen[what], seen[twin]
            assert got.get("error") == ref.get("error") == "NotFoundError", (what, got, ref)
            assert _same_shape(got["message"], model, ref["message"], twin_model), (what, got, ref)
        # the owner still has it, and the admin sees whose it is
        with connect(sock_a) as a:
            assert [x.name for x in a.list()] == ["private"]
            assert a.read_range(sid, shard)
        assert [r["name"] for r in d.ctl_json("ls")] == ["a:private"]
    finally:
        d.stop()


def test_names_cannot_be_taken_shadowed_or_squatted(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket)
    try:
        mine = _model(s3, bucket, tmp_path, "mine/tiny-llama", seed=1)
        theirs = _model(s3, bucket, tmp_path, "theirs/tiny-llama", seed=2)
        shared = _model(s3, bucket, tmp_path, "shared", seed=3)
        secret = _model(s3, bucket, tmp_path, "secret", seed=4)
        base = d.ctl_json("prefetch", shared, "--name", "shared-base")["snapshot_id"]
        d.ctl("prefetch", secret, "--name", "admin-secret")
        with connect(sock_a) as a:
            llama = a.ensure(mine, name="llama").snapshot_id
            assert a.ensure(mine, name="tiny-llama").snapshot_id == llama
        code = """
sock, llama, theirs, base = sys.argv[1:]
with connect(sock) as c:
    out = {
        "unnamed": outcome(lambda: c.ensure(theirs).name),
        "same_name": outcome(lambda: c.ensure(theirs, name="llama").snapshot_id),
        "sid_name": outcome(lambda: c.ensure(theirs, name=llama).snapshot_id),
        "view_name": outcome(lambda: c.ensure(theirs, name="llama/" + llama).snapshot_id),
        "upper_sid_name": outcome(lambda: c.ensure(theirs, name=llama.upper()).snapshot_id),
        "shadow_shared": outcome(lambda: c.ensure(theirs, name="shared-base").snapshot_id),
        "open_shared": outcome(lambda: c.ensure("shared-base").snapshot_id),
        "open_secret": outcome(lambda: c.ensure("admin-secret").snapshot_id),
        "qualified": outcome(lambda: c.ensure("a:llama").snapshot_id),
        "list": sorted(x.name for x in c.list()),
    }
print(json.dumps(out))
"""
        got = as_tenant(2002, code, str(sock_b), llama, theirs, base)
        # b has its own "llama" and "tiny-llama" (its own bytes), a's are untouched
        assert SNAPSHOT.fullmatch(got["same_name"]["ok"]) and got["same_name"]["ok"] != llama
        assert got["unnamed"] == {"ok": "tiny-llama"}
        for attack in ("sid_name", "view_name", "upper_sid_name"):
            assert got[attack]["error"] == "InvalidInputError" and "snapshot id" in got[attack]["message"], got[attack]
        assert got["shadow_shared"]["error"] == "PermissionDeniedError", got["shadow_shared"]
        assert got["open_shared"] == {"ok": base}
        assert got["open_secret"]["error"] == got["qualified"]["error"] == "NotFoundError"
        assert got["list"] == ["llama", "shared-base", "tiny-llama"]
        with connect(sock_a) as a:
            assert a.ensure("llama").snapshot_id == llama
            assert a.ensure("tiny-llama").snapshot_id == llama
            assert a.ensure(llama).name == "llama"  # a snapshot id means the snapshot, nothing else
            assert sorted(x.name for x in a.list()) == ["llama", "shared-base", "tiny-llama"]
        admin = sorted(r["name"] for r in d.ctl_json("ls"))
        assert admin == ["a:llama", "a:tiny-llama", "admin-secret", "b:llama", "b:tiny-llama", "shared-base"]
        # views of the two tenants' "llama" live apart, never inside a shared model's directory
        views = sorted(
            p.relative_to(d.cache_dir / "snapshots").parts[:2] for p in (d.cache_dir / "snapshots").glob("@*/*")
        )
        assert views == [("@a", "llama"), ("@a", "tiny-llama"), ("@b", "llama"), ("@b", "tiny-llama")]
    finally:
        d.stop()


def test_concurrent_requests_for_one_name_with_other_filters_fail_before_downloading(  # type: ignore[no-untyped-def]
    root: Path, s3, bucket: str, tmp_path: Path
) -> None:
    # a slow download (rate-limited), so the second request comes while the first one runs
    d, sock_a, _ = tenant_daemon(root, s3, bucket, download={"rate_limit": "2MiB"})
    try:
        uri = _model(s3, bucket, tmp_path, "slow", seed=5, size=6 << 20)
        first: dict[str, Any] = {}

        def run() -> None:
            with connect(sock_a) as c:
                first["m"] = c.ensure(uri, name="x", include=["*.safetensors", "*.json"])

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: "fetch_start" in d.log_text(), 60, "the first download to start")
        with connect(sock_a) as c, pytest.raises(BusyError) as exc:
            c.ensure(uri, name="x", include=["*.safetensors"])
        assert "being fetched right now" in str(exc.value)
        assert d.log_text().count('"fetch_start"') == 1  # the refused request fetched nothing
        t.join(timeout=300)
        assert first["m"].name == "x"
    finally:
        d.stop()


def test_lease_quota_is_per_tenant_whatever_its_uids(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    one = _model(s3, bucket, tmp_path, "shared-one", seed=6, size=1 << 20)
    two = _model(s3, bucket, tmp_path, "shared-two", seed=7, size=1 << 20)
    # room for one of the models in each tenant's lease quota, not two
    d, _, sock_b = tenant_daemon(root, s3, bucket, b={"lease_quota": "1700KiB"}, a={"lease_quota": "1700KiB"})
    holders: list[subprocess.Popen[str]] = []
    try:
        sid1 = d.ctl_json("prefetch", one, "--name", "shared-one")["snapshot_id"]
        sid2 = d.ctl_json("prefetch", two, "--name", "shared-two")["snapshot_id"]
        hold = """
with FdConnection(sys.argv[1] + "/fd.sock") as fd:
    print(json.dumps(outcome(lambda: len(fd.acquire(sys.argv[2])))), flush=True)
    sys.stdin.readline()
"""
        for uid, sid in ((2101, sid1), (2102, sid2)):
            argv = [*as_uid_argv(uid, [GROUP], hold, preload=CHILD_PRELUDE), str(sock_b), sid]
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp")
            holders.append(p)
            assert p.stdout is not None
            line = json.loads(p.stdout.readline())
            if uid == 2101:
                assert "ok" in line, line
            else:
                # another uid of the same tenant: the same quota
                assert line.get("error") == "ExhaustedError" and "tenant b" in line["message"], line
        # the other tenant's quota is its own
        with FdConnection(d.socket_dir / "fd.sock") as fd:
            assert len(fd.acquire(sid2)) > 0

        # the audit log names the tenant and the uid (SO_PEERCRED) of every grant
        def granted() -> list[dict[str, Any]]:
            lines = [json.loads(x) for x in d.log_text().splitlines() if x.startswith("{")]
            return [x for x in lines if x.get("event") == "descriptors_granted"]

        wait_for(lambda: len(granted()) >= 2, 60, "both grants in the daemon's log")
        assert {(x.get("tenant"), x["peer_uid"], x["snapshot"]) for x in granted()} == {
            ("b", 2101, sid1),
            ("a", os.getuid(), sid2),
        }
    finally:
        for p in holders:
            p.kill()
            p.wait()
        d.stop()


def test_tenant_downloads_stay_within_their_share(root: Path, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # capacity for about three 2 MiB models; b's own names may take about one
    models = [_model(s3, bucket, tmp_path, f"m{i}", seed=10 + i, size=2 << 20) for i in range(4)]
    d, sock_a, sock_b = tenant_daemon(
        root,
        s3,
        bucket,
        max_size="7MiB",
        b={"download_quota": "3MiB", "lease_quota": "100%"},
        a={"download_quota": "100%", "lease_quota": "100%"},
    )
    try:
        with connect(sock_a) as a:
            held = a.ensure(models[0], name="held").snapshot_id
            a.ensure(models[1], name="idle")
        with FdConnection(sock_a / "fd.sock") as lease:
            lease.acquire(held)  # a uses "held" right now
            with connect(sock_b) as b:
                first = b.ensure(models[2], name="first").snapshot_id
                # past its share: b's own least recently used model makes room, nobody else's
                b.ensure(models[3], name="second")
                names = sorted(x.name for x in b.list())
            assert names == ["second"], names
            assert first not in {r["snapshot_id"] for r in d.ctl_json("ls")}
            assert sorted(r["name"] for r in d.ctl_json("ls")) == ["a:held", "a:idle", "b:second"]
            # one model bigger than b's whole share: refused for b, a keeps everything
            big = _model(s3, bucket, tmp_path, "big", seed=20, size=4 << 20)
            with connect(sock_b) as b, pytest.raises(ExhaustedError) as exc:
                b.ensure(big, name="big")
            assert "download_quota" in str(exc.value)
            with connect(sock_a) as a:
                assert a.ensure("held").snapshot_id == held
                assert a.ensure("idle")
            # the node is full: a's next download evicts what nobody leases (a's own "idle"),
            # never b's "second" while b uses it, nor a's "held"
            with FdConnection(sock_b / "fd.sock") as b_lease, connect(sock_b) as b:
                b_lease.acquire(b.ensure("second").snapshot_id)
                with connect(sock_a) as a:
                    a.ensure(models[2], name="third")
                assert sorted(r["name"] for r in d.ctl_json("ls")) == ["a:held", "a:third", "b:second"]
    finally:
        d.stop()


def test_filter_variants_of_one_source_share_the_bytes(root: Path, s3, bucket: str, tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    size = 8 << 20
    uri = _model(s3, bucket, tmp_path, "variants", seed=30, size=size)
    d, sock_a, _ = tenant_daemon(root, s3, bucket, a={"max_downloads": 8})
    try:
        extras = ["*.json", "config.json", "tokenizer*", "*.txt", "*.model", "generation*", "x*", "y*"]
        results: dict[int, Any] = {}

        def run(i: int) -> None:
            with connect(sock_a) as c:
                try:
                    results[i] = c.ensure(uri, include=["*.safetensors", extras[i]]).snapshot_id
                except Exception as exc:  # noqa: BLE001 - reported below
                    results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(extras))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert all(isinstance(v, str) for v in results.values()), results
        downloaded = int(d.ctl_json("stats")["bytes_downloaded"])
        model_bytes = sum(p.stat().st_size for p in (tmp_path / "variants").iterdir())
        assert downloaded <= model_bytes * 1.05, (downloaded, model_bytes)
        assert len(d.ctl_json("ls")) == len(extras)  # eight names, one copy of the bytes
        report("tenants", f"{len(extras)} filter variants of one {model_bytes >> 20} MiB model at once",
               f"downloaded {downloaded >> 20} MiB once, shared", "")  # fmt: skip
    finally:
        d.stop()


def test_tenants_config_is_checked(tmp_path: Path) -> None:
    from weightcache_daemon.config import load

    def cfg(body: str) -> Path:
        p = tmp_path / "c.toml"
        p.write_text(body)
        return p

    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    ok = load(env, cfg(f'[[tenants]]\nname = "a"\nsocket_dir = "{tmp_path}/a"\nlease_quota = "10G"\n'), euid=1000)
    (t,) = ok.tenants()
    assert (t.name, t.lease_quota, t.max_downloads, t.download_quota_percent) == ("a", 10_000_000_000, 2, 25.0)
    for body, words in (
        ('[[tenants]]\nname = "A b"\nsocket_dir = "/x"\n', "name 'A b'"),
        ('[[tenants]]\nname = "a"\n', "needs socket_dir"),
        ('[[tenants]]\nname = "a"\nsocket_dir = "/x"\nquota = 1\n', "unknown key(s) quota"),
        (
            '[[tenants]]\nname = "a"\nsocket_dir = "/x"\n[[tenants]]\nname = "b"\nsocket_dir = "/x"\n',
            "share a socket_dir",
        ),
        ('[[tenants]]\nname = "a"\nsocket_dir = "/x"\nmax_downloads = 0\n', "max_downloads 0"),
        ('[[tenants]]\nname = "a"\nsocket_dir = "/x"\nlease_quota = "200%"\n', "lease_quota '200%'"),
    ):
        with pytest.raises(InvalidInputError) as exc:
            load(env, cfg(body), euid=1000)
        assert words in str(exc.value), (words, str(exc.value))
    # no tenants declared: one default tenant on the default socket directory
    (default,) = load(env, None, euid=1000).tenants()
    assert default.default and default.shared_models == ("*",)


def test_tenant_socket_directories_are_its_own(root: Path, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    # A top-level client_sources applies to no tenant once tenants are declared: start-up says so.
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket, client_sources=["s3://elsewhere/**"])
    try:
        assert "client_sources_ignored" in d.log_text()
        for sock in (sock_a, sock_b):
            assert sorted(p.name for p in sock.iterdir()) == ["fd.sock", "weightcache.sock"]
            assert os.stat(sock).st_gid == GROUP
            stub = pb_grpc.CacheStub(grpc.insecure_channel(f"unix://{sock / 'weightcache.sock'}"))
            assert stub.List(pb.ListRequest()).models == []
        with connect(sock_b) as b, pytest.raises(PermissionDeniedError, match="not in tenant b's client_sources"):
            b.ensure("s3://elsewhere/model/")  # not in b's client_sources, whatever the top-level one says
        with connect(sock_a) as a, pytest.raises(NotFoundError):
            a.ensure("nothing-here")
    finally:
        d.stop()
    for sock in (sock_a, sock_b):
        assert not any(sock.iterdir())  # both tenants' sockets removed at stop


def test_doctor_and_health_check_every_tenant_and_only_this_daemons_sockets(  # type: ignore[no-untyped-def]
    root: Path, s3, bucket: str, tmp_path: Path
) -> None:
    d, sock_a, sock_b = tenant_daemon(root, s3, bucket)
    other = start_daemon(tmp_path / "other", s3)  # another daemon on the node, with its own sockets
    # The client's own default directory is not one the tenant daemon binds: the checks must
    # learn the tenants' directories from the admin socket, not from the client's default.
    env = dict(d.env, WEIGHTCACHE_SOCKET_DIR=str(root / "not-bound"))

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["cachectl", *args], capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)  # fmt: skip

    try:
        r = ctl("doctor", "--json")
        checks = {c["name"]: c for c in json.loads(r.stdout)}
        for tenant, sock in (("a", sock_a), ("b", sock_b)):
            for what in ("client health service", "descriptor socket"):
                c = checks[f"{what} (tenant {tenant})"]
                assert c["status"] == "PASS" and str(sock) in c["detail"], c
        assert r.returncode == 0, r.stdout
        r = ctl("health")
        assert r.returncode == 0 and str(sock_a) in r.stdout and str(sock_b) in r.stdout, r.stdout + r.stderr
        assert ctl("health", "--socket-dir", str(sock_b)).returncode == 0

        # Another daemon's directory is not this daemon's, however healthy its sockets are.
        r = ctl("health", "--json", "--socket-dir", str(other.socket_dir))
        assert r.returncode == 1 and json.loads(r.stdout)["status"] == "FAIL", r.stdout
        assert "holds none of the client sockets" in json.loads(r.stdout)["detail"]

        # The other daemon's socket at tenant b's path: it answers SERVING, and is still a FAIL.
        os.rename(other.socket_dir / "weightcache.sock", sock_b / "weightcache.sock")
        r = ctl("doctor", "--json")
        checks = {c["name"]: c for c in json.loads(r.stdout)}
        assert r.returncode == 1
        assert checks["client health service (tenant a)"]["status"] == "PASS"
        bad = checks["client health service (tenant b)"]
        assert bad["status"] == "FAIL" and "not the socket this daemon bound" in bad["detail"], bad
        assert checks["descriptor socket (tenant b)"]["status"] == "PASS"  # fd.sock is still its own
        r = ctl("health")
        assert r.returncode == 1 and "not the socket this daemon bound" in r.stdout, r.stdout
    finally:
        other.stop()
        d.stop()


def test_kubernetes_tenants_example_gives_each_pod_only_its_tenant(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    from weightcache_daemon.config import load

    root = Path(__file__).resolve().parents[2]
    docs = [d for d in yaml.safe_load_all((root / "deploy/kubernetes/tenants.yaml").read_text()) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    cfg_file = tmp_path / "weightcached.toml"
    cfg_file.write_text(cm["data"]["weightcached.toml"])
    cfg = load({}, cfg_file, euid=0)  # the embedded config loads as the daemon reads it
    tenants = {t.socket_dir: t for t in cfg.tenants()}
    assert len(tenants) == 2
    pods = [d for d in docs if d["kind"] == "Pod"]
    uids = set()
    for pod in pods:
        spec = pod["spec"]
        paths = [Path(v["hostPath"]["path"]) for v in spec["volumes"] if "hostPath" in v]
        assert len(paths) == 1 and paths[0] in tenants, paths  # one tenant's socket directory, nothing else
        tenant = tenants.pop(paths[0])
        assert (
            tenant.socket_group is not None
            and int(tenant.socket_group) in spec["securityContext"]["supplementalGroups"]
        )
        uids.add(spec["securityContext"]["runAsUser"])
    assert not tenants and len(uids) == len(pods)  # every tenant has its pod, each with its own uid
    # The DaemonSet's probes ask the admin socket for the bound directories: they stay true
    # when this ConfigMap replaces the one without tenants (whose socket_dir is not bound now).
    (ds,) = [d for d in yaml.safe_load_all((root / "deploy/kubernetes/daemonset.yaml").read_text()) if d and d["kind"] == "DaemonSet"]  # fmt: skip
    container = ds["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert "--socket-dir" not in command and "health" in command, command
        assert command[command.index("--admin-socket") + 1] == str(cfg.admin_socket)


def test_a_version_2_index_is_migrated_and_its_names_are_shared(tmp_path: Path) -> None:
    import sqlite3

    from weightcache_daemon.storage.index import Index

    index = Index(tmp_path / "index.db")
    index.close()
    db = sqlite3.connect(tmp_path / "index.db")  # back to what a version-2 daemon wrote
    db.executescript("""
        ALTER TABLE models DROP COLUMN tenant;
        UPDATE meta SET value='2' WHERE key='schema';
        INSERT INTO snapshots VALUES ('s1', 's3://b/m/', 0);
        INSERT INTO models VALUES ('llama', 's3://b/m/', 's1', '{}', 1, 0, 0, 'client');
    """)
    db.close()
    index = Index(tmp_path / "index.db")
    try:
        row = index.model("llama")
        assert row is not None and (row.tenant, row.owner, row.pinned) == ("", "client", True)
        assert index._q("SELECT value FROM meta WHERE key='schema'") == [("3",)]
    finally:
        index.close()
