"""Every architecture family people commonly run (tests/hf_zoo.py: tiny, random weights, built
here) loads through the cache as transformers loads it: the same outputs, bit for bit, as
transformers' own ``from_pretrained`` of the original directory, through the one-call loader
(eagerly and just in time), the torch helpers on a module built under ``init_empty_weights()``
(nothing tied by hand), ``model.path``, and all of it again in a container that mounts only the
socket directory. Checkpoints that need transformers' conversion mapping are among them: MoE
experts saved one by one (mixtral, qwen2_moe) and ViT's older names.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, start_daemon

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import hf_zoo  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import weightcache  # noqa: E402
from weightcache import InvalidInputError  # noqa: E402
from weightcache.nn import load_into, materialize_just_in_time  # noqa: E402
from weightcache.transformers import from_pretrained  # noqa: E402

NAMES = hf_zoo.NAMES
# Module names transformers makes by converting several checkpoint tensors into one: copies by
# nature; every other parameter is a zero-copy view of the shared pages.
FUSED = ("experts.gate_up_proj", "experts.down_proj")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: hf_zoo.build(name, root / name) for name in NAMES}


@pytest.fixture(scope="module")
def expected(zoo: dict[str, Path]) -> dict[str, Any]:
    return {name: hf_zoo.reference(name, directory) for name, directory in zoo.items()}


@pytest.fixture(scope="module")
def wc(tmp_path_factory: pytest.TempPathFactory, zoo: dict[str, Path]) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("wc"), None, client_sources=["*"])
    with weightcache.connect(d.socket_dir) as c:
        for name, directory in zoo.items():
            c.ensure(f"file://{directory}/", name=name)
    yield d
    d.stop()


def _same(got: Any, want: Any, how: str) -> None:
    assert got.shape == want.shape and torch.equal(got, want), f"{how}: max diff {(got - want).abs().max()}"


@pytest.mark.parametrize("name", NAMES)
def test_one_call_loader(wc: Daemon, zoo: dict[str, Path], expected: dict[str, Any], name: str) -> None:
    with from_pretrained(name, socket_dir=wc.socket_dir) as lm:
        _same(hf_zoo.run(name, lm.model), expected[name], "eager")
        assert lm.unexpected == []
        views = {lm.handle.get_tensor(k).data_ptr() for k in lm.handle.keys()}
        copies = [n for n, p in lm.model.named_parameters() if p.data_ptr() not in views]
        assert all(n.endswith(FUSED) for n in copies), copies  # renamed weights stay zero-copy
        if name == "mixtral":
            assert any(".block_sparse_moe.experts.0.w1." in k for k in lm.handle.keys())
        through_path = hf_zoo.auto_class(name).from_pretrained(lm.handle.path)
        _same(hf_zoo.run(name, through_path), expected[name], "model.path")
    with from_pretrained(name, socket_dir=wc.socket_dir, just_in_time=True) as lm:
        assert lm.just_in_time is not None
        _same(hf_zoo.run(name, lm.model), expected[name], "just in time")
        lm.just_in_time.finish()
        assert not any(p.is_meta for p in lm.model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gpt2", "t5", "mixtral", "qwen2_moe", "vit"])
def test_one_call_loader_on_cuda(wc: Daemon, expected: dict[str, Any], name: str) -> None:
    for jit in (True, False):
        with from_pretrained(name, socket_dir=wc.socket_dir, device="cuda", just_in_time=jit) as lm:
            got = hf_zoo.run(name, lm.model, "cuda").cpu()
            assert torch.allclose(got, expected[name], atol=1e-4), (name, jit, (got - expected[name]).abs().max())


def _empty(directory: Path, name: str) -> Any:
    """What a user builds: the module on meta, nothing tied by hand (transformers 5 does not tie
    under init_empty_weights)."""
    config = transformers.AutoConfig.from_pretrained(str(directory))
    with accelerate.init_empty_weights():
        return hf_zoo.auto_class(name).from_config(config).eval()


@pytest.mark.parametrize("name", NAMES)
def test_torch_helpers_strict(wc: Daemon, zoo: dict[str, Path], expected: dict[str, Any], name: str) -> None:
    with weightcache.connect(wc.socket_dir) as c, c.open(name) as m:
        module = _empty(zoo[name], name)
        assert load_into(module, m) == ([], [])
        _same(hf_zoo.run(name, module), expected[name], "load_into")
        module = _empty(zoo[name], name)
        assert load_into(module, m, device="cpu") == ([], [])  # through stream(): group by group
        _same(hf_zoo.run(name, module), expected[name], "load_into(device=)")
        module = _empty(zoo[name], name)
        jit = materialize_just_in_time(module, m, "cpu")  # strict=True: every weight accounted for
        assert (jit.missing, jit.unexpected) == ([], [])
        _same(hf_zoo.run(name, module), expected[name], "materialize_just_in_time")
        if name in ("gpt2", "llama-tied", "gemma2", "t5", "whisper"):
            out = module.get_output_embeddings().weight
            assert out is module.get_input_embeddings().weight  # tied as the model declares


def test_the_model_class_is_blamed_only_when_it_is_the_cause(wc: Daemon, zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"holds the base model \(BertModel\) .* pass the model_class"):
        from_pretrained("bert", socket_dir=wc.socket_dir, model_class=transformers.BertForSequenceClassification)
    # A layout no conversion of transformers knows (one tensor under a foreign name): the error
    # names both sides and does not send the user after the model class.
    odd = tmp_path / "odd"
    shutil.copytree(zoo["llama-untied"], odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match=r"model\.norm\.weight; and 1 of its tensors fill no weight") as err:
        from_pretrained(f"file://{odd}/", socket_dir=wc.socket_dir)
    assert "model.final_norm.weight" in str(err.value) and "model_class" not in str(err.value)


def test_a_tie_saved_twice_with_different_values_is_untied_as_transformers_does(
    wc: Daemon, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """The config says tied, the checkpoint holds both halves, and they differ: transformers
    keeps both (and warns); so does the cache, eagerly and just in time."""
    both = tmp_path / "both"
    shutil.copytree(zoo["llama-tied"], both)
    tensors = load_file(both / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, both / "model.safetensors", metadata={"format": "pt"})
    want = hf_zoo.reference("llama-tied", both)
    assert not torch.equal(want, hf_zoo.reference("llama-tied", zoo["llama-tied"]))
    for jit in (False, True):
        with from_pretrained(f"file://{both}/", socket_dir=wc.socket_dir, just_in_time=jit) as lm:
            _same(hf_zoo.run("llama-tied", lm.model), want, f"just_in_time={jit}")
            assert lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight


def test_converted_shape_mismatch_names_the_weight(wc: Daemon, zoo: dict[str, Path]) -> None:
    config = transformers.AutoConfig.from_pretrained(str(zoo["mixtral"]))
    config.intermediate_size = 40  # the experts' checkpoint tensors are 48 wide
    with accelerate.init_empty_weights():
        module = transformers.MixtralForCausalLM(config)
    with weightcache.connect(wc.socket_dir) as c, c.open("mixtral") as m:
        with pytest.raises(InvalidInputError, match=r"experts\.gate_up_proj \(made by transformers' conversion"):
            load_into(module, m)


def test_a_checkpoint_saved_as_the_module_skips_the_conversion_table(wc: Daemon) -> None:
    """transformers compiles its whole conversion table (some 1,100 patterns, ~50 ms of CPU) on
    its first load in a process; a checkpoint whose names and shapes already are the module's
    has nothing to convert, so the one-call loader does not pay for it (a fresh process: this
    one built the table for the references)."""
    code = textwrap.dedent(f"""
        import transformers.conversion_mapping as cm
        from weightcache.transformers import from_pretrained
        with from_pretrained("llama-tied", socket_dir={str(wc.socket_dir)!r}) as lm:
            assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
        print(cm._checkpoint_conversion_mapping_cache is None)
        with from_pretrained("mixtral", socket_dir={str(wc.socket_dir)!r}) as lm:
            pass
        print(cm._checkpoint_conversion_mapping_cache is None)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "False"]


# ---------------------------------------------------------------- the documented recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE_MARKER = "<!-- test: jit-recipe -->"


def _recipes() -> list[tuple[str, str]]:
    """Every python block right after the marker, in README.md and docs/*.md."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if not doc.exists():
            continue
        for m in re.finditer(re.escape(RECIPE_MARKER) + r"\s*```python\n(.*?)```", doc.read_text(), re.S):
            found.append((doc.name, m.group(1)))
    return found


def test_the_documented_just_in_time_recipe_runs_as_written(
    wc: Daemon, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipes = _recipes()
    assert recipes, f"no python block after {RECIPE_MARKER} in README.md or docs/*.md"
    monkeypatch.setenv("WEIGHTCACHE_SOCKET_DIR", str(wc.socket_dir))  # what a user's environment says
    with weightcache.connect(wc.socket_dir) as c, c.open("gpt2") as m:
        assert "lm_head.weight" not in m  # tied, saved once: the case the recipe must handle
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        want = transformers.AutoModelForCausalLM.from_pretrained(str(zoo["gpt2"]))(input_ids=ids).logits
    for doc, code in recipes:
        scope: dict[str, Any] = {}
        exec(compile(code, f"{doc}: jit-recipe", "exec"), scope)  # the documented code itself
        _same(scope["logits"].detach(), want, f"the recipe in {doc}")
        assert capsys.readouterr().out.strip() == str(want[0, -1].argmax().item())


# ---------------------------------------------------------------- in a container

# A container's namespaces: its own mounts (the store and the original directories hidden below).
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"]


def test_every_architecture_in_a_socket_only_container(
    wc: Daemon, zoo: dict[str, Path], expected: dict[str, Any], tmp_path: Path
) -> None:
    if subprocess.run([*UNSHARE, "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is not permitted here (needs CAP_SYS_ADMIN)")
    root = zoo[NAMES[0]].parent
    child = textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import hf_zoo
        from weightcache.transformers import from_pretrained
        out = sys.argv[1]
        assert not os.path.exists({str(root)!r} + "/gpt2/config.json")
        assert not os.path.exists({str(wc.cache_dir / "blobs")!r})
        for name in hf_zoo.NAMES:
            with from_pretrained(name, socket_dir={str(wc.socket_dir)!r}) as lm:
                torch.save(hf_zoo.run(name, lm.model), f"{{out}}/{{name}}-eager.pt")
                path = hf_zoo.auto_class(name).from_pretrained(lm.handle.path)
                torch.save(hf_zoo.run(name, path), f"{{out}}/{{name}}-path.pt")
            with from_pretrained(name, socket_dir={str(wc.socket_dir)!r}, just_in_time=True) as lm:
                torch.save(hf_zoo.run(name, lm.model), f"{{out}}/{{name}}-jit.pt")
        json.dump(os.getpid(), open(out + "/pid.json", "w"))
    """)
    out = tmp_path / "out"
    out.mkdir()
    script = f'mount -t tmpfs none {wc.cache_dir} && mount -t tmpfs none {root} && exec {sys.executable} -c "$0" {out}'
    r = subprocess.run([*UNSHARE, "sh", "-c", script, child], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((out / "pid.json").read_text()) < 10  # its own pid namespace and /proc
    for name in NAMES:
        for how in ("eager", "path", "jit"):
            _same(torch.load(out / f"{name}-{how}.pt"), expected[name], f"{name} {how} in the container")
