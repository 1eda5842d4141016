"""Real frameworks: transformers models (random init, tiny configs, saved by save_pretrained) loaded
through the cache, compared bit for bit with transformers' own from_pretrained of the original
directory; the descriptor-backed path in a mount namespace where the store is hidden."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, no_partial_files, sha256_file, start_daemon, upload_dir, wait_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import weightcache  # noqa: E402
from weightcache import InvalidInputError  # noqa: E402
from weightcache.nn import load_into, materialize_just_in_time  # noqa: E402
from weightcache.transformers import from_pretrained  # noqa: E402

VOCAB = 96
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
WORDS = ["hello", "world", "the", "cache", "shares", "pages", "between", "containers"]


def _tokenizer_llama(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)


def _tokenizer_bert(directory: Path) -> None:
    vocab = directory / "vocab-src.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    vocab.unlink()


def _build(kind: str, directory: Path) -> Path:
    torch.manual_seed(KINDS.index(kind))
    shard = "50GB"
    if kind in ("llama-untied", "llama-tied", "llama-sharded"):
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=kind == "llama-tied", **SMALL)
        model = transformers.LlamaForCausalLM(cfg)
        shard = "12KB" if kind == "llama-sharded" else shard
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=VOCAB, **SMALL))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(vocab_size=VOCAB, **SMALL))
    elif kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        model = transformers.BertModel(cfg)
    else:
        raise AssertionError(kind)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=shard)
    if kind == "llama-tied":
        _tokenizer_llama(directory)
    if kind == "bert":
        _tokenizer_bert(directory)
    return directory


KINDS = ["llama-untied", "llama-tied", "qwen2", "mistral", "llama-sharded", "bert"]


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    for kind in KINDS:
        _build(kind, root / kind)
    return root


@pytest.fixture(scope="module")
def wc(tmp_path_factory: pytest.TempPathFactory, s3: Any) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("wc"), s3, client_sources=["*"])
    yield d
    d.stop()


def _inputs(kind: str) -> dict[str, Any]:
    ids = torch.tensor([[1, 5, 7, 2, 9, 30, 4], [3, 3, 8, 60, 1, 0, 11]])
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def _out(model: Any, kind: str) -> Any:
    with torch.no_grad():
        out = model(**_inputs(kind))
    return out.last_hidden_state if kind == "bert" else out.logits


def _reference(directory: Path, kind: str) -> Any:
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    return _out(auto.from_pretrained(str(directory)), kind)


# ---------------------------------------------------------------- one call for transformers


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_equals_transformers(wc: Daemon, hf_root: Path, kind: str) -> None:
    directory = hf_root / kind
    expected = _reference(directory, kind)
    with from_pretrained(f"file://{directory}/", socket_dir=wc.socket_dir) as lm:
        assert torch.equal(_out(lm.model, kind), expected)
        assert not lm.model.training and lm.unexpected == []
        assert not any(p.is_meta for p in lm.model.parameters())
        # zero-copy: every parameter the checkpoint carries is a view of the shared mapping
        for name, param in lm.model.named_parameters():
            if name in lm.handle:
                assert param.data_ptr() == lm.handle.get_tensor(name).data_ptr(), name
        if kind == "llama-sharded":
            assert len([f for f in lm.handle.files if f.path.endswith(".safetensors")]) >= 3
            assert any(f.path == "model.safetensors.index.json" for f in lm.handle.files)
        if kind == "llama-tied":
            assert "lm_head.weight" not in lm.handle  # saved once, as the embedding
            assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
        if kind in ("llama-tied", "bert"):
            ref_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
            text = "hello the cache shares pages"
            assert lm.tokenizer is not None and lm.tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
        else:
            assert lm.tokenizer is None
        path = lm.handle.path
    assert not os.path.exists(path)  # close() removed the descriptor directory


def test_from_pretrained_over_s3(wc: Daemon, hf_root: Path, s3: Any, bucket: str) -> None:
    upload_dir(s3, bucket, "hf/llama-sharded/", hf_root / "llama-sharded")
    expected = _reference(hf_root / "llama-sharded", "llama-sharded")
    with weightcache.connect(wc.socket_dir) as c:
        with c.load_transformers(f"s3://{bucket}/hf/llama-sharded/") as lm:
            assert torch.equal(_out(lm.model, "llama-sharded"), expected)
            snapshot = lm.handle.snapshot_id
        # an open handle works too, and stays the caller's to close
        with c.open(snapshot) as handle:
            lm2 = from_pretrained(handle, dtype="bfloat16")
            assert lm2.model.model.norm.weight.dtype == torch.bfloat16
            lm2.close()
            assert os.path.isdir(handle.path)


@pytest.mark.parametrize("kind", ["llama-tied", "bert"])
def test_from_pretrained_just_in_time_on_cpu(wc: Daemon, hf_root: Path, kind: str) -> None:
    directory = hf_root / kind
    expected = _reference(directory, kind)
    with from_pretrained(f"file://{directory}/", socket_dir=wc.socket_dir, just_in_time=True) as lm:
        assert lm.just_in_time is not None and any(p.is_meta for p in lm.model.parameters())
        assert torch.equal(_out(lm.model, kind), expected)
        assert lm.just_in_time._handles == []
        assert not any(p.is_meta for p in lm.model.parameters())
        if kind == "llama-tied":
            assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


@pytest.mark.cuda
def test_from_pretrained_to_cuda(wc: Daemon, hf_root: Path) -> None:
    directory = hf_root / "llama-tied"
    expected = _reference(directory, "llama-tied")
    for jit in (True, False):
        with from_pretrained(f"file://{directory}/", socket_dir=wc.socket_dir, device="cuda", just_in_time=jit) as lm:
            ids = _inputs("llama-tied")["input_ids"].cuda()
            with torch.no_grad():
                got = lm.model(input_ids=ids).logits.cpu()
            assert torch.allclose(got, expected, atol=1e-4), jit


def test_missing_weights_are_named(wc: Daemon, hf_root: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"no tensors for 2 weight\(s\) of BertForSequenceClassification: "):
        from_pretrained(
            f"file://{hf_root / 'bert'}/",
            socket_dir=wc.socket_dir,
            model_class=transformers.AutoModelForSequenceClassification,
        )


# ---------------------------------------------------------------- meta-device rules on real models


def test_load_into_meta_assigns_ties_and_keeps_buffers(wc: Daemon, hf_root: Path) -> None:
    import accelerate

    directory = hf_root / "llama-tied"
    cfg = transformers.AutoConfig.from_pretrained(str(directory))
    with weightcache.connect(wc.socket_dir) as c, c.open(f"file://{directory}/") as m:
        with accelerate.init_empty_weights():
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.float32)
        model.tie_weights()
        inv_freq = model.model.rotary_emb.inv_freq.clone()
        assert model.lm_head.weight.is_meta and not model.model.rotary_emb.inv_freq.is_meta
        assert load_into(model, m) == ([], [])  # the omitted lm_head.weight is tied, not missing
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert not any(p.is_meta for p in model.parameters())
        assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)  # left as the module computed it
        assert model.lm_head.weight.data_ptr() == m.get_tensor("model.embed_tokens.weight").data_ptr()
        assert torch.equal(_out(model.eval(), "llama-tied"), _reference(directory, "llama-tied"))


def test_buffers_left_on_meta_are_an_error(wc: Daemon, hf_root: Path) -> None:
    directory = hf_root / "bert"
    cfg = transformers.AutoConfig.from_pretrained(str(directory))
    with weightcache.connect(wc.socket_dir) as c, c.open(f"file://{directory}/") as m:
        for arm in (
            lambda mod: load_into(mod, m),
            lambda mod: load_into(mod, m, strict=False),
            lambda mod: materialize_just_in_time(mod, m, "cpu"),
        ):
            with torch.device("meta"):
                model = transformers.BertModel(cfg)
            with pytest.raises(InvalidInputError, match=r"buffer\(s\) .*embeddings\.position_ids.* init_empty_weights"):
                arm(model)
            assert model.embeddings.word_embeddings.weight.is_meta  # refused before loading anything


def test_just_in_time_strict_and_its_own_messages(wc: Daemon, hf_root: Path) -> None:
    import accelerate

    directory = hf_root / "llama-untied"
    cfg = transformers.AutoConfig.from_pretrained(str(directory))
    with weightcache.connect(wc.socket_dir) as c, c.open(f"file://{directory}/") as m:
        with accelerate.init_empty_weights():
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.float32)
        model.register_parameter("bonus", torch.nn.Parameter(torch.zeros(1)))
        with pytest.raises(InvalidInputError, match=r"^materialize_just_in_time\(strict=True\): missing from model"):
            materialize_just_in_time(model, m, "cpu")
        jit = materialize_just_in_time(model, m, "cpu", strict=False)
        assert jit.missing == ["bonus"] and jit.unexpected == []
        assert torch.equal(_out(model.eval(), "llama-untied"), _reference(directory, "llama-untied"))


# ---------------------------------------------------------------- the descriptor-backed path


# A container's namespaces: its own mounts (the store hidden below) and its own pids, with a
# /proc of its own, as a container runtime sets up.
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"]


def _can_unshare() -> bool:
    return subprocess.run([*UNSHARE, "true"], capture_output=True).returncode == 0


def test_path_in_a_mount_namespace_without_the_store(wc: Daemon, hf_root: Path, tmp_path: Path) -> None:
    """A container's view: the socket directory is there, the store and the original files are not."""
    if not _can_unshare():
        pytest.skip("unshare --mount is not permitted here (needs CAP_SYS_ADMIN)")
    kind = "llama-tied"
    directory = hf_root / kind
    with weightcache.connect(wc.socket_dir) as c:
        c.ensure(f"file://{directory}/", name="in-container")
    child = textwrap.dedent(f"""
        import json, os, sys, torch, transformers, weightcache
        from weightcache.transformers import from_pretrained
        out = sys.argv[1]
        hidden = [os.path.exists({str(wc.cache_dir / "blobs")!r}), os.path.exists({str(directory / "config.json")!r})]
        pid = os.getpid()  # small: a pid namespace of its own
        ids = torch.tensor({_inputs(kind)["input_ids"].tolist()!r})
        with weightcache.connect({str(wc.socket_dir)!r}) as c, c.open("in-container") as m:
            plain = transformers.AutoModelForCausalLM.from_pretrained(m.path)
            with torch.no_grad():
                torch.save(plain(input_ids=ids).logits, out + "/plain.pt")
            tok = transformers.AutoTokenizer.from_pretrained(m.path)
            store_path_seen = os.path.exists(m.store_path)
        with from_pretrained("in-container", socket_dir={str(wc.socket_dir)!r}) as lm, torch.no_grad():
            torch.save(lm.model(input_ids=ids).logits, out + "/one-call.pt")
        json.dump({{"hidden": hidden, "store_path_seen": store_path_seen, "pid": pid,
                   "tokens": tok("hello world")["input_ids"]}}, open(out + "/seen.json", "w"))
    """)
    out = tmp_path / "out"
    out.mkdir()
    script = (
        f'mount -t tmpfs none {wc.cache_dir} && mount -t tmpfs none {hf_root} && exec {sys.executable} -c "$0" {out}'
    )
    r = subprocess.run(
        [*UNSHARE, "sh", "-c", script, child],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    seen = json.loads((out / "seen.json").read_text())
    assert seen["hidden"] == [False, False] and seen["store_path_seen"] is False
    assert seen["pid"] < 10  # it ran in its own pid namespace, with its own /proc
    expected = _reference(directory, kind)
    assert torch.equal(torch.load(out / "plain.pt"), expected)
    assert torch.equal(torch.load(out / "one-call.pt"), expected)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert seen["tokens"] == ref_tok("hello world")["input_ids"]


def test_spawned_child_loads_through_the_openers_path(wc: Daemon, hf_root: Path, tmp_path: Path) -> None:
    kind = "bert"
    directory = hf_root / kind
    code = textwrap.dedent("""
        import sys, torch, transformers
        m = transformers.AutoModel.from_pretrained(sys.argv[1])
        ids = torch.tensor(eval(sys.argv[2]))
        with torch.no_grad():
            torch.save(m(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state, sys.argv[3])
    """)
    with weightcache.connect(wc.socket_dir) as c, c.open(f"file://{directory}/") as m:
        assert os.stat(m.path).st_mode & 0o777 == 0o700
        assert sorted(os.listdir(m.path)) == sorted(f.path for f in m.files)
        link = os.readlink(os.path.join(m.path, "config.json"))
        assert link.startswith(f"/proc/{os.getpid()}/fd/")
        out = tmp_path / "child.pt"
        ids = repr(_inputs(kind)["input_ids"].tolist())
        subprocess.run([sys.executable, "-c", code, m.path, ids, str(out)], check=True, timeout=120)
        assert torch.equal(torch.load(out), _reference(directory, kind))
        path = m.path
    assert not os.path.exists(path)
    with pytest.raises(InvalidInputError, match="is closed"):
        _ = m.path


def _lease_pids(d: Daemon) -> set[int]:
    return {int(le["pid"]) for m in d.ctl_json("ls") for le in m.get("leases", [])}


def test_links_dangle_when_the_lease_holder_exits(wc: Daemon, hf_root: Path) -> None:
    directory = hf_root / "llama-untied"
    opener = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, weightcache
                c = weightcache.connect({str(wc.socket_dir)!r})
                m = c.open({f"file://{directory}/"!r})
                print(m.path, flush=True)
                sys.stdin.readline()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert opener.stdout is not None
        path = Path(opener.stdout.readline().strip())
        weights = path / "model.safetensors"
        held = open(weights, "rb")  # kept open across the opener's death on purpose
        assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
        assert opener.pid in _lease_pids(wc)
    finally:
        opener.send_signal(signal.SIGKILL)  # no clean-up: the directory stays, its links dangle
        opener.wait(timeout=30)
    with held:
        assert path.is_dir() and (path / "config.json").is_symlink()
        with pytest.raises(FileNotFoundError):
            open(path / "config.json")
        # a file opened while the lease was held keeps its bytes
        import hashlib

        assert hashlib.sha256(held.read()).hexdigest() == sha256_file(directory / "model.safetensors")
    wait_for(lambda: opener.pid not in _lease_pids(wc), 60, "the dead opener's lease to be released")
    import shutil

    shutil.rmtree(path)


# ---------------------------------------------------------------- frictions


def test_pytorch_bin_only_is_refused_naming_the_files(daemon: Daemon, tmp_path: Path) -> None:
    directory = tmp_path / "bin-only"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(4)}, directory / "pytorch_model.bin")
    r = daemon.ctl("prefetch", f"file://{directory}/", "--name", "bin-only", check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no safetensors weights; skipped pytorch_model.bin" in r.stderr and "convert" in r.stderr
    with weightcache.connect(daemon.socket_dir) as c, pytest.raises(InvalidInputError, match=r"pytorch_model\.bin"):
        c.open(f"file://{directory}/")
    assert daemon.ctl_json("ls") == []
    no_partial_files(daemon)


def test_unnamed_snapshot_has_a_usable_path(daemon: Daemon, hf_root: Path, tmp_path: Path) -> None:
    first = daemon.ctl_json("prefetch", f"file://{hf_root / 'qwen2'}/", "--name", "moving")["snapshot_id"]
    daemon.ctl("prefetch", f"file://{hf_root / 'mistral'}/", "--name", "moving")  # the name moves on
    with weightcache.connect(daemon.socket_dir) as c, c.open(first) as m:
        assert m.snapshot_id == first and m.store_path == ""
        assert json.loads((Path(m.path) / "config.json").read_text())["model_type"] == "qwen2"
        assert torch.equal(
            _out(transformers.AutoModelForCausalLM.from_pretrained(m.path), "qwen2"),
            _reference(hf_root / "qwen2", "qwen2"),
        )


def test_relative_socket_paths(daemon: Daemon, tiny_model: Path) -> None:
    env = {k: v for k, v in daemon.env.items() if not k.startswith("WEIGHTCACHE_")}
    r = subprocess.run(
        ["cachectl", "--admin-socket", "admin/admin.sock", "prefetch", f"file://{tiny_model}/", "--name", "rel"],
        cwd=daemon.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    code = "import weightcache; c = weightcache.connect('sock'); print(len(c.open('rel')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=daemon.root, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "21", r.stderr


def test_nn_is_reachable_without_importing_torch_up_front() -> None:
    code = (
        "import sys, weightcache; assert 'torch' not in sys.modules; "
        "f = weightcache.nn.load_into; assert 'torch' not in sys.modules; "
        "assert weightcache.transformers.from_pretrained; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
