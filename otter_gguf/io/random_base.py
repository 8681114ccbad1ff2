"""A random-weight llama / qwen3 base GGUF of a given shape (:func:`write_random_base`): the model the
benchmarks and the tests build when they need a base of a chosen size, written with gguf-py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from otter_gguf.io.gguf_write import OutTensor, write_gguf
from otter_gguf.io.outputs import atomic_outputs

__all__ = ["write_random_base"]

#: the vocabulary of write_random_base: <unk> <s> </s>, the 256 byte tokens, then "▁t{i}"
_N_SPECIAL = 3 + 256


def write_random_base(path: str | os.PathLike, shape: Mapping, seed: int = 0) -> Path:
    """A random-weight llama base GGUF (f16 matrices, f32 norms of ones; N(0, 0.02) weights), streamed
    tensor by tensor with gguf-py and renamed into place when complete.

    ``shape["arch"]`` = ``"qwen3"`` (default ``"llama"``) writes a qwen3 base instead: per-head
    ``attn_q_norm`` / ``attn_k_norm`` in every layer, rope base 1e6, RMS eps 1e-6; ``shape["tied"]``
    leaves out ``output.weight`` (the LM head is ``token_embd``, as Qwen3 0.6B-4B tie it).

    ``shape``: ``d``, ``L``, ``h``, ``h_kv``, ``f``, ``V`` (>= 259), optionally ``hd`` (default
    ``d // h``), ``ctx_train`` (default 4096) and ``model_name`` (``general.name``). The vocabulary is
    SentencePiece-style (``<unk>``, ``<s>``, ``</s>``, byte tokens, ``▁t{i}``; BOS 1, EOS 2, UNK 0),
    so llama.cpp tokenizes and runs it like a real llama. Same (shape, seed) -> same bytes.
    """
    import gguf

    path = Path(path)
    d, L, h, hkv, f, V = (int(shape[k]) for k in ("d", "L", "h", "h_kv", "f", "V"))
    hd = int(shape.get("hd") or d // h)
    arch = str(shape.get("arch") or "llama")
    if arch not in ("llama", "qwen3"):
        raise ValueError(f"write_random_base: arch={arch!r}, expected 'llama' or 'qwen3'")
    if V < _N_SPECIAL + 1:
        raise ValueError(f"write_random_base: V={V}, needs at least {_N_SPECIAL + 1} (special and byte tokens)")

    def kvs(w: gguf.GGUFWriter) -> None:
        w.add_architecture()
        w.add_name(str(shape.get("model_name") or f"random-{arch}-{path.stem}"))
        w.add_context_length(int(shape.get("ctx_train") or 4096))
        w.add_embedding_length(d)
        w.add_block_count(L)
        w.add_feed_forward_length(f)
        w.add_head_count(h)
        w.add_head_count_kv(hkv)
        w.add_rope_dimension_count(hd)
        if arch != "llama" or hd != d // h:
            w.add_key_length(hd)
            w.add_value_length(hd)
        w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
        w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_vocab_size(V)
        w.add_tokenizer_model("llama")
        toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        toks += [f"\u2581t{i}" for i in range(V - len(toks))]
        T = gguf.TokenType
        w.add_token_list(toks)
        w.add_token_scores([0.0] * V)
        w.add_token_types([int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL)] + [int(T.BYTE)] * 256
                          + [int(T.NORMAL)] * (V - _N_SPECIAL))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    shapes = [("token_embd.weight", (V, d)), ("output_norm.weight", (d,))]
    shapes += [] if shape.get("tied") else [("output.weight", (V, d))]
    for i in range(L):
        p = f"blk.{i}."
        shapes += [(p + "attn_norm.weight", (d,)), (p + "attn_q.weight", (h * hd, d)),
                   (p + "attn_k.weight", (hkv * hd, d)), (p + "attn_v.weight", (hkv * hd, d))]
        if arch == "qwen3":
            shapes += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        shapes += [(p + "attn_output.weight", (d, h * hd)), (p + "ffn_norm.weight", (d,)),
                   (p + "ffn_gate.weight", (f, d)), (p + "ffn_up.weight", (f, d)), (p + "ffn_down.weight", (d, f))]

    rng = np.random.default_rng(seed)  # drawn in file order (write_gguf calls data() once per tensor, in order)

    def data(s: tuple[int, ...]) -> np.ndarray:
        if len(s) == 1:
            return np.ones(s, np.float32)
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = []
    for n, s in shapes:
        qt = gguf.GGMLQuantizationType.F32 if len(s) == 1 else gguf.GGMLQuantizationType.F16
        tensors.append(OutTensor(n, s, qt, int(np.prod(s)) * (4 if len(s) == 1 else 2), lambda s=s: data(s)))
    with atomic_outputs([path], force=True) as (tmp,):
        write_gguf(tmp, arch, gguf.GGUF_DEFAULT_ALIGNMENT, [kvs], tensors)
    return path
