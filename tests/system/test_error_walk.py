"""The operator's walk: every cachectl command and public client call given a wrong input,
against real daemons, and the answer each gets. The answers are docs/errors.md: this test
renders the table from what the daemons said and fails when the committed file differs, so the
page cannot drift from the code. After changing a message, rewrite the page with

    WC_WRITE_ERRORS_MD=1 python -m pytest -q tests/system/test_error_walk.py

and read the diff: every answer should name the input, the rule and the fix.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import make_model, toml_text, wait_for, write_config

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "errors.md"
HEADER = """# What a mistake gets

Every `cachectl` command and public client call, given a wrong input, and the answer it gets,
word for word (temporary paths shown as `<tmp>`, ids as `<snapshot>`). Each answer should
name the input, the rule and the fix; one that does not is a bug.

This page is generated: `tests/system/test_error_walk.py` runs each case against real daemons and
fails when this file differs from what they said. After changing a message, rewrite it with
`WC_WRITE_ERRORS_MD=1 python -m pytest -q tests/system/test_error_walk.py`.

The daemons: one with the developer default allow-list (`client_sources = ["*"]`), one whose
clients may fetch only from `s3://models-bucket/**`, and one with `max_size` of 10 000 bytes.
`tiny` is a cached model (admin-named, pinned); `<tmp>/models/...` are directories on the node:
`tiny` a model, `tokenizer-only` its files without the weights, `parent` a directory holding a
model in `parent/llama/`, `linked` a directory of links to a model's files. A fourth daemon
declares tenants `a` and `b`: `private` is a model tenant `a` downloaded for itself, which
tenant `b` must find exactly as it finds a model that does not exist.
"""


class Walk:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rows: list[tuple[str, str, str]] = []

    def clean(self, text: str) -> str:
        text = text.replace(str(self.tmp), "<tmp>")
        text = re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", text)
        text = re.sub(r"\b[0-9a-f]{32}\b", "<snapshot>", text)
        text = re.sub(r"pid \d+", "pid <pid>", text)
        return " ".join(text.split())

    def add(self, surface: str, given: str, answer: str) -> None:
        self.rows.append((surface, self.clean(given), self.clean(answer)))

    def ctl(self, d: Any, *args: str, env: dict[str, str] | None = None) -> None:
        env = dict(env or d.env, COLUMNS="100")  # argparse wraps its usage line to the terminal's width
        r = subprocess.run(["cachectl", *args], capture_output=True, text=True, env=env, timeout=120,
                           stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode != 0, (args, r.stdout)
        said = r.stdout if "--json" in args else r.stderr  # under --json the error is the stdout document
        self.add("cachectl", "cachectl " + " ".join(args), f"{said.strip()} (exit {r.returncode})")

    def call(self, given: str, fn: Callable[[], Any]) -> None:
        import weightcache

        with pytest.raises(weightcache.WeightcacheError) as e:
            fn()
        self.add("client", given, f"{type(e.value).__name__}: {e.value}")

    def render(self) -> str:
        def cell(s: str) -> str:
            return s.replace("|", "\\|")

        lines = [HEADER, "| surface | input | answer |", "|---|---|---|"]
        lines += [f"| {a} | `{cell(b)}` | {cell(c)} |" for a, b, c in self.rows]
        return "\n".join(lines) + "\n"


def _dirs(tmp: Path, tiny_model: Path) -> dict[str, Path]:
    """The wrong directories an operator points at, under <tmp>/models/."""
    models = tmp / "models"
    tok = models / "tokenizer-only"
    tok.mkdir(parents=True)
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tok / f.name)
    shutil.copytree(tiny_model, models / "parent" / "llama")
    linked = models / "linked"
    linked.mkdir()
    for f in tiny_model.iterdir():
        (linked / f.name).symlink_to(f)
    shutil.copytree(tiny_model, models / "tiny")
    make_model(models / "big", tiny=False, size=4 << 20, shards=1)
    return {"tok": tok, "parent": models / "parent", "linked": linked, "tiny": models / "tiny", "big": models / "big"}


def test_every_wrong_input_gets_an_answer_that_names_the_rule(daemon_factory: Any, tiny_model: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    import weightcache

    w = Walk(tmp_path)
    dirs = _dirs(tmp_path, tiny_model)
    d = daemon_factory("dev")
    narrow = daemon_factory("narrow", client_sources=["s3://models-bucket/**"])
    small = daemon_factory("small", max_size=10_000)
    tiny = f"file://{dirs['tiny']}/"
    d.ctl("prefetch", tiny, "--name", "tiny", "--pin")
    narrow.ctl("prefetch", tiny, "--name", "tiny", "--pin")

    # ---- cachectl
    w.ctl(d, "ls", env=dict(d.env, WEIGHTCACHE_ADMIN_SOCKET=str(tmp_path / "no-daemon" / "admin.sock")))
    w.ctl(d, "show")
    w.ctl(d, "show", "llama")
    w.ctl(d, "show", str(dirs["tiny"]))
    w.ctl(d, "prefetch", str(dirs["tiny"]))
    w.ctl(d, "prefetch", "ftp://host/llama/")
    w.ctl(d, "prefetch", "file:///models/../etc/")
    w.ctl(d, "prefetch", f"file://{tmp_path}/models/nowhere/")
    w.ctl(d, "prefetch", f"file://{dirs['tok']}/")
    w.ctl(d, "prefetch", f"file://{dirs['parent']}/")
    w.ctl(d, "prefetch", f"file://{dirs['linked']}/")
    w.ctl(d, "prefetch", tiny, "--name", "my model")
    w.ctl(d, "prefetch", tiny, "--include", "*.bin")
    w.ctl(small, "prefetch", tiny, "--name", "too-big")
    w.ctl(d, "evict")
    w.ctl(d, "evict", "llama")
    w.ctl(d, "evict", "tiny")
    w.ctl(d, "pin", "llama")
    w.ctl(d, "verify", "llama")
    w.ctl(d, "show", "llama", "--json")
    # Ctrl-C mid-prefetch: the command ends, the download goes on in the daemon.
    slow = daemon_factory("slow", download={"rate_limit": 200_000})
    big = f"file://{dirs['big']}/"
    p = subprocess.Popen(["cachectl", "prefetch", big, "--name", "big"], env=slow.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: bool(slow.ctl_json("ls", "--downloads")), 120, "the download to start")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    w.add("cachectl", f"cachectl prefetch {big} --name big, then Ctrl-C", f"{err.strip()} (exit {p.returncode})")
    assert p.returncode == 130 and "goes on downloading" in err, err
    assert [x["name"] for x in slow.ctl_json("ls", "--downloads")] == ["big"]  # as the message says

    # ---- the client library
    w.call("weightcache.connect('<tmp>/no-daemon')", lambda: weightcache.connect(tmp_path / "no-daemon"))
    w.call("weightcache.connect(3)", lambda: weightcache.connect(3))  # type: ignore[arg-type]
    with weightcache.connect(d.socket_dir) as c:
        w.call("client.open('')", lambda: c.open(""))
        w.call("client.open('llama')", lambda: c.open("llama"))
        w.call("client.open(Path('/models/tiny'))", lambda: c.open(dirs["tiny"]))  # type: ignore[arg-type]
        w.call("client.open('/models/tiny')", lambda: c.open(str(dirs["tiny"])))
        w.call("client.open('./tiny')", lambda: c.open("./tiny"))
        w.call("client.ensure(42)", lambda: c.ensure(42))  # type: ignore[arg-type]
        w.call("client.ensure(URI, include='*.safetensors')",
               lambda: c.ensure(tiny, include="*.safetensors"))  # type: ignore[arg-type]  # fmt: skip
        w.call("client.open('file:///models/linked/')", lambda: c.open(f"file://{dirs['linked']}/"))
        w.call("client.open('file:///models/tokenizer-only/')", lambda: c.open(f"file://{dirs['tok']}/"))
        w.call("client.ensure('file:///models/parent/llama/', name='tiny')",
               lambda: c.ensure(f"file://{dirs['parent']}/llama/", name="tiny"))  # fmt: skip
        w.call("client.read_range('nope', 'config.json')", lambda: c.read_range("nope", "config.json"))
        with c.open("tiny") as m:
            w.call("model.get_tensor('model.layers.0.mlp.up_proj')",
                   lambda: m.get_tensor("model.layers.0.mlp.up_proj"))  # fmt: skip
            w.call("model.stream('gpu')", lambda: list(m.stream("gpu")))
            w.call("model.stream('cpu', prefetch=0)", lambda: list(m.stream("cpu", prefetch=0)))
    with weightcache.connect(narrow.socket_dir) as c:
        w.call("client.open('/models/tiny') (narrow allow-list)", lambda: c.open(str(dirs["tiny"])))
        w.call("client.open('s3://elsewhere/llama/') (narrow allow-list)", lambda: c.open("s3://elsewhere/llama/"))
    _another_tenants_model(w, daemon_factory, tmp_path, tiny)
    stopped = daemon_factory("stopped")
    with weightcache.connect(stopped.socket_dir) as c:
        stopped.stop()
        w.call("client.list() (the daemon stopped)", c.list)

    page = w.render()
    if os.environ.get("WC_WRITE_ERRORS_MD"):
        PAGE.write_text(page)
    assert PAGE.read_text() == page, (
        "docs/errors.md differs from what the daemons answered; rewrite it with WC_WRITE_ERRORS_MD=1 "
        "python -m pytest -q tests/system/test_error_walk.py and read the diff"
    )


def _another_tenants_model(w: Walk, daemon_factory: Any, tmp_path: Path, tiny: str) -> None:
    """Tenant b asks for tenant a's private model, by name and by snapshot id: the answer must be
    word for word the one for a model that does not exist (nothing tells b the name is taken)."""
    import weightcache

    root = tmp_path / "tenants"
    root.mkdir()
    cfg = write_config(root / "weightcached.toml", None)
    tenants = [{"name": "a", "socket_dir": str(root / "sock"), "client_sources": ["file:///**"]},
               {"name": "b", "socket_dir": str(root / "sock-b"), "client_sources": ["file:///**"]}]  # fmt: skip
    with open(cfg, "a") as f:
        f.write(toml_text({}, None, {"tenants": tenants}))
    daemon_factory("tenants", config=cfg)
    with weightcache.connect(root / "sock") as a:
        snapshot = a.ensure(tiny, name="private").snapshot_id
    absent = "0123456789abcdef0123456789abcdef"  # a well-formed snapshot id no model has
    with weightcache.connect(root / "sock-b") as b:
        for given, ref, missing in (
            ("client.open('private') (tenant b; tenant a's private model)", "private", "nothing-here"),
            ("client.open(SNAPSHOT) (tenant b; tenant a's private model, by snapshot id)", snapshot, absent),
        ):
            with pytest.raises(weightcache.WeightcacheError) as taken:
                b.open(ref)
            with pytest.raises(weightcache.WeightcacheError) as free:
                b.open(missing)
            assert type(taken.value) is type(free.value), (taken.value, free.value)
            assert str(taken.value).replace(ref, missing) == str(free.value), (taken.value, free.value)
            w.call(given, lambda ref=ref: b.open(ref))
