"""An operator's first hour: mistakes a new operator makes, each against a real daemon."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
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


# ---------------------------------------------------------------- --json: one shape, errors included


def _walk_numbers(doc: Any, path: str = "") -> list[str]:
    """Paths of every string that is all digits: an integer that came out as a string."""
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _walk_numbers(v, f"{path}.{k}")]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in _walk_numbers(v, f"{path}[{i}]")]
    return [path] if isinstance(doc, str) and doc.isdigit() else []


def test_json_numbers_are_numbers_in_every_listing(daemon: Any, tiny_model: Path) -> None:
    pre = daemon.ctl_json("prefetch", f"file://{tiny_model}/", "--name", "tiny")
    assert isinstance(pre["size"], int) and pre["size"] > 0
    docs = {
        "prefetch": pre,
        "ls": daemon.ctl_json("ls"),
        "show": daemon.ctl_json("show", "tiny", "--tensors"),
        "stats": daemon.ctl_json("stats"),
        "pin": daemon.ctl_json("pin", "tiny"),
        "unpin": daemon.ctl_json("unpin", "tiny"),
        "verify": daemon.ctl_json("verify"),
        "gc": daemon.ctl_json("gc", "--dry-run"),
        "evict": daemon.ctl_json("evict", "tiny", "--dry-run"),
    }
    for command, doc in docs.items():
        assert _walk_numbers(doc) == [], (command, _walk_numbers(doc))
    show = docs["show"]
    assert all(isinstance(f["size"], int) for f in show["manifest"]["files"])
    assert all(isinstance(t["offset"], int) for t in show["manifest"]["tensors"])
    assert show["download"] is None  # an absent part is null, present in the shape all the same
    assert isinstance(docs["stats"]["logical_bytes"], int) and isinstance(docs["evict"]["bytes_freed"], int)
    # 2 layers make 4 layer groups (embed, layers.0, layers.1, rest): the text says which it counts
    assert "tensors (21 in 4 layer groups):" in daemon.ctl("show", "tiny", "--tensors").stdout


def test_json_errors_are_one_document_on_stdout(daemon: Any, tmp_path: Path) -> None:
    cases = [
        (["show", "no-such-model"], "NOT_FOUND", 1),
        (["prefetch", "ftp://host/x/"], "INVALID_ARGUMENT", 2),
        (["evict"], "INVALID_ARGUMENT", 2),
        (["show"], "USAGE", 2),  # argparse's own complaint, in the same shape
    ]
    for args, code, status in cases:
        r = daemon.ctl(*args, "--json", check=False)
        assert r.returncode == status, (args, r.stdout, r.stderr)
        assert r.stderr == "", (args, r.stderr)
        err = json.loads(r.stdout)["error"]
        assert err["code"] == code, (args, err)
        assert set(err) == {"code", "type", "message", "command"} and err["command"] == args[0]
        assert err["message"]
    env = dict(daemon.env, WEIGHTCACHE_ADMIN_SOCKET=str(tmp_path / "nothing.sock"))
    r = subprocess.run(["cachectl", "ls", "--json"], env=env, capture_output=True, text=True, timeout=120)
    err = json.loads(r.stdout)["error"]
    assert (
        r.returncode == 1 and err["code"] == "DAEMON_UNAVAILABLE" and str(tmp_path / "nothing.sock") in err["message"]
    )


# ---------------------------------------------------------------- | head


def test_a_reader_that_stops_early_gets_no_traceback(daemon: Any, tiny_model: Path) -> None:
    daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
    for args in (["show", "tiny", "--tensors"], ["doctor", "--json"], ["ls"], ["show", "tiny", "--tensors", "--json"]):
        # `| head -c1`: the reader takes one byte and goes; a large output is still being written.
        p = subprocess.Popen(["cachectl", *args], env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        p.stdout.read(1)
        p.stdout.close()
        err = p.stderr.read().decode()
        p.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err, (args, err)
        assert p.returncode in (0, 1, 141), (args, p.returncode)  # 141: ended by the closed pipe


# ---------------------------------------------------------------- verify names the models


def test_verify_names_every_model_that_shares_a_bad_blob(daemon: Any, tiny_model: Path) -> None:
    for name in ("alpha", "beta", "gamma"):
        daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", name)
    view = Path(daemon.ctl_json("show", "alpha")["manifest"]["path"])
    blob = (view / "config.json").resolve()
    blob.chmod(0o644)
    data = blob.read_bytes()
    blob.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes
    r = daemon.ctl("verify", check=False)
    assert r.returncode == 1
    line = next(x for x in r.stdout.splitlines() if blob.name in x)
    assert "alpha, beta, gamma" in line and "config.json" in line, r.stdout
    assert "verify --repair" in r.stdout
    r = daemon.ctl("verify", "--json", check=False)  # quarantined now: a missing blob, still named with its models
    assert r.returncode == 1 and json.loads(r.stdout)["damaged"] == [
        {"sha256": blob.name, "models": ["alpha", "beta", "gamma"], "paths": ["config.json"]}
    ]


# ---------------------------------------------------------------- a path where a reference belongs


def test_opening_a_path_names_its_uri_and_whether_this_client_may_fetch_it(
    daemon_factory: Any, tiny_model: Path
) -> None:
    import weightcache

    narrow = daemon_factory("narrow", client_sources=["s3://elsewhere/**"])
    with weightcache.connect(narrow.socket_dir) as c, pytest.raises(weightcache.NotFoundError) as e:
        c.open(str(tiny_model))
    msg = str(e.value)
    assert "is not in the cache" in msg and f"file://{tiny_model}/" in msg, msg
    assert "may not fetch" in msg and "client_sources" in msg and "cachectl prefetch" in msg, msg
    wide = daemon_factory("wide")  # the developer default allows every URI
    with weightcache.connect(wide.socket_dir) as c, pytest.raises(weightcache.NotFoundError) as e:
        c.open(str(tiny_model))
    assert f"file://{tiny_model}/" in str(e.value) and "which this caller may fetch" in str(e.value)
    with weightcache.connect(wide.socket_dir) as c, pytest.raises(weightcache.NotFoundError, match="relative path"):
        c.open("./tiny-llama")
    r = wide.ctl("prefetch", str(tiny_model), check=False)  # the admin typed a path too
    assert r.returncode == 2 and f"file://{tiny_model}/" in r.stderr, r.stderr
    r = wide.ctl("show", str(tiny_model), check=False)  # and cachectl show gets open()'s hint
    assert r.returncode == 1 and "NotFoundError" in r.stderr and f"file://{tiny_model}/" in r.stderr, r.stderr


def test_wrong_python_types_are_named_with_the_fix(daemon: Any, tiny_model: Path) -> None:
    import weightcache

    with weightcache.connect(daemon.socket_dir) as c:
        with pytest.raises(weightcache.InvalidInputError, match=r"path object.*file://"):
            c.open(tiny_model)  # type: ignore[arg-type]
        with pytest.raises(weightcache.InvalidInputError, match="a model reference is a str"):
            c.ensure(42)  # type: ignore[arg-type]
        with pytest.raises(weightcache.InvalidInputError, match=r"list of glob strings"):
            c.ensure(f"file://{tiny_model}/", include="*.safetensors")  # type: ignore[arg-type]
    with pytest.raises(weightcache.InvalidInputError, match="socket_dir"):
        weightcache.connect(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- what a model directory holds


def test_a_directory_without_weights_at_its_root_is_refused_with_the_rule(daemon: Any, tiny_model: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    import shutil

    no_weights = tmp_path / "tokenizer-only"
    no_weights.mkdir()
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    r = daemon.ctl("prefetch", f"file://{no_weights}/", check=False)
    assert r.returncode == 2, r.stderr
    assert "no safetensors weights" in r.stderr and "at its root" in r.stderr and "config.json" in r.stderr
    assert "--include '*'" in r.stderr  # the opt-in, named
    parent = tmp_path / "parent"
    shutil.copytree(tiny_model, parent / "sub")
    r = daemon.ctl("prefetch", f"file://{parent}/", check=False)
    assert r.returncode == 2 and "only under sub/" in r.stderr and f"file://{parent}/sub/" in r.stderr, r.stderr
    assert daemon.ctl_json("ls") == []  # nothing published
    # the opt-in: files named by the caller are taken as named
    got = daemon.ctl_json("prefetch", f"file://{no_weights}/", "--include", "*", "--name", "tok")
    assert got["file_count"] == len(list(no_weights.iterdir()))
    # a model directory, and a diffusers-style pipeline (components in folders, model_index.json at the root)
    daemon.ctl("prefetch", f"file://{tiny_model}/")
    (parent / "model_index.json").write_text('{"sub": ["transformers", "LlamaModel"]}')
    assert daemon.ctl_json("prefetch", f"file://{parent}/", "--name", "pipe")["file_count"] > 1


# ---------------------------------------------------------------- a Hugging Face cache snapshot


def _hf_repo(hub: Path, repo: str, model: Path) -> tuple[Path, dict[str, str]]:
    """A Hugging Face cache repository as huggingface_hub lays it out: the bytes in blobs/, a
    snapshot of relative links into them. Returns (repo folder, relpath -> blob name)."""
    import hashlib
    import shutil

    root = hub / repo
    (root / "blobs").mkdir(parents=True)
    names = {}
    for f in sorted(model.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / digest)
        names[f.name] = digest
    return root, names


def _snapshot(repo: Path, rev: str, links: dict[str, str]) -> Path:
    snap = repo / "snapshots" / rev
    for rel, target in links.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(target)
    return snap


def test_an_admin_prefetches_a_hugging_face_cache_snapshot_and_nothing_else_is_followed(
    daemon: Any, tiny_model: Path, tmp_path: Path
) -> None:
    import weightcache

    hub = tmp_path / "hub"
    repo, blobs = _hf_repo(hub, "models--org--tiny", tiny_model)
    other, other_blobs = _hf_repo(hub, "models--other--x", tiny_model)
    good = {rel: f"../../blobs/{d}" for rel, d in blobs.items()}
    snap = _snapshot(repo, "abc123", {**good, "extra/notes.json": f"../../../blobs/{blobs['config.json']}"})
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    (repo / "blobs" / "is-a-link").symlink_to(secret)
    (hub / "models--org--linkedblobs").mkdir()
    (hub / "models--org--linkedblobs" / "blobs").symlink_to(other / "blobs")
    (tmp_path / "hub-link").symlink_to(hub)
    hostile = {
        "another repository's blob": (repo, {"config.json": f"../../../models--other--x/blobs/{other_blobs['config.json']}"}),
        "an absolute link": (repo, {"config.json": str(secret)}),
        "'..' after blobs/": (repo, {"config.json": f"../../blobs/../../../{secret.name}"}),
        "a blob that is itself a link": (repo, {"config.json": "../../blobs/is-a-link"}),
        "a link to another snapshot's link": (repo, {"config.json": "../abc123/config.json"}),
        "one '..' too many": (repo, {"config.json": f"../../../blobs/{blobs['config.json']}"}),
        "a repository whose blobs/ is a link": (hub / "models--org--linkedblobs", {}),
    }  # fmt: skip
    for i, (what, (where, bad)) in enumerate(hostile.items()):
        links = {**good, **bad} if where == repo else {rel: f"../../blobs/{d}" for rel, d in other_blobs.items()}
        s = _snapshot(where, f"evil{i}", links)
        r = daemon.ctl("prefetch", f"file://{s}/", "--name", f"evil{i}", check=False)
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert "symbolic link" in r.stderr and "cp -rL" in r.stderr, (what, r.stderr)
    r = daemon.ctl("prefetch", f"file://{tmp_path}/hub-link/models--org--tiny/snapshots/abc123/", check=False)
    assert r.returncode == 2 and "hub-link is a symbolic link" in r.stderr, r.stderr  # a link on the way
    assert daemon.ctl_json("ls") == []
    # a client's request never follows a link, and is told who can
    with weightcache.connect(daemon.socket_dir) as c, pytest.raises(weightcache.InvalidInputError) as e:
        c.ensure(f"file://{snap}/")
    assert "never follows links" in str(e.value) and f"cachectl prefetch file://{snap}/" in str(e.value)
    # the real thing, by an admin
    got = daemon.ctl_json("prefetch", f"file://{snap}/", "--name", "tiny-hf")
    assert got["file_count"] == len(blobs) + 1
    with weightcache.connect(daemon.socket_dir) as c, c.open("tiny-hf") as m, c.open(f"file://{snap}/") as same:
        assert len(m.keys()) == 21 and m.snapshot_id == same.snapshot_id  # clients use what the admin cached
        assert (Path(m.path) / "extra" / "notes.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert secret.read_text() == '{"secret": true}'


def test_other_links_are_refused_with_what_to_do(daemon: Any, tiny_model: Path, tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in tiny_model.iterdir():
        (linked / f.name).symlink_to(f)
    r = daemon.ctl("prefetch", f"file://{linked}/", check=False)
    assert r.returncode == 2 and "is a symbolic link" in r.stderr, r.stderr
    assert "cp -rL" in r.stderr and "hf download" in r.stderr and "models--ORG--NAME/snapshots" in r.stderr


def test_a_full_filesystem_is_named_with_what_to_do(daemon_factory: Any, tmp_path: Path) -> None:
    """A real small filesystem (tmpfs) under the store, not only a --max-size."""
    from harness import make_model

    store = tmp_path / "small-store"
    store.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(store)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        big = make_model(tmp_path / "big", tiny=False, size=3 << 20, shards=1)
        d = daemon_factory("full", cache_dir=store)
        r = d.ctl("prefetch", f"file://{big}/", "--name", "big", check=False)
        assert r.returncode == 1 and "ExhaustedError" in r.stderr, r.stderr
        assert "of the filesystem" in r.stderr and "free the filesystem" in r.stderr, r.stderr
        assert d.ctl_json("ls") == [] and not any((store / "ingest").iterdir())
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)
