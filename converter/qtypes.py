"""Output types for Otter tensors: plain types, llama.cpp-style mixes, fallbacks.

The mapping is documented in docs/FORMAT.md ("Otter tensor types"). It follows
``llama_tensor_get_type_impl`` in the pinned llama.cpp ``src/llama-quant.cpp``
for a dense (non-MoE, non-Falcon) model, with the Otter tensors playing the
roles of their base counterparts (``otter_attn_v`` ~ ``attn_v``,
``otter_ffn_down`` ~ ``ffn_down``, ``otter_attn_output`` ~ ``attn_output``,
``otter_token_embd`` ~ ``token_embd``); the head is the exception: it is kept
at least at q8_0 (llama-quantize uses q6_k for ``output``), because it is
small and the signal is read from it directly.

``llama_model_quantize`` of the patched runtime (patch 0006,
``llama_otter_tensor_type``) applies the same table (``MIX_RULES``) to an Otter
GGUF, so ``otter-gguf convert --outtype X`` and llama-quantize to X give every
Otter tensor the same type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from otter_gguf.format.constants import OtterTensor, parse_gguf_name

#: Plain types: every 2-D Otter tensor gets this type (head: see head_type()).
PLAIN_TYPES: dict[str, QT] = {
    "f32": QT.F32,
    "f16": QT.F16,
    "bf16": QT.BF16,
    "q8_0": QT.Q8_0,
    "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1,
    "q5_0": QT.Q5_0,
    "q5_1": QT.Q5_1,
    "q2_k": QT.Q2_K,
    "q3_k": QT.Q3_K,
    "q4_k": QT.Q4_K,
    "q5_k": QT.Q5_K,
    "q6_k": QT.Q6_K,
}

#: llama.cpp mixes (llama-quantize names) -> their default type.
MIX_TYPES: dict[str, QT] = {
    "q2_k_s": QT.Q2_K,
    "q3_k_s": QT.Q3_K,
    "q3_k_m": QT.Q3_K,
    "q3_k_l": QT.Q3_K,
    "q4_k_s": QT.Q4_K,
    "q4_k_m": QT.Q4_K,
    "q5_k_s": QT.Q5_K,
    "q5_k_m": QT.Q5_K,
}

OUTTYPES: tuple[str, ...] = tuple(PLAIN_TYPES) + tuple(MIX_TYPES)
HEAD_TYPES: tuple[str, ...] = tuple(PLAIN_TYPES)

#: types the head may keep as they are (everything else is raised to q8_0)
_HIGH_TYPES = {QT.F32, QT.F16, QT.BF16, QT.Q8_0}

#: llama-quantize's fallback table for rows that do not fit the block size
_FALLBACK = {
    QT.Q2_K: QT.Q4_0,
    QT.Q3_K: QT.Q4_0,
    QT.Q4_K: QT.Q5_0,
    QT.Q5_K: QT.Q5_1,
    QT.Q6_K: QT.Q8_0,
}


def parse_outtype(name: str) -> str:
    n = name.strip().lower()
    if n not in PLAIN_TYPES and n not in MIX_TYPES:
        raise ValueError(f"unknown output type {name!r}; expected one of: {', '.join(OUTTYPES)}")
    return n


def head_type(outtype: str, head: str | None) -> QT:
    """Type of ``otter_head.weight``: --head-type, else --outtype raised to at least q8_0."""
    if head is not None:
        return PLAIN_TYPES[head]
    t = PLAIN_TYPES.get(outtype)
    if t is not None and t in _HIGH_TYPES:
        return t
    return QT.Q8_0


def _more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp: use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


#: The mixes' per-layer upgrades of the Otter tensors, the table of docs/FORMAT.md
#: ("Otter tensor types"); ``llama_otter_tensor_type`` in
#: patches/0006-llama-quantize-*.patch implements the same table for
#: ``llama_model_quantize``. role -> mix -> rule(i, n_layer, side_gqa), which
#: returns the upgraded type or None (the mix's default type); roles and mixes
#: not listed get the default type.
MIX_RULES: dict[OtterTensor, dict[str, Callable[[int, int, int], QT | None]]] = {
    OtterTensor.ATTN_V: {
        "q2_k_s": lambda i, n, gqa: QT.Q4_K if gqa >= 4 else None,
        "q3_k_m": lambda i, n, gqa: QT.Q5_K if i < 2 else QT.Q4_K,
        "q3_k_l": lambda i, n, gqa: QT.Q5_K,
        "q4_k_s": lambda i, n, gqa: QT.Q5_K if i < 4 else None,
        "q4_k_m": lambda i, n, gqa: QT.Q6_K if _more_bits(i, n) else None,
        "q5_k_m": lambda i, n, gqa: QT.Q6_K if _more_bits(i, n) else None,
    },
    OtterTensor.FFN_DOWN: {
        "q2_k_s": lambda i, n, gqa: QT.Q4_K if i < n // 8 else None,
        "q3_k_m": lambda i, n, gqa: QT.Q5_K if i < n // 16 else QT.Q4_K,
        "q3_k_l": lambda i, n, gqa: QT.Q5_K,
        "q4_k_s": lambda i, n, gqa: QT.Q5_K if i < n // 8 else None,
        "q4_k_m": lambda i, n, gqa: QT.Q6_K if _more_bits(i, n) else None,
        "q5_k_m": lambda i, n, gqa: QT.Q6_K if _more_bits(i, n) else None,
    },
    OtterTensor.ATTN_OUT: {
        "q3_k_m": lambda i, n, gqa: QT.Q4_K,
        "q3_k_l": lambda i, n, gqa: QT.Q5_K,
    },
}

def tensor_type(outtype: str, name: str, n_layer: int, side_gqa: int) -> QT:
    """Wanted type of a 2-D Otter tensor other than the head (before the block-size fallback).

    ``name`` is the GGUF name (``blk.N.otter_ROLE.weight``, ``otter_token_embd.weight``),
    ``n_layer`` the number of layers and ``side_gqa`` h2 / h2_kv.
    """
    if outtype in PLAIN_TYPES:
        return PLAIN_TYPES[outtype]
    kind, bid, _ = parse_gguf_name(name)
    rule = MIX_RULES.get(kind, {}).get(outtype)
    return (rule(bid, n_layer, side_gqa) if rule else None) or MIX_TYPES[outtype]


@dataclass(frozen=True)
class Fallback:
    name: str
    ne0: int
    wanted: QT
    used: QT


def fit_type(name: str, qtype: QT, ne0: int) -> tuple[QT, Fallback | None]:
    """Return ``qtype`` if rows of ``ne0`` fit its blocks, else llama-quantize's fallback."""
    block = GGML_QUANT_SIZES[qtype][0]
    if ne0 % block == 0:
        return qtype, None
    used = _FALLBACK.get(qtype, qtype)
    if ne0 % GGML_QUANT_SIZES[used][0] != 0:
        used = QT.F16
    return used, Fallback(name, ne0, qtype, used)


def type_name(t: QT) -> str:
    return t.name.lower()
