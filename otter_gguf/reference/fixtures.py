"""Tiny deterministic checkpoints for tests, built locally in seconds.

Nothing is downloaded: the tokenizer is a SentencePiece model trained on the
shipped ``otter_gguf/data/tiny_corpus.txt``; the weights are seeded random.

    python -m otter_gguf.reference.fixtures OUT_DIR

writes ``tiny-llama/``, ``tiny-qwen2/``, ``tiny-qwen3/``, ``tiny-gemma3/``,
``adapter-reward1/``, ``adapter-reward3/``, ``adapter-token-reward/``,
``adapter-qwen2-reward1/``, ``adapter-qwen3-reward1/`` and
``adapter-gemma3-reward3/`` under ``OUT_DIR``.

Sizes: base d=256, L=4, h=4, h_kv=2, hd=64, f=768, V=512; adapters d2=256,
h2=4, h2_kv=1, f2=256, so every row length (d+d2=512, (h+h2)*hd=512,
f+f2=1024) is a multiple of 256 and every ggml quant type applies. The
qwen3 and gemma3 bases (docs/OTTER.md §7) have hd=128 (h*hd != d, as in the
real models); gemma3 has 6 layers, so llama.cpp's default pattern (every
6th layer full) gives 5 sliding layers with a window of 8 tokens and 1 full.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from otter_gguf.format.constants import (
    BIAS, NORM_TENSORS, NORM_WEIGHT_OFFSET, WEIGHT, HeadKind, hf_name, parse_hf_name,
)
from otter_gguf.format.constants import OtterTensor as T

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "tiny_corpus.txt"

TINY = dict(d=256, L=4, h=4, h_kv=2, hd=64, f=768, V=512)
TINY_QWEN3 = dict(d=256, L=4, h=4, h_kv=2, hd=128, f=768, V=512)
TINY_GEMMA3 = dict(d=256, L=6, h=4, h_kv=1, hd=128, f=768, V=512, sliding_window=8)
ADAPTER = dict(d2=256, h2=4, h2_kv=1, f2=256)
ADAPTER_KINDS = ("reward1", "reward3", "token_reward")
REWARD3_NAMES = ["helpfulness", "harmlessness", "honesty"]

_SPECIAL = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}


def train_tokenizer(vocab_size: int = 512, seed: int = 0) -> bytes:
    """Train the tiny SentencePiece BPE model (byte fallback) on the shipped corpus, deterministic."""
    from otter_gguf.reference.tokenizer import train_sentencepiece

    return train_sentencepiece(
        vocab_size, input_file=CORPUS_PATH, seed=seed, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        shuffle_input_sentence=False)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _write_tokenizer_files(out: Path, model_bytes: bytes, max_len: int) -> None:
    (out / "tokenizer.model").write_bytes(model_bytes)
    tok = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {}
    for i, (k, v) in enumerate(_SPECIAL.items()):
        added[str(i)] = {**tok, "content": v, "special": True}
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_special_tokens": {},
        "legacy": True,
        "model_max_length": max_len,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    _write_json(out / "special_tokens_map.json", {
        k: {**tok, "content": v} for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    })


def _rand(gen: torch.Generator, *shape, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(torch.float32)


def _norm_w(gen: torch.Generator, n: int) -> torch.Tensor:
    # not all ones, so a misapplied norm weight shows up in the outputs
    return (1.0 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(torch.float32)


def _base_weights(seed: int, *, qkv_bias: bool, tied: bool, arch: str = "llama",
                  sizes: dict = TINY) -> dict[str, torch.Tensor]:
    d, L, h, hkv, hd, f, V = (sizes[k] for k in ("d", "L", "h", "h_kv", "hd", "f", "V"))
    g = torch.Generator().manual_seed(seed)
    w: dict[str, torch.Tensor] = {}
    # tied: the embedding is also the output matrix, give it the lm_head scale
    w["model.embed_tokens.weight"] = _rand(g, V, d, std=(1.0 / d ** 0.5) if tied else 0.05)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = _norm_w(g, d)
        # q/k large enough that attention is far from uniform
        w[p + "self_attn.q_proj.weight"] = _rand(g, h * hd, d, std=0.08)
        w[p + "self_attn.k_proj.weight"] = _rand(g, hkv * hd, d, std=0.08)
        w[p + "self_attn.v_proj.weight"] = _rand(g, hkv * hd, d, std=0.06)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = _rand(g, h * hd, std=0.2)
            w[p + "self_attn.k_proj.bias"] = _rand(g, hkv * hd, std=0.2)
            w[p + "self_attn.v_proj.bias"] = _rand(g, hkv * hd, std=0.1)
        w[p + "self_attn.o_proj.weight"] = _rand(g, d, h * hd, std=0.05)
        w[p + "post_attention_layernorm.weight"] = _norm_w(g, d)
        w[p + "mlp.gate_proj.weight"] = _rand(g, f, d, std=0.06)
        w[p + "mlp.up_proj.weight"] = _rand(g, f, d, std=0.06)
        w[p + "mlp.down_proj.weight"] = _rand(g, d, f, std=0.04)
    w["model.norm.weight"] = _norm_w(g, d)
    if not tied:
        w["lm_head.weight"] = _rand(g, V, d, std=1.0 / d ** 0.5)
    # the tensors of docs/OTTER.md §7, drawn after the llama family's (whose draws stay as they were)
    for i in range(L if arch in ("qwen3", "gemma3") else 0):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_norm.weight"] = _norm_w(g, hd)
        w[p + "self_attn.k_norm.weight"] = _norm_w(g, hd)
        if arch == "gemma3":
            w[p + "pre_feedforward_layernorm.weight"] = _norm_w(g, d)
            w[p + "post_feedforward_layernorm.weight"] = _norm_w(g, d)
    if arch in NORM_WEIGHT_OFFSET:  # stored as HF gemma3 does: applied as x * (1 + w)
        for n in w:
            if n.endswith("norm.weight"):
                w[n] = w[n] - NORM_WEIGHT_OFFSET[arch]
    return w


def _hf_config(sizes: dict, specific: dict) -> dict:
    """An HF config.json: the keys every tiny base has plus the architecture's own, in sorted key order."""
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": sizes["d"],
        "initializer_range": 0.02,
        "intermediate_size": sizes["f"],
        "num_attention_heads": sizes["h"],
        "num_hidden_layers": sizes["L"],
        "num_key_value_heads": sizes["h_kv"],
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": sizes["V"],
    }
    return dict(sorted({**common, **specific}.items()))


def _qwen_config(model_type: str, n_layer: int, transformers_version: str) -> dict:
    """The Qwen2/Qwen3 keys of a tiny config (no sliding window, tied embeddings, rope_theta 1e6)."""
    return {
        "architectures": [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "max_window_layers": n_layer,
        "model_type": model_type,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "transformers_version": transformers_version,
        "use_sliding_window": False,
    }


def _save_weights(out: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def make_tiny_llama(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny HF ``LlamaForCausalLM`` checkpoint with a SentencePiece tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hd, V = TINY["hd"], TINY["V"]
    _write_json(out / "config.json", _hf_config(TINY, {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.46.0",
    }))
    _write_json(out / "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.46.0",
    })
    _write_tokenizer_files(out, train_tokenizer(V, seed=0), 2048)
    _save_weights(out, _base_weights(seed, qkv_bias=False, tied=False))
    return out


def make_tiny_qwen2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny HF ``Qwen2ForCausalLM`` checkpoint (q/k/v biases, tied
    embeddings, rope_theta 1e6). It ships the same SentencePiece tokenizer as
    the tiny llama, which llama.cpp's qwen2 converter accepts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", _hf_config(TINY, _qwen_config("qwen2", TINY["L"], "4.46.0")))
    _write_json(out / "generation_config.json", {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.46.0",
    })
    _write_tokenizer_files(out, train_tokenizer(TINY["V"], seed=0), 4096)
    _save_weights(out, _base_weights(seed + 1000, qkv_bias=True, tied=True))
    return out


def _new_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_tiny_qwen3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny HF ``Qwen3ForCausalLM`` checkpoint (per-head q/k norms, hd=128 != d/h, tied embeddings,
    rope_theta 1e6) with the tiny SentencePiece tokenizer (llama.cpp's qwen3 converter takes it as qwen2's)."""
    out = _new_dir(out_dir)
    V = TINY_QWEN3["V"]
    _write_json(out / "config.json", _hf_config(TINY_QWEN3, {
        **_qwen_config("qwen3", TINY_QWEN3["L"], "4.51.0"), "attention_bias": False, "head_dim": TINY_QWEN3["hd"]}))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2,
                                                 "transformers_version": "4.51.0"})
    _write_tokenizer_files(out, train_tokenizer(V, seed=0), 4096)
    _save_weights(out, _base_weights(seed + 2000, qkv_bias=False, tied=True, arch="qwen3", sizes=TINY_QWEN3))
    return out


def make_tiny_gemma3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny HF ``Gemma3ForCausalLM`` checkpoint (text-only, like Gemma 3 270M/1B): embedding scale
    sqrt(d), norms stored as ``w`` and applied as ``1 + w``, per-head q/k norms, sandwich norms, tanh-GELU,
    query_pre_attn_scalar = hd (llama.cpp uses 1/sqrt(hd)), layers 0-4 sliding (window 8, RoPE base 1e4)
    and layer 5 full (RoPE base 1e6), tied embeddings, with the tiny SentencePiece tokenizer."""
    out = _new_dir(out_dir)
    L, hd, V = (TINY_GEMMA3[k] for k in ("L", "hd", "V"))
    _write_json(out / "config.json", _hf_config(TINY_GEMMA3, {
        "architectures": ["Gemma3ForCausalLM"],
        "_sliding_window_pattern": 6,
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": hd,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)],
        "max_position_embeddings": 4096,
        "model_type": "gemma3_text",
        "pad_token_id": 0,
        "query_pre_attn_scalar": hd,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": TINY_GEMMA3["sliding_window"],
        "tie_word_embeddings": True,
        "transformers_version": "4.55.0",
        "use_bidirectional_attention": False,
    }))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                 "transformers_version": "4.55.0"})
    _write_tokenizer_files(out, train_tokenizer(V, seed=0), 4096)
    _save_weights(out, _base_weights(seed + 3000, qkv_bias=False, tied=True, arch="gemma3", sizes=TINY_GEMMA3))
    return out


def make_adapter(out_dir: str | os.PathLike, base_dir: str | os.PathLike,
                 kind: str = "reward1", seed: int = 0, init: str = "random") -> Path:
    """Write an Otter adapter for the tiny base at ``base_dir``.

    ``kind``: ``reward1`` (n_out=1, ["reward"]), ``reward3`` (n_out=3, named,
    with q/k/v biases and a head bias) or ``token_reward`` (n_out=V).
    ``init="random"`` uses side weights scaled like the base's, so signals are
    O(1), vary per token and depend on the side stream; ``init="copy"`` uses
    :func:`otter_gguf.reference.model.insert_otter`'s copy initialisation with a
    head scaled to O(1) outputs.
    """
    from otter_gguf.format.adapter import save_adapter
    from otter_gguf.reference.model import insert_otter, load_base

    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ADAPTER_KINDS)}, found {kind!r}")
    base = load_base(base_dir)
    V = base.config.vocab_size
    d = base.config.hidden_size
    arch = base.config.architecture
    if kind == "reward1":
        kw = dict(n_out=1, head_kind=HeadKind.REWARD.value, signal_names=["reward"])
    elif kind == "reward3":
        kw = dict(n_out=3, head_kind=HeadKind.REWARD.value, signal_names=REWARD3_NAMES)
    else:
        kw = dict(n_out=V, head_kind=HeadKind.TOKEN_REWARD.value, signal_names=[])
    with_biases = kind == "reward3"
    name = Path(base_dir).name
    config, t = insert_otter(base, **ADAPTER, **kw, init=init, seed=seed,
                             base_model=name, head_bias=with_biases)
    d2 = config.otter_hidden_size
    g = torch.Generator().manual_seed(10_000 + seed)
    if init == "random":
        # redraw with per-tensor scales mirroring the base fixture's
        scales = {
            T.TOKEN_EMBD: 0.05,
            T.ATTN_Q: 0.08 * (d / (d + d2)) ** 0.5,
            T.ATTN_K: 0.08 * (d / (d + d2)) ** 0.5,
            T.ATTN_V: 0.06,
            T.ATTN_OUT: 0.03,
            T.FFN_GATE: 0.06,
            T.FFN_UP: 0.06,
            T.FFN_DOWN: 0.02,
        }
        for n in list(t):
            kind, _, suffix = parse_hf_name(n, arch)
            if kind in NORM_TENSORS:
                t[n] = _norm_w(g, t[n].shape[0])
                if arch in NORM_WEIGHT_OFFSET:  # the base's stored convention (gemma3: applied as 1 + w)
                    t[n] = t[n] - NORM_WEIGHT_OFFSET[arch]
            elif kind in scales and suffix == WEIGHT:
                t[n] = _rand(g, *t[n].shape, std=scales[kind])
    if with_biases:
        h2, h2kv, hd = config.otter_num_attention_heads, config.otter_num_key_value_heads, config.head_dim
        for i in range(config.num_hidden_layers):
            t[hf_name(T.ATTN_Q, i, BIAS, arch)] = _rand(g, h2 * hd, std=0.2)
            t[hf_name(T.ATTN_K, i, BIAS, arch)] = _rand(g, h2kv * hd, std=0.2)
            t[hf_name(T.ATTN_V, i, BIAS, arch)] = _rand(g, h2kv * hd, std=0.1)
        t[hf_name(T.HEAD, suffix=BIAS)] = _rand(g, config.head_output_size, std=0.5)
    t[hf_name(T.HEAD)] = _rand(g, config.head_output_size, d + d2, std=1.0 / (d + d2) ** 0.5)
    return save_adapter(out_dir, config, t, dtype="float32")


def make_all(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write every fixture under ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    paths = {
        "tiny-llama": make_tiny_llama(out / "tiny-llama", seed=seed),
        "tiny-qwen2": make_tiny_qwen2(out / "tiny-qwen2", seed=seed),
        "tiny-qwen3": make_tiny_qwen3(out / "tiny-qwen3", seed=seed),
        "tiny-gemma3": make_tiny_gemma3(out / "tiny-gemma3", seed=seed),
    }
    paths["adapter-reward1"] = make_adapter(out / "adapter-reward1", paths["tiny-llama"], "reward1", seed)
    paths["adapter-reward3"] = make_adapter(out / "adapter-reward3", paths["tiny-llama"], "reward3", seed + 1)
    paths["adapter-token-reward"] = make_adapter(out / "adapter-token-reward", paths["tiny-llama"],
                                                 "token_reward", seed + 2)
    paths["adapter-qwen2-reward1"] = make_adapter(out / "adapter-qwen2-reward1", paths["tiny-qwen2"],
                                                  "reward1", seed + 3)
    paths["adapter-qwen3-reward1"] = make_adapter(out / "adapter-qwen3-reward1", paths["tiny-qwen3"],
                                                  "reward1", seed + 4)
    paths["adapter-gemma3-reward3"] = make_adapter(out / "adapter-gemma3-reward3", paths["tiny-gemma3"],
                                                   "reward3", seed + 5)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m otter_gguf.reference.fixtures OUT_DIR", file=sys.stderr)
        return 2
    for name, p in make_all(argv[0]).items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
