"""Load a base model from the GGUF you serve: "train on the GGUF you serve".

The tensors are dequantized with gguf-py (``gguf.quants.dequantize``), renamed
to the HF names the reference uses (per architecture: gemma3's ``ffn_norm`` is
HF's ``pre_feedforward_layernorm``), and the two converter pitfalls are undone:
the Q/K rows of the ``llama`` architecture are brought back from llama.cpp's
interleaved RoPE layout to the HF rotate-half layout
(:func:`otter_gguf_converter.rope_unpermute`; qwen2, qwen3 and gemma3 use NeoX
RoPE, no permutation), and gemma3's RMSNorm weights, stored by llama.cpp's
converter as ``1 + w`` (Otter norms included, docs/OTTER.md §7), get ``w`` back.
The hyper-parameters come from the GGUF metadata, as llama.cpp reads them
(gemma3: the sliding window and its per-layer pattern, the RoPE base of each
kind of layer, the attention scale ``1/sqrt(hd)``, the embedding scale). The result is a :class:`~otter_gguf.reference.model.BaseModel`
whose forward computes what the runtime computes on the same file, up to the
runtime's own float rounding (it runs the quantized weights directly).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from otter_gguf.format.config import OtterConfig
from otter_gguf.format.constants import (
    HF_ARCHITECTURES, NORM_TENSORS, NORM_WEIGHT_OFFSET, Keys, OtterTensor, hf_tensor_name, parse_gguf_name,
)
from otter_gguf.io.errors import InputError
from otter_gguf.io.gguf_read import base_info, field_value, ggml_shape_to_numpy, is_otter_tensor, open_gguf
from otter_gguf.io.gguf_write import OutTensor, copy_kvs, write_gguf
from otter_gguf.reference.model import BaseConfig, BaseModel, OtterModel, ReferenceError
from otter_gguf_converter import rope_unpermute

__all__ = ["base_config_from_gguf", "dequantize_gguf", "gguf_tensor_to_hf", "hf_tensor_to_gguf", "load_base_gguf",
           "load_otter_gguf"]

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# docs/OTTER.md §7: the per-head Q/K norms (qwen3, gemma3) and gemma3's four per-layer norms (llama.cpp's
# ffn_norm is its pre-FFN norm, HF's pre_feedforward_layernorm; post_attention_norm / post_ffw_norm the sandwich norms)
_QK_NORM_NAMES = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
_LAYER_NAMES_BY_ARCH = {
    "llama": _LAYER_NAMES,
    "qwen2": _LAYER_NAMES,
    "qwen3": {**_LAYER_NAMES, **_QK_NORM_NAMES},
    "gemma3": {**_LAYER_NAMES, **_QK_NORM_NAMES, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_attention_norm.weight": "post_attention_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_tensor_to_hf(name: str, arch: str = "llama") -> str | None:
    """The HF name of a base GGUF tensor of a base of architecture ``arch`` (``None`` for tensors the
    reference does not use)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer_names = _LAYER_NAMES_BY_ARCH[arch]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
        return f"model.layers.{int(parts[1])}.{layer_names[parts[2]]}"
    return None


def hf_tensor_to_gguf(name: str, arch: str = "llama") -> str:
    """The base GGUF name of the HF tensor ``name`` (the inverse of :func:`gguf_tensor_to_hf`); KeyError if
    the reference has no such tensor."""
    inv = {v: k for k, v in _GLOBAL_NAMES.items()}
    if name in inv:
        return inv[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        by_hf = {v: k for k, v in _LAYER_NAMES_BY_ARCH[arch].items()}
        if parts[3] in by_hf:
            return f"blk.{int(parts[2])}.{by_hf[parts[3]]}"
    raise KeyError(f"{name} is not a base tensor of a {arch} model")


def _unshift(arr: np.ndarray, arch: str) -> np.ndarray:
    """A norm weight in the HF convention (gemma3: llama.cpp's converter stored 1 + w; exact in float64)."""
    off = NORM_WEIGHT_OFFSET.get(arch, 0.0)
    return arr.astype(np.float64) - off if off else arr


def _read(path: str | os.PathLike):
    try:
        reader = open_gguf(path, "base")
        info = base_info(reader, os.fspath(path))
    except InputError as e:
        raise ReferenceError(str(e)) from None
    return reader, info


def base_config_from_gguf(path: str | os.PathLike, _reader=None) -> BaseConfig:
    """The :class:`BaseConfig` of a base GGUF, from its metadata."""
    reader, info = _reader or _read(path)
    arch = info.architecture
    names = {t.name for t in reader.tensors}

    def meta(key, default=None):
        v = field_value(reader, f"{arch}.{key}")
        return default if v is None else v

    rope_dim = meta("rope.dimension_count", info.hd)
    if int(rope_dim) != info.hd:
        raise ReferenceError(f"{path}: partial RoPE (rope.dimension_count {rope_dim} != head_dim {info.hd}) "
                             f"is not supported")
    if "rope_freqs.weight" in names:
        raise ReferenceError(f"{path}: per-dimension RoPE frequency factors (rope_freqs.weight, llama3 "
                             f"rope scaling) are not supported when training from a GGUF; use the HF checkpoint")
    scaling = None
    st = meta("rope.scaling.type")
    if st not in (None, "none"):
        if st != "linear":
            raise ReferenceError(f"{path}: rope scaling {st!r} is not supported (supported: linear)")
        scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor", 1.0))}
    bias = "blk.0.attn_q.bias" in names
    d = {
        "architectures": [HF_ARCHITECTURES[arch][0]],
        "hidden_size": info.d,
        "num_hidden_layers": info.n_layer,
        "num_attention_heads": info.h,
        "num_key_value_heads": info.h_kv,
        "head_dim": info.hd,
        "intermediate_size": info.f,
        "vocab_size": info.vocab_size,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": bias,
        "max_position_embeddings": int(meta("context_length", 4096)),
    }
    if arch == "gemma3":
        d.update(_gemma3_hparams(info, meta))
    return BaseConfig.from_hf_dict(d, source=os.fspath(path))


def _gemma3_hparams(info, meta) -> dict:
    """gemma3's own settings as llama.cpp reads them (src/models/gemma3.cpp), in HF's Gemma3TextConfig terms:
    the window and which layers slide, the RoPE base of each kind of layer (the fingerprint's values,
    gguf_read.arch_fingerprint), the attention scale 1/sqrt(hd) (1/sqrt(d/h) for the 62-layer 27B), tanh-GELU,
    the final logit soft-capping if the file has one; the embedding scale sqrt(d) is the architecture's."""
    fp = info.arch_fingerprint
    pattern = fp[Keys.Base.SLIDING_WINDOW_PATTERN]
    return {
        "layer_types": ["sliding_attention" if s else "full_attention" for s in pattern],
        "sliding_window": int(fp[Keys.Base.SLIDING_WINDOW]) if any(pattern) else None,
        "rope_theta": float(fp[Keys.Base.ROPE_FREQ_BASE]),
        "rope_local_base_freq": float(fp[Keys.Base.ROPE_FREQ_BASE_SWA]),
        "query_pre_attn_scalar": info.d / info.h if info.n_layer == 62 else info.hd,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": meta("final_logit_softcapping"),
    }


def _dequantized(path: Path, t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (HF) shape, GGUF row layout."""
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ReferenceError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf-py "
                             f"cannot dequantize") from None
    return np.array(arr, dtype=np.float32, order="C", copy=True).reshape(ggml_shape_to_numpy(t.shape))


def load_base_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> BaseModel:
    """A :class:`BaseModel` from a base GGUF (any type gguf-py can dequantize).

    Otter tensors in the file (an Otter GGUF) are ignored: the base is read.
    """
    p = Path(path)
    reader, info = _read(p)
    cfg = base_config_from_gguf(p, (reader, info))
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if is_otter_tensor(t.name):
            continue
        hf = gguf_tensor_to_hf(t.name, cfg.architecture)
        if hf is None:
            continue
        arr = _dequantized(p, t)
        if hf.endswith("norm.weight"):
            arr = _unshift(arr, cfg.architecture)
        if cfg.architecture == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            arr = rope_unpermute(arr, cfg.num_attention_heads)
        elif cfg.architecture == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            arr = rope_unpermute(arr, cfg.num_key_value_heads)
        weights[hf] = torch.from_numpy(arr)
    return BaseModel(cfg, weights, dtype)


def load_otter_gguf(path: str | os.PathLike, config: OtterConfig, dtype: torch.dtype = torch.float32,
                    base: BaseModel | None = None) -> OtterModel:
    """The reference :class:`OtterModel` of an Otter GGUF's own (dequantized) weights.

    ``config`` is the head's adapter config (shapes, signal names); the Otter
    tensors are read back from the file (the side Q/K rows of a ``llama``
    model un-permuted per side head, a gemma3 model's Otter norms from ``1 + w``
    back to ``w``: the inverse of ``otter-gguf convert``), the base as
    :func:`load_base_gguf` (or ``base``, already loaded)."""
    p = Path(path)
    reader, _info = _read(p)
    base = base if base is not None else load_base_gguf(p, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if not is_otter_tensor(t.name):
            continue
        kind, _bid, _suffix = parse_gguf_name(t.name)
        arch = base.config.architecture
        arr = _dequantized(p, t)
        if kind in NORM_TENSORS:
            arr = _unshift(arr, arch)
        if arch == "llama" and kind == OtterTensor.ATTN_Q:
            arr = rope_unpermute(arr, config.otter_num_attention_heads)
        elif arch == "llama" and kind == OtterTensor.ATTN_K:
            arr = rope_unpermute(arr, config.otter_num_key_value_heads)
        try:
            name = hf_tensor_name(t.name, arch)
        except KeyError:
            raise ReferenceError(f"{p}: {t.name} is not a tensor of an Otter head on a {arch} base") from None
        tensors[name] = torch.from_numpy(arr)
    if not tensors:
        raise ReferenceError(f"{p}: no Otter tensors (a plain GGUF)")
    return OtterModel(base, config, tensors)


def dequantize_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` again with every tensor dequantized to F32 (same names, order, layout and
    metadata; ``general.file_type`` set to all-F32): the unquantized reference of a model
    that only exists quantized. Its weights are exactly the values ``src`` encodes."""
    from gguf import GGMLQuantizationType, GGUFValueType

    s, d = Path(src), Path(dst)
    reader, info = _read(s)
    tensors = []
    for t in reader.tensors:
        shape = ggml_shape_to_numpy(t.shape)
        tensors.append(OutTensor(t.name, shape, GGMLQuantizationType.F32, int(np.prod(shape)) * 4,
                                 lambda t=t: _dequantized(s, t)))
    kvs = copy_kvs(reader, replace={"general.file_type": (0, GGUFValueType.UINT32)})
    write_gguf(d, info.architecture, int(reader.alignment), [kvs], tensors)
    return d
