"""vLLM's CPU build, for real: greedy token ids of a tiny Llama (random weights, a tokenizer
trained here) are the same from the original directory, from Model.path in a socket-only
container, through the ``weightcache`` load format, and from the cold-node launcher streaming
from S3.

vLLM's CPU wheel pins its own transformers and numpy, so it lives in a venv of its own
(``.venv-vllm``, built by ``.ci/run``; ``WEIGHTCACHE_VLLM_PYTHON`` names another); each test
runs vLLM there as a subprocess. Without that venv the tests skip on a development machine, and
fail under CI (CI=true) or when WEIGHTCACHE_VLLM_PYTHON names an interpreter that is not there. Each test starts one vLLM (a minute or more on a small machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, start_daemon, upload_dir, wait_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import weightcache  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "vllm_run.py"
PROMPT = "hello world the cache shares pages"
WORDS = ["hello", "world", "the", "cache", "shares", "pages", "between", "containers"]
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"]
# What fits vLLM's CPU build on a 2-core machine: 1 GiB of KV cache, no thread pinning.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_HOST_IP": "127.0.0.1"}
DEADLINE = 900  # vLLM's start-up is mostly imports in three processes: minutes on a loaded machine


@pytest.fixture(scope="module")
def vllm_python() -> str:
    configured = os.environ.get("WEIGHTCACHE_VLLM_PYTHON")
    python = Path(configured) if configured else ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        why = f"vLLM's Python {python} does not exist: .ci/run builds it (or set WEIGHTCACHE_VLLM_PYTHON)"
        if configured or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    r = subprocess.run(
        [str(python), "-c", "import vllm, weightcache.vllm, weightcache; print(weightcache.__file__)"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, f"{python} cannot import vllm and weightcache.vllm:\n{r.stderr[-3000:]}"
    assert Path(r.stdout.strip()).is_relative_to(ROOT), f"{python} imports weightcache from {r.stdout}, not {ROOT}"
    return str(python)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **VLLM_ENV, **extra}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-shaped, ~1 MB; head_dim 64 (vLLM's CPU attention supports 32 and up)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("vllm-hf") / "tiny-llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.5, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def wc(tmp_path_factory: pytest.TempPathFactory, s3: Any) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("wc-vllm"), s3, client_sources=["*"])
    yield d
    d.stop()


def _generate(python: str, out: Path, *args: str, prefix: list[str] | None = None) -> dict[str, Any]:
    r = subprocess.run(
        [*(prefix or []), python, str(RUNNER), "--prompt", PROMPT, "--out", str(out), *args],
        capture_output=True, text=True, timeout=DEADLINE, env=_env(),
    )  # fmt: skip
    assert r.returncode == 0, _why(r.stderr)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _why(log: str) -> str:
    """vLLM's log is long and its root cause is not at the end: the error lines, then the tail."""
    errors = [line for line in log.splitlines() if "Error" in line or "ERROR" in line]
    return "\n".join(errors[:40]) + "\n---- tail:\n" + log[-3000:]


@pytest.fixture(scope="module")
def reference(vllm_python: str, hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """vLLM on the original directory, with its default loader (engine and worker in one process)."""
    out = tmp_path_factory.mktemp("vllm-ref") / "ref.json"
    ids: list[int] = _generate(vllm_python, out, "--model", str(hf_model), "--single-process")["ids"]
    assert len(ids) == 8
    return ids


def _can_unshare() -> bool:
    return subprocess.run([*UNSHARE, "true"], capture_output=True).returncode == 0


def test_model_path_in_a_socket_only_container(
    vllm_python: str, reference: list[int], wc: Daemon, hf_model: Path, tmp_path: Path
) -> None:
    """LLM(model=Model.path) where the store and the original files are hidden, with vLLM's
    engine and worker processes (multiprocessing on) reading through the opener's /proc links;
    the script reads the path before it imports vLLM, and still exits."""
    if not _can_unshare():
        pytest.skip("unshare --mount is not permitted here (needs CAP_SYS_ADMIN)")
    with weightcache.connect(wc.socket_dir) as c:
        c.ensure(f"file://{hf_model}/", name="tiny-llama-ns")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = (
        f"mount -t tmpfs none {wc.cache_dir} && mount -t tmpfs none {hf_model.parent} && "
        f'exec "$@" --open tiny-llama-ns --socket-dir {wc.socket_dir}'
    )
    got = _generate(vllm_python, out_dir / "ns.json", prefix=[*UNSHARE, "sh", "-c", script, "sh"])
    assert got["pid"] < 10  # its own pid namespace, its own /proc
    assert "/weightcache-" in got["model"] and not got["model"].startswith(str(wc.cache_dir))
    assert got["ids"] == reference


def test_weightcache_load_format(
    vllm_python: str, reference: list[int], wc: Daemon, hf_model: Path, tmp_path: Path
) -> None:
    """--load-format weightcache: the plugin registered by our entry point in vLLM's engine and
    worker processes streams the weights from the daemon by snapshot id."""
    with weightcache.connect(wc.socket_dir) as c, c.open(f"file://{hf_model}/") as m:
        path = m.path  # waits for the committed snapshot, whose id is then the content id
        extra = json.dumps({"model": m.snapshot_id, "socket_dir": str(wc.socket_dir)})
        got = _generate(
            vllm_python, tmp_path / "lf.json", "--model", path, "--load-format", "weightcache", "--extra", extra
        )
    assert got["ids"] == reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_launcher_on_a_cold_node_streams_from_s3(
    vllm_python: str, reference: list[int], hf_model: Path, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """weightcache-vllm s3://...: vLLM starts while the daemon still downloads (throttled),
    the server's greedy tokens equal the reference, and the lease is held while it serves."""
    upload_dir(s3, bucket, "models/tiny-llama/", hf_model)
    uri = f"s3://{bucket}/models/tiny-llama/"
    size = sum(p.stat().st_size for p in hf_model.iterdir())
    d = start_daemon(tmp_path / "d", s3, client_sources=["*"],
                     download={"rate_limit": str(max(size // 20, 16 << 10)), "part_size": "1MiB"})  # fmt: skip
    port = _free_port()
    cmd = [sys.executable, "-m", "weightcache.vllm", uri, "--socket-dir", str(d.socket_dir), "--python", vllm_python,
           "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "tiny", "--dtype", "bfloat16",
           "--max-model-len", "128", "--max-num-seqs", "2", "--enforce-eager", "--seed", "0"]  # fmt: skip
    log = tmp_path / "launcher.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=_env())
    try:
        wait_for(lambda: "starting vLLM" in log.read_text() or proc.poll() is not None, DEADLINE, "the launcher")
        assert f"starting vLLM on {uri} while it downloads" in log.read_text(), log.read_text()[-4000:]
        wait_for(
            lambda: proc.poll() is not None or _healthy(f"http://127.0.0.1:{port}/health"), DEADLINE, "vLLM to serve"
        )
        assert proc.poll() is None, log.read_text()[-6000:]
        leases = {int(le["pid"]) for m in d.ctl_json("ls") for le in m.get("leases", [])}
        assert proc.pid in leases  # the launcher holds the lease while vLLM serves
        answer = _post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True},
        )
        assert answer["choices"][0]["token_ids"] == reference, answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            d.stop()
    text = log.read_text()
    assert proc.returncode in (0, -15), text[-4000:]
