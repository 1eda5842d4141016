"""Generate a Llama-shaped safetensors model (shards + index + config + tokenizer) for tests
and benchmarks. No hub access is needed: the weights are random bytes. transformers loads it
as it is (``LlamaForCausalLM``: the config's head counts match the tensors, and the tokenizer
is a small word-level one), so a forward pass runs; its output means nothing.

    python tools/make_model.py OUT_DIR --size 2GiB [--shards 2] [--dtype BF16] [--seed 0]
    python tools/make_model.py OUT_DIR --tiny          # a few KB, for tests

Sizes are reached by choosing the hidden size and layer count of a Llama-like config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4}
# The tokenizer's words (ids in this order, after <unk>, <s>, </s>): 32 ids in all, the tiny
# model's vocab_size (a larger model's vocab only needs to hold them).
WORDS = (
    "the a an of to and in is it that model weights cache layer tensor node daemon client "
    "hello world fast small llama token text one two three ."
).split()
SPECIAL = ("<unk>", "<s>", "</s>")


def llama_tensors(hidden: int, layers: int, vocab: int, inter: int, kv: int) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [hidden]),
            (p + "self_attn.q_proj.weight", [hidden, hidden]),
            (p + "self_attn.k_proj.weight", [kv, hidden]),
            (p + "self_attn.v_proj.weight", [kv, hidden]),
            (p + "self_attn.o_proj.weight", [hidden, hidden]),
            (p + "post_attention_layernorm.weight", [hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
        ]
    out += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    return out


def _random_bytes(rng: np.random.Generator, n: int, dtype: str) -> bytes:
    """n bytes of small normal values (std 0.02, like initialised weights) encoded as dtype."""
    size = DTYPE_SIZE[dtype]
    values = rng.standard_normal(n // size, dtype=np.float32) * np.float32(0.02)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if dtype == "F16":
        return values.astype(np.float16).tobytes()
    return values.tobytes()


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int]]], rng: np.random.Generator) -> None:
    """Tensors are laid out by name, as safetensors' own writer does (so `layers.10` comes
    before `layers.2`, and `lm_head` first): a loader or downloader that follows layer order
    meets the same byte layout as with real checkpoints."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in sorted(tensors):
        n = math.prod(shape) * DTYPE_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section like the reference writer
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        remaining = off
        while remaining:
            n = min(remaining, 64 << 20)
            f.write(_random_bytes(rng, n, dtype))
            remaining -= n
    os.replace(tmp, path)


def make_model(out: Path, size: int, shards: int = 2, dtype: str = "BF16", seed: int = 0, tiny: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if tiny:
        hidden, layers, vocab, inter, kv = 16, 2, 32, 32, 8
        head_dim = 4  # 4 query heads, 2 key/value heads (kv = 2 * head_dim)
    else:
        head_dim = 32  # hidden is a multiple of 128: hidden/32 query heads, a quarter of them for k/v
        # Llama-3 proportions: vocab 128256 scaled down, inter = 3.5 * hidden, kv = hidden / 4.
        layers = 16
        vocab = 32000
        hidden = 256
        while True:
            t = llama_tensors(hidden, layers, vocab, int(hidden * 3.5), hidden // 4)
            if sum(math.prod(s) for _, s in t) * DTYPE_SIZE[dtype] >= size:
                break
            hidden += 128
    tensors = llama_tensors(
        hidden, layers, vocab, int(hidden * 3.5) if not tiny else inter, hidden // 4 if not tiny else kv
    )
    total = sum(math.prod(s) for _, s in tensors) * DTYPE_SIZE[dtype]
    per = total / shards
    groups: list[list[tuple[str, str, list[int]]]] = [[] for _ in range(shards)]
    acc = 0
    for name, shape in tensors:
        idx = min(int(acc / per), shards - 1)
        groups[idx].append((name, dtype, shape))
        acc += math.prod(shape) * DTYPE_SIZE[dtype]
    weight_map = {}
    for i, g in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / fn, g, rng)
        weight_map.update({name: fn for name, _, _ in g})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(llama_config(tensors, head_dim, dtype), indent=2))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(), separators=(",", ":")))
    return out


def llama_config(tensors: list[tuple[str, list[int]]], head_dim: int, dtype: str) -> dict[str, object]:
    """A LlamaConfig that transformers builds the same shapes from as `tensors` has."""
    shapes = dict(tensors)
    vocab, hidden = shapes["model.embed_tokens.weight"]
    kv = shapes["model.layers.0.self_attn.k_proj.weight"][0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": sum(1 for n, _ in tensors if n.endswith(".input_layernorm.weight")),
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": kv // head_dim,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,  # lm_head.weight is a tensor of its own
        "bos_token_id": SPECIAL.index("<s>"),
        "eos_token_id": SPECIAL.index("</s>"),
        "torch_dtype": "bfloat16" if dtype == "BF16" else {"F16": "float16", "F32": "float32"}[dtype],
    }


def tokenizer_json() -> dict[str, object]:
    """A word-level tokenizer in the `tokenizers` library's own format (what its
    ``Tokenizer.to_str()`` writes), without needing that library to write it."""
    vocab = {w: i for i, w in enumerate((*SPECIAL, *WORDS))}
    special = [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t in SPECIAL
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dtype", default="BF16", choices=sorted(DTYPE_SIZE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    from weightcache_daemon.config import parse_size

    make_model(a.out, parse_size(a.size, "--size"), a.shards, a.dtype, a.seed, a.tiny)
    for p in sorted(a.out.iterdir()):
        print(f"{p.stat().st_size:>14}  {p}")


if __name__ == "__main__":
    main()
