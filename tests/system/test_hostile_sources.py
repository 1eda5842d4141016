"""Hostile clients against sources, URIs, names and manifests, on a real daemon.

The daemon runs as its own unprivileged uid (it imports its code as root, where the
interpreter lives here, then drops before it reads its config); its config file, 0600 and
its own, holds an S3 secret key: the file an attacker would most like to read. The attacker
is a second uid that is only in the client socket group. Every case checks that the attacker
gets a clear error, that a legitimate client is still served, and that the store holds what
it held before (no new name, no re-pointed name, no blob with the secret in it).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Daemon, make_model, wait_for, write_config
from tests_helpers import as_uid_argv, st_bytes

from weightcache.errors import InvalidInputError
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
from weightcache_daemon import uris
from weightcache_daemon.config import Config
from weightcache_daemon.sources.local import LocalSource
from weightcache_daemon.storage.index import Index

GID = 4245
DAEMON_UID = 54351
ATTACKER = 54352
SECRET = "wJalrXUtnFEMI-K7MDENG-SECRET-KEY-never-served"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a daemon uid and an attacker uid")


# ---------------------------------------------------------------- URI rules (no daemon)


@pytest.mark.parametrize(
    ("uri", "canonical"),
    [
        ("s3://b/m", "s3://b/m/"),
        ("S3://b//m/./", "s3://b/m/"),
        ("s3://b/%6d/", "s3://b/m/"),
        ("file://localhost/srv/m", "file:///srv/m/"),
        ("file:////srv///m//", "file:///srv/m/"),
    ],
)
def test_uri_variants_have_one_canonical_form(uri: str, canonical: str) -> None:
    assert uris.normalize(uri) == canonical
    assert uris.normalize(canonical) == canonical  # a fixed point: no second decoding changes it


@pytest.mark.parametrize(
    ("uri", "rule"),
    [
        ("file:///srv/models/../etc/", "'..'"),
        ("file:///srv/models/%2e%2e/etc/", "'..'"),
        ("file:///srv/models/%2E%2E/etc/", "'..'"),
        ("file:///srv/models%2f..%2fetc/", "'..'"),
        ("file:///srv/models/%252e%252e/", "double encoding"),
        ("s3://b/m/?versionId=1", "query strings"),
        ("s3://b/m/#x", "query strings"),
        ("s3://b/m/%3Fx", "double encoding"),
        ("s3://user@b/m/", "bucket"),
        ("file://host/srv/m/", "must be local"),
        ("http://h/m/", "unsupported scheme"),
        ("file:///srv/m\\x/", "backslash"),
    ],
)
def test_uri_tricks_are_refused_with_the_rule(uri: str, rule: str) -> None:
    with pytest.raises(InvalidInputError, match=rule):
        uris.normalize(uri)


def test_allow_list_is_matched_per_segment_on_the_canonical_form() -> None:
    cfg = Config(Path("/c"), Path("/s"), Path("/a"), client_sources=("file:///srv/models/*", "s3://hub/**"))
    assert cfg.client_may_fetch("file:///srv/models/llama/")
    assert cfg.client_may_fetch("file:///srv//models/./llama")
    for uri in (
        "file:///srv/models/llama/sub/",  # '*' never crosses '/'
        "file:///srv/models/../etc/",
        "file:///srv/models/%2e%2e/etc/",
        "file:///srv/models/x/%2e%2e/%2e%2e/etc/",
        "file:///srv/models/llama/?x",
        "file:///srv/",
    ):
        assert not cfg.client_may_fetch(uri), uri
    assert cfg.client_may_fetch("s3://hub/org/model/") and not cfg.client_may_fetch("s3://hubx/m/")


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [("s3://models/../*", "'..' segment"), ("http://h/*", "must start with s3:// or file://"), ("models/*", "must")],
)
def test_allow_list_patterns_are_checked_when_the_config_is_loaded(tmp_path: Path, pattern: str, rule: str) -> None:
    from weightcache_daemon import config

    conf = tmp_path / "w.toml"
    conf.write_text(f"client_sources = [{json.dumps(pattern)}]\n")
    with pytest.raises(InvalidInputError, match=rule):
        config.load({}, conf, euid=1000)


def test_a_file_swapped_for_a_fifo_after_listing_never_blocks(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    src = LocalSource(f"file://{model}/")
    (obj,) = src.list()
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")  # no writer: a blocking open would wait forever
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            src.read_into(obj, 0, memoryview(bytearray(2)), lambda n: None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout=30)  # generous: a refusal takes microseconds, a hang takes forever
    assert not t.is_alive(), "read_into blocked on a FIFO"
    assert isinstance(outcome[0], InvalidInputError) and "FIFO" in str(outcome[0])


def test_a_version_1_index_is_migrated_and_its_names_become_the_admins(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "index.db")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE snapshots (id TEXT PRIMARY KEY, source TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO snapshots VALUES ('s1', 's3://b/m/', 0);
        CREATE TABLE models (
            name TEXT PRIMARY KEY, source TEXT NOT NULL, snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
            filters TEXT NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL, last_used REAL NOT NULL);
        INSERT INTO models VALUES ('llama', 's3://b/m/', 's1', '{}', 1, 0, 0);
    """)
    db.close()
    index = Index(tmp_path / "index.db")
    try:
        row = index.model("llama")
        assert row is not None and row.owner == "admin" and row.pinned
        with pytest.raises(Exception, match="clients may not re-point"):
            index.set_model("llama", "s3://evil/m/", "s1", "{}", None, "client")
        assert index.model("llama") == row
    finally:
        index.close()
    index = Index(tmp_path / "index.db")  # and it opens again as version 2
    index.close()


# ---------------------------------------------------------------- a daemon as its own uid

LAUNCH_PRELOAD = """
import sys
import weightcache_daemon.main as main
import weightcache_daemon.server, weightcache_daemon.cache.doctor, weightcache_daemon.sources.local
import watchdog.observers
"""

ATTACK_PRELOAD = """
import json, os, sys, time
import grpc
import grpc._channel, grpc._utilities  # lazily imported by grpc: load them while still root
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
"""

# run as the attacker, before its own code: ensure() through the daemon's client socket
ATTACK = textwrap.dedent("""
    stub = pb_grpc.CacheStub(grpc.insecure_channel("unix://{sock}",
                                                   options=[("grpc.max_receive_message_length", 64 << 20)]))
    def ensure(model, name="", include=(), exclude=()):
        t = time.monotonic()
        try:
            last = None
            for ev in stub.Ensure(pb.EnsureRequest(model=model, name=name, include=list(include),
                                                   exclude=list(exclude)), timeout=120):
                last = ev
            m = last.manifest
            return {{"code": "OK", "name": m.model, "snapshot": m.snapshot_id, "files": len(m.files),
                     "seconds": time.monotonic() - t, "text": str(m)[:20000]}}
        except grpc.RpcError as e:
            return {{"code": e.code().name, "details": e.details(), "seconds": time.monotonic() - t}}
""")


def _as_attacker(d: Daemon, code: str) -> list[str]:
    """The command line that runs `code` as ATTACKER in the client group, ensure() defined."""
    body = ATTACK.format(sock=d.socket_dir / "weightcache.sock") + textwrap.dedent(code)
    return as_uid_argv(ATTACKER, [GID], body, preload=ATTACK_PRELOAD)


def _models_tree(base: Path) -> Path:
    """base/models: what the allow-list names, readable by the daemon, written only by root."""
    models = base / "models"
    models.mkdir()
    make_model(models / "tiny")
    make_model(models / "other", seed=1)
    return models


def _safetensors(path: Path, tensors: dict[str, bytes]) -> None:
    header: dict[str, Any] = {}
    pos = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    path.write_bytes(st_bytes(header, b"".join(tensors.values())))


class Node:
    """A daemon running as DAEMON_UID, and an attacker uid in its client group."""

    def __init__(self, base: Path, **cfg: Any) -> None:
        self.base = base
        self.models = _models_tree(base)
        run = base / "run"
        run.mkdir()
        os.chown(run, DAEMON_UID, DAEMON_UID)
        conf = write_config(run / "weightcached.toml", None, socket_group=str(GID), socket_dir_mode="0750",
                            socket_mode="0660", client_sources=[f"file://{self.models}/*"], **cfg)  # fmt: skip
        with conf.open("a") as f:  # the secret the daemon holds, that no client may read
            f.write(f'[[sources]]\nprefix = "s3://private/"\nsecret_access_key = "{SECRET}"\n')
        os.chown(conf, DAEMON_UID, DAEMON_UID)
        os.chmod(conf, 0o600)
        (run / "models.d").mkdir()
        os.chown(run / "models.d", DAEMON_UID, DAEMON_UID)
        self.conf = conf
        cache, sock, admin = run / "store", run / "sock", run / "admin" / "admin.sock"
        log = run / "daemon.log"
        argv = [*as_uid_argv(DAEMON_UID, [GID], "main.main(sys.argv[1:])", preload=LAUNCH_PRELOAD),
                "--config", str(conf), "--cache-dir", str(cache), "--socket-dir", str(sock),
                "--admin-socket", str(admin), "--log-format", "json"]  # fmt: skip
        with open(log, "ab") as lf:
            proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/tmp")
        self.d = Daemon(run, cache, sock, admin, proc, log)
        self.d.wait_ready()
        assert os.stat(cache).st_uid == DAEMON_UID

    def attack(self, code: str, timeout: float = 300) -> Any:
        """Run `code` as the attacker (ensure() is defined); it prints one JSON value."""
        r = subprocess.run(_as_attacker(self.d, code), capture_output=True, text=True, timeout=timeout,
                           cwd="/tmp")  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def state(self) -> tuple[list[tuple[str, str, bool, int]], list[str]]:
        models = [(m["name"], m["snapshot_id"], bool(m.get("pinned")), int(m["file_count"]))
                  for m in self.d.ctl_json("ls")]  # fmt: skip
        blobs = sorted(p.name for p in (self.d.cache_dir / "blobs").rglob("*") if p.is_file())
        return sorted(models), blobs

    def no_secret_in_store(self) -> None:
        for p in (self.d.cache_dir / "blobs").rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), p

    def legit_client(self) -> Any:
        return pb_grpc.CacheStub(grpc.insecure_channel(f"unix://{self.d.socket_dir / 'weightcache.sock'}"))

    def stop(self) -> None:
        assert self.d.stop() == 0, self.d.log_text()[-3000:]


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Any:
    if os.geteuid() != 0:
        pytest.skip("needs root: a daemon uid and an attacker uid")
    base = Path(tempfile.mkdtemp(prefix="wc-src-", dir="/tmp"))
    os.chmod(base, 0o755)
    cfg = getattr(request, "param", {})
    n = Node(base, **cfg)
    yield n
    n.d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _secs(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['seconds']:.1f}" for r in results)


def _ensure(stub: Any, model: str, name: str = "", include: tuple[str, ...] = ()) -> pb.Manifest:
    last: pb.EnsureResponse | None = None
    for ev in stub.Ensure(pb.EnsureRequest(model=model, name=name, include=list(include)), timeout=120):
        last = ev
    assert last is not None
    return last.manifest


@root_only
def test_uri_tricks_cannot_read_outside_the_allowed_prefix(node: Node, report: Any) -> None:
    m = node.models
    before = node.state()
    tricks = [
        (f"file://{m}/../run/", ["weightcached.toml"]),
        (f"file://{m}/%2e%2e/run/", ["weightcached.toml"]),
        (f"file://{m}/%2E%2e/run/", ["*"]),
        (f"file://{m}/tiny/%2e%2e/%2e%2e/run/", ["*"]),
        (f"file://{m}%2f..%2frun/", ["*"]),
        (f"file://{m}/%252e%252e/run/", ["*"]),
        (f"file://{m}//..//run/", ["*"]),
        (f"file://{m}/./tiny/../../run/", ["*"]),
        (f"file://{m}/tiny/?../../run/", ["*"]),
        (f"file://{m}/tiny/#/../../run/", ["*"]),
        (f"file://{m}/tiny/sub/", ["*"]),  # '*' does not cross '/'
        (f"file://{m.parent}/run/", ["*"]),
        (f"file://{m.parent}/", ["*"]),
    ]
    out = node.attack(f"print(json.dumps([ensure(u, include=i) for u, i in {tricks!r}]))")
    for (uri, _), res in zip(tricks, out, strict=True):
        assert res["code"] in ("INVALID_ARGUMENT", "PERMISSION_DENIED"), (uri, res)
        assert res["details"] and SECRET not in res["details"], (uri, res)
    assert node.state() == before
    node.no_secret_in_store()
    # a legitimate client is still served, through any spelling of an allowed URI
    legit = node.legit_client()
    a = _ensure(legit, f"file://{m}/tiny/")
    b = _ensure(legit, f"file://{m}//./%74iny")
    assert a.snapshot_id == b.snapshot_id and len(a.files) == 5
    report(
        "hostile requests",
        f"a second uid: {len(tricks)} file:// URIs against a client_sources glob ('..', %2e%2e, %252e, %2f, "
        "'//', query, fragment, deeper paths) aiming at the daemon's 0600 config",
        "each INVALID_ARGUMENT or PERMISSION_DENIED naming the rule; secret never served; store unchanged",
        "",
    )


@root_only
def test_links_and_fifos_in_a_model_directory_are_refused_and_nothing_hangs(node: Node, report: Any) -> None:
    m = node.models
    outside = node.base / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"secret": SECRET}))
    shutil.copytree(m / "tiny", m / "leaf-link")
    (m / "leaf-link" / "config.json").unlink()
    (m / "leaf-link" / "config.json").symlink_to(node.conf)
    shutil.copytree(m / "tiny", m / "dir-link")
    (m / "dir-link" / "extra").symlink_to(outside)
    (m / "alias").symlink_to(outside)  # the allowed name itself is a link
    shutil.copytree(m / "tiny", m / "fifo")
    (m / "fifo" / "tokenizer.json").unlink()
    os.mkfifo(m / "fifo" / "tokenizer.json")
    for p in (m / "fifo" / "tokenizer.json",):
        os.chmod(p, 0o644)
    before = node.state()
    cases = [f"file://{m}/leaf-link/", f"file://{m}/dir-link/", f"file://{m}/alias/", f"file://{m}/fifo/"]
    # a deadline per request (120 s in the attacker), and the whole run bounded: a FIFO that was
    # opened for reading without O_NONBLOCK would never return
    out = node.attack(f"print(json.dumps([ensure(u, include=['*']) for u in {cases!r}]))", timeout=300)
    for uri, res in zip(cases, out, strict=True):
        assert res["code"] == "INVALID_ARGUMENT", (uri, res)
        assert SECRET not in json.dumps(res)
    assert "config.json is a symbolic link" in out[0]["details"]
    assert "extra is a symbolic link" in out[1]["details"]
    assert "alias is a symbolic link" in out[2]["details"]
    assert "tokenizer.json is a FIFO" in out[3]["details"]
    assert node.state() == before
    node.no_secret_in_store()
    # the admin gets the same answer (sources never follow links, whoever asks)
    r = node.d.ctl("prefetch", f"file://{m}/leaf-link/", "--name", "x", check=False)
    assert r.returncode != 0 and "symbolic link" in r.stderr
    # still serving; gc runs; SIGTERM stops it promptly with nothing half-written
    assert len(_ensure(node.legit_client(), f"file://{m}/tiny/").files) == 5
    node.d.ctl("gc")
    t = time.monotonic()
    node.stop()
    stop_s = time.monotonic() - t
    assert not any((node.d.cache_dir / "ingest").iterdir())
    report(
        "hostile files",
        "a second uid: a model directory with a symlinked config.json (to the daemon's secret), a symlinked "
        "subdirectory, the allowed name itself a symlink, a FIFO among the files",
        "each INVALID_ARGUMENT naming the file (links never followed, only regular files opened, O_NONBLOCK); "
        "no thread blocked; gc and SIGTERM unaffected",
        f"SIGTERM to exit {stop_s:.1f} s",
    )


@root_only
def test_names_belong_to_whoever_created_them(node: Node, report: Any) -> None:
    m, d = node.models, node.d
    d.ctl("prefetch", f"file://{m}/tiny/", "--name", "llama", "--pin")
    d.ctl("prefetch", f"file://{m}/tiny/")  # default name "tiny"
    (d.root / "models.d" / "declared.toml").write_text(f'uri = "file://{m}/other/"\nname = "declared"\n')
    wait_for(lambda: "declared" in [x["name"] for x in d.ctl_json("ls")], 120, "the models.d model")
    before = node.state()
    out = node.attack(f"""
        m = {str(m)!r}
        print(json.dumps({{
            "repoint_admin": ensure(f"file://{{m}}/other/", name="llama"),
            "subset_of_admin": ensure(f"file://{{m}}/tiny/", name="llama", include=["config.json"]),
            "repoint_models_d": ensure(f"file://{{m}}/tiny/", name="declared"),
            "same_as_admin": ensure(f"file://{{m}}/tiny/", name="llama"),
            "unnamed_subset": ensure(f"file://{{m}}/tiny/", include=["config.json"]),
            "squat": ensure(f"file://{{m}}/tiny/", name="future", include=["config.json"]),
            "repoint_own": ensure(f"file://{{m}}/other/", name="future"),
        }}))
    """)
    for case in ("repoint_admin", "subset_of_admin", "repoint_models_d", "repoint_own"):
        assert out[case]["code"] == "PERMISSION_DENIED", (case, out[case])
        assert "clients may not re-point" in out[case]["details"]
    assert out["same_as_admin"]["code"] == "OK" and out["same_as_admin"]["files"] == 5
    # an unnamed subset gets a name of its own, never the admin's "tiny"
    unnamed = out["unnamed_subset"]
    assert unnamed["code"] == "OK" and unnamed["files"] == 1 and unnamed["name"].startswith("tiny-")
    after = node.state()
    kept = {x for x in after[0] if x[0] not in (unnamed["name"], "future")}
    assert sorted(kept) == before[0]  # llama (pinned), tiny, declared: untouched
    assert ("llama", before[0][[x[0] for x in before[0]].index("llama")][1], True, 5) in after[0]
    # the admin's prefetch wins over a squatted name: it re-points it, and its view is whole
    squatted = next(x for x in after[0] if x[0] == "future")
    assert squatted[3] == 1
    d.ctl("prefetch", f"file://{m}/other/", "--name", "future")
    future = d.ctl_json("show", "future")
    assert future["model"]["file_count"] == 5
    view = Path(future["model"]["path"])
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in (m / "other").iterdir())
    again = node.attack(f'print(json.dumps(ensure("file://{m}/tiny/", name="future", include=["config.json"])))')
    assert again["code"] == "PERMISSION_DENIED"
    legit = node.legit_client()  # and everyone else still gets the admin's models
    assert len(_ensure(legit, "llama").files) == 5 and len(_ensure(legit, "future").files) == 5
    report(
        "hostile requests",
        "a second uid: Ensure re-pointing an admin name (pinned), a models.d name, its own earlier name; "
        "an unnamed 1-file subset of an admin model; a name squatted ahead of an admin prefetch",
        "PERMISSION_DENIED for every re-point, pins kept; the unnamed subset gets its own derived name; "
        "the admin's prefetch re-points the squatted name and its view is complete",
        "",
    )


@root_only
def test_a_header_of_300k_empty_tensors_is_refused_while_others_are_served(node: Node, report: Any) -> None:
    m = node.models
    bomb = m / "bomb"
    bomb.mkdir()
    (bomb / "config.json").write_text("{}")
    header = {f"model.layers.{i}.w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(300_000)}
    raw = json.dumps(header).encode()
    (bomb / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    legit = node.legit_client()
    _ensure(legit, f"file://{m}/tiny/")
    before = node.state()
    rss0 = _status_kib(node.d.proc.pid, "VmRSS")
    answered: list[float] = []
    stop = threading.Event()

    def lister() -> None:
        while not stop.is_set():
            t = time.monotonic()
            resp = legit.List(pb.ListRequest(), timeout=120)  # generous: an answer is what is checked
            assert any(x.name == "tiny" for x in resp.models)
            answered.append(time.monotonic() - t)

    th = threading.Thread(target=lister, daemon=True)
    th.start()
    try:
        out = node.attack(f"print(json.dumps([ensure('file://{m}/bomb/') for _ in range(3)]))")
    finally:
        stop.set()
        th.join(timeout=150)
    assert not th.is_alive()
    for res in out:
        assert res["code"] == "INVALID_ARGUMENT" and "more than 131072 tensors" in res["details"], res
    assert answered, "List() of another client answered while the attacker's Ensure ran"
    assert node.state() == before
    peak_mib = (_status_kib(node.d.proc.pid, "VmHWM") - rss0) / 1024
    report(
        "hostile files",
        "a second uid: Ensure of a model whose header has 300,000 empty tensors (20 MB), three times, while "
        "another client calls List() in a loop",
        "INVALID_ARGUMENT (more than 131072 tensors) each time; every List() answered; store unchanged",
        f"refusals {_secs(out)} s; {len(answered)} List() calls, slowest {max(answered) * 1000:.0f} ms; "
        f"daemon peak RSS +{peak_mib:.0f} MiB",
    )


@root_only
def test_a_wide_model_is_manifested_off_the_event_loop(node: Node, report: Any) -> None:
    """Under the limits but big: 100,000 tensors. Its manifests are built in the client I/O
    pool, so another client's List() answers while they are being built."""
    m = node.models
    wide = m / "wide"
    wide.mkdir()
    (wide / "config.json").write_text("{}")
    _safetensors(wide / "model.safetensors", {f"model.layers.{i}.b": b"" for i in range(100_000)})
    node.d.ctl("prefetch", f"file://{wide}/", "--name", "wide", timeout=600)
    legit = node.legit_client()
    answered: list[float] = []
    stop = threading.Event()

    def lister() -> None:
        while not stop.is_set():
            t = time.monotonic()
            legit.List(pb.ListRequest(), timeout=120)
            answered.append(time.monotonic() - t)

    th = threading.Thread(target=lister, daemon=True)
    th.start()
    try:
        out = node.attack("print(json.dumps([{k: v for k, v in ensure('wide').items() if k != 'text'} "
                          "for _ in range(3)]))")  # fmt: skip
    finally:
        stop.set()
        th.join(timeout=150)
    assert all(r["code"] == "OK" for r in out), out
    assert answered
    report(
        "load",
        "a second uid: three Ensures of a 100,000-tensor model while another client calls List() in a loop",
        "manifests built in the client I/O pool; every List() answered",
        f"Ensure {_secs(out)} s; {len(answered)} List() calls, slowest {max(answered) * 1000:.0f} ms",
    )


@root_only
def test_query_and_spelling_variants_are_one_source(node: Node, report: Any) -> None:
    m, d = node.models, node.d
    d.ctl("prefetch", f"file://{m}/tiny/", "--name", "tiny")
    snap = d.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
    downloaded = d.ctl_json("stats")["bytes_downloaded"]
    spellings = [f"file://{m}/tiny", f"file://{m}//tiny//", f"file://{m}/./tiny/", f"file://{m}/%74iny/",
                 f"FILE://{m}/tiny/", f"file://localhost{m}/tiny/"]  # fmt: skip
    out = node.attack(f"print(json.dumps([ensure(u) for u in {spellings!r}]))")
    assert all(r["code"] == "OK" and r["snapshot"] == snap and r["name"] == "tiny" for r in out), out
    queries = [f"file://{m}/tiny/?v={i}" for i in range(5)] + [f"file://{m}/tiny/#{i}" for i in range(5)]
    out = node.attack(f"print(json.dumps([ensure(u) for u in {queries!r}]))")
    assert all(r["code"] == "INVALID_ARGUMENT" and "query strings" in r["details"] for r in out), out
    r = d.ctl("prefetch", f"file://{m}/tiny/?v=9", "--name", "q", check=False)
    assert r.returncode != 0 and "query strings" in r.stderr
    assert d.ctl_json("stats")["bytes_downloaded"] == downloaded
    assert [x["name"] for x in d.ctl_json("ls")] == ["tiny"]
    report(
        "hostile requests",
        f"a second uid: {len(spellings)} spellings of one file:// URI and {len(queries)} query/fragment variants",
        "spellings: one source key, the same snapshot, nothing read again; query/fragment: INVALID_ARGUMENT",
        "0 bytes downloaded again",
    )


@root_only
@pytest.mark.parametrize("node", [{"max_size": 6_200_000}], indirect=True)
def test_admission_never_evicts_blobs_the_download_reuses(node: Node, report: Any) -> None:
    """ "a" is two files of a source; the whole source is then ensured: it reuses a's 3 MB shard
    (same object, same version: not read again) and admits only its new 3 MB, which takes the
    cache past its watermark, so the least recently used model, "a", is evicted. Its blobs must
    stay: the running download references them."""
    m, d = node.models, node.d
    src = m / "ab"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model": "ab"}))
    _safetensors(src / "shared.safetensors", {"w": os.urandom(3_000_000)})
    _safetensors(src / "new.safetensors", {"v": os.urandom(3_000_000)})
    d.ctl("prefetch", f"file://{src}/", "--name", "a", "--include", "shared.safetensors", "--include", "config.json")
    read_before = int(d.ctl_json("stats").get("bytes_downloaded", 0))
    out = node.attack(f"print(json.dumps({{k: v for k, v in ensure('file://{src}/').items() if k != 'text'}}))")
    assert out["code"] == "OK" and out["files"] == 3, out
    assert int(d.ctl_json("stats")["bytes_downloaded"]) - read_before == (src / "new.safetensors").stat().st_size
    assert "a" not in [x["name"] for x in d.ctl_json("ls")]  # evicted to make room
    assert d.ctl("verify", out["name"], check=False).returncode == 0, d.ctl("verify", out["name"], check=False)
    # and the new model is usable: every byte of every file reads back as the source's
    legit = node.legit_client()
    for f in ("config.json", "shared.safetensors", "new.safetensors"):
        req = pb.ReadRangeRequest(snapshot_id=out["snapshot"], file=pb.FileRange(path=f))
        assert b"".join(c.data for c in legit.ReadRange(req, timeout=60)) == (src / f).read_bytes(), f
    report(
        "full disk",
        "capacity admission of a model that reuses a 3 MB blob of the least recently used model it must evict",
        "that model's name goes, the reused blob stays; the new model verifies and reads back byte for byte",
        "capacity 6.2 MB",
    )


@root_only
@pytest.mark.parametrize("node", [{"download": {"rate_limit": "256KiB", "concurrency": 2}}], indirect=True)
def test_reads_are_served_while_downloads_fill_every_job_slot(node: Node, report: Any) -> None:
    """Ten slow downloads (rate-limited: minutes each) take every download slot; a ReadRange of
    a cached file and a List() still answer, because downloads never run in the threads that
    serve clients."""
    m, d = node.models, node.d
    d.ctl("prefetch", f"file://{m}/tiny/", "--name", "tiny")
    sid = d.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
    slow = []
    for i in range(10):
        (m / f"slow{i}").mkdir()
        _safetensors(m / f"slow{i}" / "model.safetensors", {"w": os.urandom(4 << 20)})
        slow.append(f"file://{m}/slow{i}/")
    code = f"import threading\nfor u in {slow!r}:\n    threading.Thread(target=ensure, args=(u,)).start()\n"
    attacker = subprocess.Popen(_as_attacker(d, code), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd="/tmp")  # fmt: skip
    try:
        wait_for(lambda: int(d.ctl_json("stats").get("active_downloads", 0)) >= 8, 120, "8 downloads running")
        legit = node.legit_client()
        t = time.monotonic()
        req = pb.ReadRangeRequest(snapshot_id=sid, file=pb.FileRange(path="config.json"))
        data = b"".join(c.data for c in legit.ReadRange(req, timeout=60))  # generous; the downloads need minutes
        read_s = time.monotonic() - t
        assert data == (m / "tiny" / "config.json").read_bytes()
        assert any(x.name == "tiny" for x in legit.List(pb.ListRequest(), timeout=60).models)
        active = int(d.ctl_json("stats")["active_downloads"])
    finally:
        attacker.kill()
        attacker.wait()
        d.proc.kill()  # rate-limited threads sleep for their tokens; this case is not about shutdown
        d.proc.wait()
    report(
        "load",
        "a second uid starts 10 rate-limited downloads (every download slot busy for minutes); another client "
        "reads a cached file and lists",
        "ReadRange and List() answer: downloads run in their own pool, client reads in another",
        f"{active} downloads active; ReadRange {read_s * 1000:.0f} ms",
    )
