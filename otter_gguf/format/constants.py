"""The names of the Otter format, in one place (docs/FORMAT.md, docs/OTTER.md §5).

In the style of gguf-py's ``gguf/constants.py``: the ``otter.*`` GGUF metadata
keys (:class:`Keys`), the Otter GGUF tensor names (:class:`OtterTensor`,
:data:`TENSOR_NAMES`), the adapter's HF tensor names (:data:`HF_TENSOR_NAMES`)
and the mapping between the two, the head kinds (:class:`HeadKind`) and the
supported base architectures. Every Python module spells these names through
this one; the C++ side (patches/0003, 0005) spells the same strings and
tests/test_constants.py checks both against docs/OTTER.md. Pure Python, no imports
of the project.
"""

from __future__ import annotations

import re
from enum import Enum, IntEnum, auto
from typing import Iterator

# The `otter.version` of an Otter GGUF and the `otter_version` of an adapter (docs/OTTER.md §5).
OTTER_FORMAT_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

#: the one architecture table of the HF side: llama.cpp architecture -> (HF ``architectures[0]``,
#: HF ``model_type``) of the checkpoints it converts from (the converter, the reference's loader and
#: its GGUF -> HF bridge all read it)
HF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

# the base architectures the patched llama.cpp runtime (patches/) runs an Otter head on (qwen3, gemma3: the
# side stream of docs/OTTER.md §7 in their graphs, tests/test_runtime.py)
RUNTIME_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

KEY_PREFIX = "otter."      # every Otter metadata key starts with this
TENSOR_PREFIX = "otter_"   # an Otter tensor name starts with this or has it after "blk.{bid}."


class Keys:
    """The ``otter.*`` metadata keys of an Otter GGUF (docs/FORMAT.md), in file order."""

    VERSION = "otter.version"
    BASE_MODEL = "otter.base_model"
    EMBEDDING_LENGTH = "otter.embedding_length"

    class Attention:
        HEAD_COUNT = "otter.attention.head_count"
        HEAD_COUNT_KV = "otter.attention.head_count_kv"

    FEED_FORWARD_LENGTH = "otter.feed_forward_length"

    class Head:
        OUTPUT_SIZE = "otter.head.output_size"
        KIND = "otter.head.kind"
        SIGNAL_NAMES = "otter.head.signal_names"

    class Base:
        """The base-model fingerprint (``otter.base.*``)."""

        ARCHITECTURE = "otter.base.architecture"
        EMBEDDING_LENGTH = "otter.base.embedding_length"
        BLOCK_COUNT = "otter.base.block_count"
        ATTENTION_HEAD_COUNT = "otter.base.attention.head_count"
        ATTENTION_HEAD_COUNT_KV = "otter.base.attention.head_count_kv"
        ATTENTION_KEY_LENGTH = "otter.base.attention.key_length"
        FEED_FORWARD_LENGTH = "otter.base.feed_forward_length"
        VOCAB_SIZE = "otter.base.vocab_size"
        VOCAB_HASH = "otter.base.vocab_hash"
        # architecture-specific fingerprint keys (ARCH_FINGERPRINT_KEYS): gemma3's sliding-window attention
        SLIDING_WINDOW = "otter.base.attention.sliding_window"
        SLIDING_WINDOW_PATTERN = "otter.base.attention.sliding_window_pattern"
        ROPE_FREQ_BASE = "otter.base.rope.freq_base"
        ROPE_FREQ_BASE_SWA = "otter.base.rope.freq_base_swa"


class SidecarKeys:
    """The ``general.*`` / ``adapter.*`` keys that mark an Otter adapter GGUF (a sidecar, docs/FORMAT.md),
    as llama.cpp marks a LoRA GGUF (``general.type = adapter``, ``adapter.type = lora``)."""

    ARCHITECTURE = "general.architecture"  # the base's architecture
    GENERAL_TYPE = "general.type"          # = GENERAL_TYPE_ADAPTER
    ADAPTER_TYPE = "adapter.type"          # = ADAPTER_TYPE_OTTER
    NAME = "general.name"                  # optional: the head's name
    ALIGNMENT = "general.alignment"        # optional, as in any GGUF


GENERAL_TYPE_ADAPTER = "adapter"
ADAPTER_TYPE_OTTER = "otter"


# fingerprint key -> the base property it records: `general.<name>` for the architecture,
# `{arch}.<name>` for the hyperparameters, and the vocabulary's size and hash (docs/FORMAT.md)
FINGERPRINT_KEYS: dict[str, str] = {
    Keys.Base.ARCHITECTURE: "architecture",
    Keys.Base.EMBEDDING_LENGTH: "embedding_length",
    Keys.Base.BLOCK_COUNT: "block_count",
    Keys.Base.ATTENTION_HEAD_COUNT: "head_count",
    Keys.Base.ATTENTION_HEAD_COUNT_KV: "head_count_kv",
    Keys.Base.ATTENTION_KEY_LENGTH: "key_length",
    Keys.Base.FEED_FORWARD_LENGTH: "feed_forward_length",
    Keys.Base.VOCAB_SIZE: "vocab_size",
    Keys.Base.VOCAB_HASH: "vocab_hash",
}

# the fingerprint keys only some base architectures have, written after ALL_KEYS (docs/FORMAT.md): for gemma3
# the sliding window `n_swa`, which layers use it (a bool per layer, as llama.cpp's
# `{arch}.attention.sliding_window_pattern` array: true = sliding), and the RoPE bases of the full and the
# sliding layers, as the base's llama.cpp hparams have them
ARCH_FINGERPRINT_KEYS: dict[str, dict[str, str]] = {
    "gemma3": {
        Keys.Base.SLIDING_WINDOW: "sliding_window",
        Keys.Base.SLIDING_WINDOW_PATTERN: "sliding_window_pattern",
        Keys.Base.ROPE_FREQ_BASE: "rope_freq_base",
        Keys.Base.ROPE_FREQ_BASE_SWA: "rope_freq_base_swa",
    },
}

# every key every Otter GGUF has, in the order the converter writes them
ALL_KEYS: tuple[str, ...] = (
    Keys.VERSION, Keys.BASE_MODEL, Keys.EMBEDDING_LENGTH, Keys.Attention.HEAD_COUNT,
    Keys.Attention.HEAD_COUNT_KV, Keys.FEED_FORWARD_LENGTH, Keys.Head.OUTPUT_SIZE, Keys.Head.KIND,
    Keys.Head.SIGNAL_NAMES, *FINGERPRINT_KEYS,
)


def arch_keys(arch: str) -> tuple[str, ...]:
    """Every ``otter.*`` key of an Otter GGUF on a base of architecture ``arch``, in file order."""
    return ALL_KEYS + tuple(ARCH_FINGERPRINT_KEYS.get(arch, {}))


class HeadKind(str, Enum):
    """``head_kind`` of an adapter / ``otter.head.kind`` of a GGUF; compares equal to its string."""

    REWARD = "reward"              # n_out named scalar signals
    TOKEN_REWARD = "token_reward"  # n_out == V: one value per candidate next token

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class OtterTensor(IntEnum):
    """The kinds of Otter tensors (the order they are written in: :func:`tensor_keys`)."""

    TOKEN_EMBD = auto()
    ATTN_NORM = auto()
    ATTN_Q = auto()
    ATTN_K = auto()
    ATTN_V = auto()
    ATTN_OUT = auto()
    FFN_NORM = auto()
    FFN_GATE = auto()
    FFN_UP = auto()
    FFN_DOWN = auto()
    OUTPUT_NORM = auto()
    HEAD = auto()
    # docs/OTTER.md §7 (qwen3, gemma3)
    ATTN_Q_NORM = auto()     # per-head RMSNorm of the side queries [hd]
    ATTN_K_NORM = auto()     # per-head RMSNorm of the side keys [hd]
    ATTN_POST_NORM = auto()  # gemma3 sandwich norm of the attention block's output [d2]
    FFN_POST_NORM = auto()   # gemma3 sandwich norm of the FFN block's output [d2]


# GGUF name templates, without the ".weight"/".bias" suffix (as gguf-py's TENSOR_NAMES)
TENSOR_NAMES: dict[OtterTensor, str] = {
    OtterTensor.TOKEN_EMBD: "otter_token_embd",
    OtterTensor.ATTN_NORM: "blk.{bid}.otter_attn_norm",
    OtterTensor.ATTN_Q: "blk.{bid}.otter_attn_q",
    OtterTensor.ATTN_K: "blk.{bid}.otter_attn_k",
    OtterTensor.ATTN_V: "blk.{bid}.otter_attn_v",
    OtterTensor.ATTN_OUT: "blk.{bid}.otter_attn_output",
    OtterTensor.FFN_NORM: "blk.{bid}.otter_ffn_norm",
    OtterTensor.FFN_GATE: "blk.{bid}.otter_ffn_gate",
    OtterTensor.FFN_UP: "blk.{bid}.otter_ffn_up",
    OtterTensor.FFN_DOWN: "blk.{bid}.otter_ffn_down",
    OtterTensor.OUTPUT_NORM: "otter_output_norm",
    OtterTensor.HEAD: "otter_head",
    # the base's llama.cpp names (LLM_TENSOR_ATTN_Q_NORM "attn_q_norm", ATTN_POST_NORM "post_attention_norm",
    # FFN_POST_NORM "post_ffw_norm") with the otter_ prefix, as for every name above
    OtterTensor.ATTN_Q_NORM: "blk.{bid}.otter_attn_q_norm",
    OtterTensor.ATTN_K_NORM: "blk.{bid}.otter_attn_k_norm",
    OtterTensor.ATTN_POST_NORM: "blk.{bid}.otter_post_attention_norm",
    OtterTensor.FFN_POST_NORM: "blk.{bid}.otter_post_ffw_norm",
}

# the adapter's HF name templates (docs/OTTER.md §5), without the suffix
HF_TENSOR_NAMES: dict[OtterTensor, str] = {
    OtterTensor.TOKEN_EMBD: "otter.embed_tokens",
    OtterTensor.ATTN_NORM: "otter.layers.{bid}.input_layernorm",
    OtterTensor.ATTN_Q: "otter.layers.{bid}.self_attn.q_proj",
    OtterTensor.ATTN_K: "otter.layers.{bid}.self_attn.k_proj",
    OtterTensor.ATTN_V: "otter.layers.{bid}.self_attn.v_proj",
    OtterTensor.ATTN_OUT: "otter.layers.{bid}.self_attn.o_proj",
    OtterTensor.FFN_NORM: "otter.layers.{bid}.post_attention_layernorm",
    OtterTensor.FFN_GATE: "otter.layers.{bid}.mlp.gate_proj",
    OtterTensor.FFN_UP: "otter.layers.{bid}.mlp.up_proj",
    OtterTensor.FFN_DOWN: "otter.layers.{bid}.mlp.down_proj",
    OtterTensor.OUTPUT_NORM: "otter.norm",
    OtterTensor.HEAD: "otter.head",
    OtterTensor.ATTN_Q_NORM: "otter.layers.{bid}.self_attn.q_norm",
    OtterTensor.ATTN_K_NORM: "otter.layers.{bid}.self_attn.k_norm",
}

# gemma3's HF names (docs/OTTER.md §7): its four per-layer norms are input_layernorm (pre-attention),
# post_attention_layernorm (sandwich), pre_feedforward_layernorm (pre-FFN) and post_feedforward_layernorm (sandwich),
# so `post_attention_layernorm` is FFN_NORM for the llama family and ATTN_POST_NORM for gemma3
GEMMA3_HF_TENSOR_NAMES: dict[OtterTensor, str] = {
    **HF_TENSOR_NAMES,
    OtterTensor.ATTN_POST_NORM: "otter.layers.{bid}.post_attention_layernorm",
    OtterTensor.FFN_NORM: "otter.layers.{bid}.pre_feedforward_layernorm",
    OtterTensor.FFN_POST_NORM: "otter.layers.{bid}.post_feedforward_layernorm",
}

WEIGHT, BIAS = "weight", "bias"

# the kinds that may have a bias (all optional, docs/OTTER.md §5)
BIAS_TENSORS = (OtterTensor.ATTN_Q, OtterTensor.ATTN_K, OtterTensor.ATTN_V, OtterTensor.HEAD)

# the RMSNorm weights (1-D: [d2], the per-head Q/K norms [hd]); never quantized
NORM_TENSORS = (OtterTensor.ATTN_NORM, OtterTensor.FFN_NORM, OtterTensor.OUTPUT_NORM, OtterTensor.ATTN_Q_NORM,
                OtterTensor.ATTN_K_NORM, OtterTensor.ATTN_POST_NORM, OtterTensor.FFN_POST_NORM)

# the kinds of an adapter for each base architecture (docs/OTTER.md §5, §7)
_COMMON_TENSORS = tuple(k for k in OtterTensor if k <= OtterTensor.HEAD)
_QK_NORMS = (OtterTensor.ATTN_Q_NORM, OtterTensor.ATTN_K_NORM)
ARCH_TENSORS: dict[str, tuple[OtterTensor, ...]] = {
    "llama": _COMMON_TENSORS,
    "qwen2": _COMMON_TENSORS,
    "qwen3": _COMMON_TENSORS + _QK_NORMS,
    "gemma3": _COMMON_TENSORS + _QK_NORMS + (OtterTensor.ATTN_POST_NORM, OtterTensor.FFN_POST_NORM),
}

# the adapter (HF) name templates of each base architecture
HF_TENSOR_NAMES_BY_ARCH: dict[str, dict[OtterTensor, str]] = {
    "llama": HF_TENSOR_NAMES, "qwen2": HF_TENSOR_NAMES, "qwen3": HF_TENSOR_NAMES, "gemma3": GEMMA3_HF_TENSOR_NAMES,
}

# what llama.cpp's converter adds to every RMSNorm weight of an architecture (HF gemma3 applies x * (1 + w) and
# stores w; the GGUF stores 1 + w): the Otter converter adds the same to every Otter norm weight (docs/OTTER.md §7)
NORM_WEIGHT_OFFSET: dict[str, float] = {"gemma3": 1.0}

# the kinds with one tensor per layer
LAYER_TENSORS = tuple(k for k in OtterTensor if "{bid}" in TENSOR_NAMES[k])

# (kind, suffix) of every tensor in file order, biases right after their weights
_LAYER_ORDER = (
    (OtterTensor.ATTN_NORM, WEIGHT), (OtterTensor.ATTN_Q, WEIGHT), (OtterTensor.ATTN_K, WEIGHT),
    (OtterTensor.ATTN_V, WEIGHT), (OtterTensor.ATTN_Q, BIAS), (OtterTensor.ATTN_K, BIAS),
    (OtterTensor.ATTN_V, BIAS), (OtterTensor.ATTN_Q_NORM, WEIGHT), (OtterTensor.ATTN_K_NORM, WEIGHT),
    (OtterTensor.ATTN_OUT, WEIGHT), (OtterTensor.ATTN_POST_NORM, WEIGHT), (OtterTensor.FFN_NORM, WEIGHT),
    (OtterTensor.FFN_GATE, WEIGHT), (OtterTensor.FFN_UP, WEIGHT), (OtterTensor.FFN_DOWN, WEIGHT),
    (OtterTensor.FFN_POST_NORM, WEIGHT),
)
_HEAD_ORDER = ((OtterTensor.TOKEN_EMBD, WEIGHT),)
_TAIL_ORDER = ((OtterTensor.OUTPUT_NORM, WEIGHT), (OtterTensor.HEAD, WEIGHT), (OtterTensor.HEAD, BIAS))


def _name(templates: dict[OtterTensor, str], kind: OtterTensor, bid: int | None, suffix: str) -> str:
    if suffix not in (WEIGHT, BIAS) or (suffix == BIAS and kind not in BIAS_TENSORS):
        raise ValueError(f"{kind.name} has no {suffix!r} tensor")
    t = templates[kind]
    if ("{bid}" in t) != (bid is not None):
        raise ValueError(f"{kind.name}: " + ("a layer index is needed" if bid is None else "not a per-layer tensor"))
    return (t.format(bid=int(bid)) if bid is not None else t) + "." + suffix


def gguf_name(kind: OtterTensor, bid: int | None = None, suffix: str = WEIGHT) -> str:
    """GGUF name of one Otter tensor, e.g. ``gguf_name(OtterTensor.ATTN_Q, 1)`` -> ``blk.1.otter_attn_q.weight``."""
    return _name(TENSOR_NAMES, kind, bid, suffix)


def _hf_templates(arch: str | None) -> dict[OtterTensor, str]:
    if arch is None:
        return HF_TENSOR_NAMES
    try:
        return HF_TENSOR_NAMES_BY_ARCH[arch]
    except KeyError:
        raise ValueError(f"unknown base architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})") from None


def hf_name(kind: OtterTensor, bid: int | None = None, suffix: str = WEIGHT, arch: str | None = None) -> str:
    """Adapter (docs/OTTER.md §5) name of one Otter tensor, e.g. ``otter.layers.1.self_attn.q_proj.weight``.

    ``arch``: the base architecture, whose HF names the adapter follows (docs/OTTER.md §7: gemma3's FFN_NORM is
    ``pre_feedforward_layernorm``); None: the llama-family names (llama, qwen2, qwen3)."""
    templates = _hf_templates(arch)
    if kind not in templates:
        raise ValueError(f"{kind.name} is not a tensor of an adapter for base architecture {arch or 'llama'!r}")
    return _name(templates, kind, bid, suffix)


def tensor_keys(n_layer: int, *, biases: bool = True,
                arch: str | None = None) -> Iterator[tuple[OtterTensor, int | None, str]]:
    """(kind, layer or None, suffix) of every Otter tensor of an ``n_layer`` model on a base of architecture
    ``arch`` (None: llama), in file order."""
    kinds = ARCH_TENSORS.get(arch or "llama")
    if kinds is None:
        raise ValueError(f"unknown base architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def keep(order):
        return [ks for ks in order if (biases or ks[1] == WEIGHT) and ks[0] in kinds]

    for k, s in keep(_HEAD_ORDER):
        yield k, None, s
    for bid in range(n_layer):
        for k, s in keep(_LAYER_ORDER):
            yield k, bid, s
    for k, s in keep(_TAIL_ORDER):
        yield k, None, s


def _pattern(templates: dict[OtterTensor, str]) -> dict[re.Pattern, OtterTensor]:
    return {re.compile(re.escape(t).replace(re.escape("{bid}"), r"(0|[1-9][0-9]*)") + r"\.(weight|bias)"): k
            for k, t in templates.items()}


_GGUF_RE = _pattern(TENSOR_NAMES)
_HF_RE = {id(t): _pattern(t) for t in (HF_TENSOR_NAMES, GEMMA3_HF_TENSOR_NAMES)}


def _parse(patterns: dict[re.Pattern, OtterTensor], name: str) -> tuple[OtterTensor, int | None, str]:
    for rx, kind in patterns.items():
        m = rx.fullmatch(name)
        if m is None:
            continue
        *bid, suffix = m.groups()
        if suffix == BIAS and kind not in BIAS_TENSORS:
            break
        return kind, (int(bid[0]) if bid else None), suffix
    raise KeyError(name)


def parse_gguf_name(name: str) -> tuple[OtterTensor, int | None, str]:
    """(kind, layer or None, suffix) of an Otter GGUF tensor name; KeyError if it is not one."""
    return _parse(_GGUF_RE, name)


def parse_hf_name(name: str, arch: str | None = None) -> tuple[OtterTensor, int | None, str]:
    """(kind, layer or None, suffix) of an adapter tensor name (docs/OTTER.md §5) of an adapter for base architecture
    ``arch`` (None: the llama-family names); KeyError if it is not one."""
    return _parse(_HF_RE[id(_hf_templates(arch))], name)


def gguf_tensor_name(hf: str, arch: str | None = None) -> str:
    """GGUF name of an adapter tensor (docs/OTTER.md §5 -> docs/FORMAT.md); KeyError if ``hf`` is not one."""
    return gguf_name(*parse_hf_name(hf, arch))


def hf_tensor_name(gguf: str, arch: str | None = None) -> str:
    """Adapter name of an Otter GGUF tensor (docs/FORMAT.md -> docs/OTTER.md §5); KeyError if ``gguf`` is not one
    (or not one of an adapter for ``arch``)."""
    kind, bid, suffix = parse_gguf_name(gguf)
    if kind not in _hf_templates(arch):
        raise KeyError(gguf)
    return hf_name(kind, bid, suffix, arch)


def is_otter_tensor(name: str) -> bool:
    """Whether a GGUF tensor belongs to the Otter side stream (the rule of the patched loader)."""
    return name.startswith(TENSOR_PREFIX) or f".{TENSOR_PREFIX}" in name


__all__ = [
    "ARCH_FINGERPRINT_KEYS", "ARCH_TENSORS", "GEMMA3_HF_TENSOR_NAMES", "HF_TENSOR_NAMES_BY_ARCH", "NORM_WEIGHT_OFFSET",
    "RUNTIME_ARCHITECTURES", "arch_keys",
    "ADAPTER_TYPE_OTTER", "ALL_KEYS", "BIAS", "GENERAL_TYPE_ADAPTER", "SidecarKeys", "BIAS_TENSORS", "FINGERPRINT_KEYS", "HF_TENSOR_NAMES", "HeadKind", "KEY_PREFIX", "Keys",
    "LAYER_TENSORS", "NORM_TENSORS", "OTTER_FORMAT_VERSION", "OtterTensor", "SUPPORTED_ARCHITECTURES", "TENSOR_NAMES",
    "TENSOR_PREFIX", "WEIGHT", "gguf_name", "gguf_tensor_name", "hf_name", "hf_tensor_name", "is_otter_tensor",
    "parse_gguf_name", "parse_hf_name", "tensor_keys",
]
