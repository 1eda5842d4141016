"""Tiny transformers checkpoints of every architecture family people commonly run, built locally
with random weights (no hub), saved by transformers' own ``save_pretrained``, plus the inputs and
the output each one is compared on.

``save_pretrained`` writes what published checkpoints hold, reverting the conversions transformers
applies at load time: MoE experts one by one (``block_sparse_moe.experts.N.w1``,
``experts.N.gate_proj``) where the modules fuse them (``experts.gate_up_proj``), ViT under its
older names (``encoder.layer.N.attention.attention.query``), tied weights saved once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB = 64
LM = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, what else its directory holds, and how to run it."""

    build: Callable[[], Any]
    inputs: Callable[[], dict[str, Any]]
    output: str = "logits"
    extra: Callable[[Path], None] | None = None


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.tensor([[1, 5, 7, 2, 9, 30, 4], [3, 3, 8, 60, 1, 0, 11]])}


def _bert_ids() -> dict[str, Any]:
    ids = _ids()["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _seq2seq_ids() -> dict[str, Any]:
    return {**_ids(), "decoder_input_ids": torch.tensor([[0, 4, 9], [0, 7, 2]])}


def _pixels() -> dict[str, Any]:
    return {"pixel_values": torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)}


def _clip_inputs() -> dict[str, Any]:
    return {**_ids(), **_pixels()}


def _audio() -> dict[str, Any]:
    return {
        "input_features": torch.linspace(-1, 1, 1 * 16 * 32).reshape(1, 16, 32),
        "decoder_input_ids": torch.tensor([[1, 4, 9]]),
    }


def _tiny(cls: Any, cfg: Any) -> Callable[[], Any]:
    return lambda: cls(cfg)


def archs() -> dict[str, Arch]:
    t = transformers
    moe = dict(LM, num_local_experts=4, num_experts_per_tok=2)

    def tiny_bert() -> Any:  # plain and in the sentence-transformers layout; a config each
        return t.BertModel(
            t.BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
            )
        )

    return {
        "gpt2": Arch(_tiny(t.GPT2LMHeadModel, t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)), _ids),
        "llama-tied": Arch(
            _tiny(t.LlamaForCausalLM, t.LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, **LM)), _ids
        ),
        "llama-untied": Arch(_tiny(t.LlamaForCausalLM, t.LlamaConfig(vocab_size=VOCAB, **LM)), _ids),
        "qwen2": Arch(_tiny(t.Qwen2ForCausalLM, t.Qwen2Config(vocab_size=VOCAB, **LM)), _ids),
        "mistral": Arch(_tiny(t.MistralForCausalLM, t.MistralConfig(vocab_size=VOCAB, **LM)), _ids),
        "phi3": Arch(_tiny(t.Phi3ForCausalLM, t.Phi3Config(vocab_size=VOCAB, pad_token_id=0, **LM)), _ids),
        "gemma2": Arch(_tiny(t.Gemma2ForCausalLM, t.Gemma2Config(vocab_size=VOCAB, head_dim=8, **LM)), _ids),
        "mixtral": Arch(_tiny(t.MixtralForCausalLM, t.MixtralConfig(vocab_size=VOCAB, **moe)), _ids),
        "qwen2_moe": Arch(
            _tiny(
                t.Qwen2MoeForCausalLM,
                t.Qwen2MoeConfig(
                    vocab_size=VOCAB,
                    num_experts=4,
                    num_experts_per_tok=2,
                    moe_intermediate_size=24,
                    shared_expert_intermediate_size=48,
                    **LM,
                ),
            ),
            _ids,
        ),
        "t5": Arch(
            _tiny(
                t.T5ForConditionalGeneration,
                t.T5Config(
                    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
                ),
            ),
            _seq2seq_ids,
        ),
        "bert": Arch(
            tiny_bert,
            _bert_ids,
            output="last_hidden_state",
        ),
        "vit": Arch(
            _tiny(
                t.ViTModel,
                t.ViTConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=48,
                ),
            ),
            _pixels,
            output="last_hidden_state",
        ),
        "clip": Arch(
            _tiny(
                t.CLIPModel,
                t.CLIPConfig(
                    text_config=dict(
                        vocab_size=VOCAB,
                        hidden_size=32,
                        intermediate_size=48,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        projection_dim=16,
                    ),
                    vision_config=dict(
                        image_size=32,
                        patch_size=8,
                        hidden_size=32,
                        intermediate_size=48,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        projection_dim=16,
                    ),
                    projection_dim=16,
                ),
            ),
            _clip_inputs,
            output="logits_per_image",
        ),
        "whisper": Arch(
            _tiny(
                t.WhisperForConditionalGeneration,
                t.WhisperConfig(
                    vocab_size=VOCAB,
                    num_mel_bins=16,
                    d_model=32,
                    encoder_layers=2,
                    decoder_layers=2,
                    encoder_attention_heads=4,
                    decoder_attention_heads=4,
                    encoder_ffn_dim=48,
                    decoder_ffn_dim=48,
                    max_source_positions=16,
                    max_target_positions=32,
                    decoder_start_token_id=1,
                    pad_token_id=0,
                ),
            ),
            _audio,
        ),
        "st-bert": Arch(
            tiny_bert,
            _bert_ids,
            output="last_hidden_state",
            extra=lambda d: _sentence_transformers_layout(d),
        ),
    }


def _sentence_transformers_layout(directory: Path) -> None:
    """The files sentence-transformers writes beside a BertModel: its module list and a pooling
    module in a subdirectory (transformers' AutoModel reads only the root's files)."""
    (directory / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (directory / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )


NAMES = list(archs())


def build(name: str, directory: Path) -> Path:
    """Save architecture ``name`` (seeded, so the same every time) into ``directory``."""
    arch = archs()[name]
    torch.manual_seed(NAMES.index(name))
    model = arch.build()
    model.save_pretrained(directory, safe_serialization=True)
    if arch.extra is not None:
        arch.extra(directory)
    return directory


def run(name: str, model: Any, device: str = "cpu") -> Any:
    """The output the architecture is compared on, for its fixed inputs (on ``device``)."""
    arch = archs()[name]
    with torch.no_grad():
        return getattr(model(**{k: v.to(device) for k, v in arch.inputs().items()}), arch.output)


def reference(name: str, directory: Path | str) -> Any:
    """transformers' own load of the directory, run on the fixed inputs."""
    return run(name, auto_class(name).from_pretrained(str(directory)))


def auto_class(name: str) -> Any:
    t = transformers
    if name in ("bert", "st-bert", "vit", "clip"):
        return t.AutoModel
    if name == "t5":
        return t.AutoModelForSeq2SeqLM
    if name == "whisper":
        return t.AutoModelForSpeechSeq2Seq
    return t.AutoModelForCausalLM
