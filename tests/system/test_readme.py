"""The README's quick start, run as written.

The daemon is started with the README's own command (`weightcached`, no flags, no config);
only the environment points its store and sockets into a temp directory (the same
`WEIGHTCACHE_*` variables a user could set), so the test never touches the machine's real
defaults. The quick-start block is then run by bash, line for line, from the repository root,
except `pip install` lines: the suite runs from an environment that already has them.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    m = re.search(r"<!-- quickstart:start -->\s*```sh\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    assert m, "README.md has no quick-start block between the quickstart markers"
    return m.group(1)


def _setup_daemon_command() -> list[str]:
    """The command after `&&` in the README's install-and-run line."""
    text = README.read_text()
    m = re.search(r"pip install -e '\.\[daemon\]' && (weightcached[^\n`]*)", text)
    assert m, "README.md no longer shows `pip install -e '.[daemon]' && weightcached`"
    return m.group(1).split()


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTCACHE_", "XDG_"))}
    env.update(
        HOME=str(home),
        WEIGHTCACHE_CACHE_DIR=str(tmp_path / "store"),
        WEIGHTCACHE_SOCKET_DIR=str(tmp_path / "sock"),
        WEIGHTCACHE_ADMIN_SOCKET=str(tmp_path / "admin" / "admin.sock"),
        WEIGHTCACHE_LOG_FORMAT="json",
    )
    log = tmp_path / "daemon.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(_setup_daemon_command(), env=env, stdout=lf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["cachectl", "health"], env=env, capture_output=True, timeout=60).returncode != 0:
            assert proc.poll() is None, f"weightcached exited with {proc.returncode}:\n{log.read_text()}"
            if time.monotonic() > deadline:
                pytest.fail(f"weightcached did not become healthy in 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        script = "\n".join(line for line in _quickstart().splitlines() if not line.lstrip().startswith("pip "))
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 0, f"quick start failed:\n{r.stdout}\n{r.stderr}\n{log.read_text()}"
        # what a reader is told to expect: the model listed, then opened with its 21 tensors
        assert "tiny-llama" in r.stdout
        snapshot, count, word = r.stdout.strip().splitlines()[-2].split()
        assert (count, word) == ("21", "tensors") and len(snapshot) >= 12
        first = r.stdout.strip().splitlines()[-1]
        tensor_bytes = _first_bytes(home / "tiny-llama", "model.embed_tokens.weight", 8)
        assert first == tensor_bytes.hex()
        # The README's client example, `weightcache.transformers.from_pretrained`, on that model:
        # config, tokenizer and weights from the cache, then a forward pass.
        r = subprocess.run([sys.executable, "-c", CLIENT_EXAMPLE], env=env, capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{log.read_text()}"
        assert r.stdout.split() == ["LlamaForCausalLM", "[1,", "4,", "32]"], r.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)


CLIENT_EXAMPLE = """
import torch
import weightcache.transformers

with weightcache.transformers.from_pretrained("tiny-llama") as loaded:
    ids = loaded.tokenizer("hello world the model", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[21, 22, 3, 13]], ids  # words of the tokenizer, none unknown
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert torch.isfinite(logits).all()
    print(type(loaded.model).__name__, list(logits.shape))
"""


def test_the_quick_start_tokenizer_is_the_tokenizers_librarys_own_format(tmp_path: Path) -> None:
    """tools/make_model.py writes tokenizer.json by hand (the quick start has no `tokenizers`):
    the library reads it and writes back the same document."""
    tokenizers = pytest.importorskip("tokenizers")
    from harness import make_model

    path = make_model(tmp_path / "tiny-llama") / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(path))
    assert json.loads(tok.to_str()) == json.loads(path.read_text())
    assert tok.encode("hello world .").ids == [21, 22, 31] and tok.get_vocab_size() == 32


def _first_bytes(model_dir: Path, name: str, n: int) -> bytes:
    """The first bytes of one tensor, read straight from the generated files (header, then offsets)."""
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
            if name in header:
                fh.seek(8 + hlen + header[name]["data_offsets"][0])
                return fh.read(n)
    raise AssertionError(f"{name} not in {model_dir}")
