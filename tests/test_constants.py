"""The Otter names (otter_gguf.format.constants) pinned to docs/OTTER.md, the docs and the C++ patches.

This is the one place where the names are spelled out literally: docs/FORMAT.md's
metadata and tensor tables, docs/OTTER.md §5's adapter tensor table. Every other
test and module uses the constants, so a rename shows up here (and, through the
patch and doc checks, on the other sides too).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from otter_gguf.format import constants as C
from otter_gguf.format.constants import BIAS, HeadKind, Keys, OtterTensor as T

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

# docs/FORMAT.md "Metadata", in its (= the converter's) order
SPEC_KEYS = [
    "otter.version",
    "otter.base_model",
    "otter.embedding_length",
    "otter.attention.head_count",
    "otter.attention.head_count_kv",
    "otter.feed_forward_length",
    "otter.head.output_size",
    "otter.head.kind",
    "otter.head.signal_names",
    "otter.base.architecture",
    "otter.base.embedding_length",
    "otter.base.block_count",
    "otter.base.attention.head_count",
    "otter.base.attention.head_count_kv",
    "otter.base.attention.key_length",
    "otter.base.feed_forward_length",
    "otter.base.vocab_size",
    "otter.base.vocab_hash",
]

# (GGUF name, adapter name) of every tensor of a 2-layer adapter with all the optional biases, in file order:
# docs/FORMAT.md "Tensors" and docs/OTTER.md §5
SPEC_TENSORS_2_LAYERS = [
    ("otter_token_embd.weight", "otter.embed_tokens.weight"),
    ("blk.0.otter_attn_norm.weight", "otter.layers.0.input_layernorm.weight"),
    ("blk.0.otter_attn_q.weight", "otter.layers.0.self_attn.q_proj.weight"),
    ("blk.0.otter_attn_k.weight", "otter.layers.0.self_attn.k_proj.weight"),
    ("blk.0.otter_attn_v.weight", "otter.layers.0.self_attn.v_proj.weight"),
    ("blk.0.otter_attn_q.bias", "otter.layers.0.self_attn.q_proj.bias"),
    ("blk.0.otter_attn_k.bias", "otter.layers.0.self_attn.k_proj.bias"),
    ("blk.0.otter_attn_v.bias", "otter.layers.0.self_attn.v_proj.bias"),
    ("blk.0.otter_attn_output.weight", "otter.layers.0.self_attn.o_proj.weight"),
    ("blk.0.otter_ffn_norm.weight", "otter.layers.0.post_attention_layernorm.weight"),
    ("blk.0.otter_ffn_gate.weight", "otter.layers.0.mlp.gate_proj.weight"),
    ("blk.0.otter_ffn_up.weight", "otter.layers.0.mlp.up_proj.weight"),
    ("blk.0.otter_ffn_down.weight", "otter.layers.0.mlp.down_proj.weight"),
    ("blk.1.otter_attn_norm.weight", "otter.layers.1.input_layernorm.weight"),
    ("blk.1.otter_attn_q.weight", "otter.layers.1.self_attn.q_proj.weight"),
    ("blk.1.otter_attn_k.weight", "otter.layers.1.self_attn.k_proj.weight"),
    ("blk.1.otter_attn_v.weight", "otter.layers.1.self_attn.v_proj.weight"),
    ("blk.1.otter_attn_q.bias", "otter.layers.1.self_attn.q_proj.bias"),
    ("blk.1.otter_attn_k.bias", "otter.layers.1.self_attn.k_proj.bias"),
    ("blk.1.otter_attn_v.bias", "otter.layers.1.self_attn.v_proj.bias"),
    ("blk.1.otter_attn_output.weight", "otter.layers.1.self_attn.o_proj.weight"),
    ("blk.1.otter_ffn_norm.weight", "otter.layers.1.post_attention_layernorm.weight"),
    ("blk.1.otter_ffn_gate.weight", "otter.layers.1.mlp.gate_proj.weight"),
    ("blk.1.otter_ffn_up.weight", "otter.layers.1.mlp.up_proj.weight"),
    ("blk.1.otter_ffn_down.weight", "otter.layers.1.mlp.down_proj.weight"),
    ("otter_output_norm.weight", "otter.norm.weight"),
    ("otter_head.weight", "otter.head.weight"),
    ("otter_head.bias", "otter.head.bias"),
]
# the architecture-specific fingerprint keys (docs/FORMAT.md), written after SPEC_KEYS
SPEC_ARCH_KEYS = {
    "gemma3": ["otter.base.attention.sliding_window", "otter.base.attention.sliding_window_pattern",
               "otter.base.rope.freq_base", "otter.base.rope.freq_base_swa"],
}

# docs/OTTER.md §7: one layer of a qwen3 / gemma3 adapter (no biases), in file order
SPEC_QWEN3_LAYER_0 = [
    ("blk.0.otter_attn_norm.weight", "otter.layers.0.input_layernorm.weight"),
    ("blk.0.otter_attn_q.weight", "otter.layers.0.self_attn.q_proj.weight"),
    ("blk.0.otter_attn_k.weight", "otter.layers.0.self_attn.k_proj.weight"),
    ("blk.0.otter_attn_v.weight", "otter.layers.0.self_attn.v_proj.weight"),
    ("blk.0.otter_attn_q_norm.weight", "otter.layers.0.self_attn.q_norm.weight"),
    ("blk.0.otter_attn_k_norm.weight", "otter.layers.0.self_attn.k_norm.weight"),
    ("blk.0.otter_attn_output.weight", "otter.layers.0.self_attn.o_proj.weight"),
    ("blk.0.otter_ffn_norm.weight", "otter.layers.0.post_attention_layernorm.weight"),
    ("blk.0.otter_ffn_gate.weight", "otter.layers.0.mlp.gate_proj.weight"),
    ("blk.0.otter_ffn_up.weight", "otter.layers.0.mlp.up_proj.weight"),
    ("blk.0.otter_ffn_down.weight", "otter.layers.0.mlp.down_proj.weight"),
]
# gemma3: the sandwich norm after the attention output, its FFN norm's HF name, the sandwich norm after the FFN
SPEC_GEMMA3_LAYER_0 = SPEC_QWEN3_LAYER_0[:7] + [
    ("blk.0.otter_post_attention_norm.weight", "otter.layers.0.post_attention_layernorm.weight"),
    ("blk.0.otter_ffn_norm.weight", "otter.layers.0.pre_feedforward_layernorm.weight"),
] + SPEC_QWEN3_LAYER_0[8:] + [
    ("blk.0.otter_post_ffw_norm.weight", "otter.layers.0.post_feedforward_layernorm.weight"),
]
SPEC_ARCH_LAYER_0 = {"qwen3": SPEC_QWEN3_LAYER_0, "gemma3": SPEC_GEMMA3_LAYER_0}

SPEC_OPTIONAL = {"blk.0.otter_attn_q.bias", "blk.0.otter_attn_k.bias", "blk.0.otter_attn_v.bias",
                 "blk.1.otter_attn_q.bias", "blk.1.otter_attn_k.bias", "blk.1.otter_attn_v.bias", "otter_head.bias"}


def test_keys_are_the_spec_keys():
    assert list(C.ALL_KEYS) == SPEC_KEYS
    assert (Keys.VERSION, Keys.BASE_MODEL, Keys.EMBEDDING_LENGTH, Keys.FEED_FORWARD_LENGTH) == (
        "otter.version", "otter.base_model", "otter.embedding_length", "otter.feed_forward_length")
    assert (Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV) == (
        "otter.attention.head_count", "otter.attention.head_count_kv")
    assert (Keys.Head.OUTPUT_SIZE, Keys.Head.KIND, Keys.Head.SIGNAL_NAMES) == (
        "otter.head.output_size", "otter.head.kind", "otter.head.signal_names")
    assert (Keys.Base.ARCHITECTURE, Keys.Base.VOCAB_SIZE, Keys.Base.VOCAB_HASH) == (
        "otter.base.architecture", "otter.base.vocab_size", "otter.base.vocab_hash")
    # the fingerprint: every otter.base.* key, recording the base property of the same name
    assert C.FINGERPRINT_KEYS == {
        "otter.base.architecture": "architecture",
        "otter.base.embedding_length": "embedding_length",
        "otter.base.block_count": "block_count",
        "otter.base.attention.head_count": "head_count",
        "otter.base.attention.head_count_kv": "head_count_kv",
        "otter.base.attention.key_length": "key_length",
        "otter.base.feed_forward_length": "feed_forward_length",
        "otter.base.vocab_size": "vocab_size",
        "otter.base.vocab_hash": "vocab_hash",
    }
    assert all(k.startswith(C.KEY_PREFIX) for k in C.ALL_KEYS) and C.KEY_PREFIX == "otter."


def test_versions_kinds_architectures():
    assert C.OTTER_FORMAT_VERSION == 1
    assert C.SUPPORTED_ARCHITECTURES == ("llama", "qwen2", "qwen3", "gemma3")
    assert C.RUNTIME_ARCHITECTURES == C.SUPPORTED_ARCHITECTURES
    assert set(C.ARCH_TENSORS) == set(C.HF_TENSOR_NAMES_BY_ARCH) == set(C.SUPPORTED_ARCHITECTURES)
    assert C.NORM_WEIGHT_OFFSET == {"gemma3": 1.0}
    for arch in C.SUPPORTED_ARCHITECTURES:
        assert C.arch_keys(arch) == C.ALL_KEYS + tuple(SPEC_ARCH_KEYS.get(arch, []))
        assert list(C.ARCH_FINGERPRINT_KEYS.get(arch, {})) == SPEC_ARCH_KEYS.get(arch, [])
    assert [k.value for k in HeadKind] == ["reward", "token_reward"]
    # str-valued: compares, hashes, formats and serialises as its string
    assert HeadKind.REWARD == "reward" and HeadKind("token_reward") is HeadKind.TOKEN_REWARD
    assert {"reward": 1}[HeadKind.REWARD] == 1
    assert f"{HeadKind.TOKEN_REWARD}" == str(HeadKind.TOKEN_REWARD) == "token_reward"
    assert json.dumps({"head_kind": HeadKind.REWARD}) == '{"head_kind": "reward"}'
    assert ", ".join(HeadKind) == "reward, token_reward"


def test_tensor_names_two_layers_with_biases():
    keys = list(C.tensor_keys(2))
    assert [C.gguf_name(*k) for k in keys] == [g for g, _ in SPEC_TENSORS_2_LAYERS]
    assert [C.hf_name(*k) for k in keys] == [h for _, h in SPEC_TENSORS_2_LAYERS]
    required = [C.gguf_name(*k) for k in C.tensor_keys(2, biases=False)]
    assert required == [g for g, _ in SPEC_TENSORS_2_LAYERS if g not in SPEC_OPTIONAL]
    assert {C.gguf_name(k, b, s) for k, b, s in keys if s == BIAS} == SPEC_OPTIONAL
    assert C.TENSOR_PREFIX == "otter_"


@pytest.mark.parametrize("gguf, hf", SPEC_TENSORS_2_LAYERS, ids=[g for g, _ in SPEC_TENSORS_2_LAYERS])
def test_hf_gguf_mapping_both_ways(gguf, hf):
    assert C.gguf_tensor_name(hf) == gguf
    assert C.hf_tensor_name(gguf) == hf
    assert C.is_otter_tensor(gguf)
    kind, bid, suffix = C.parse_gguf_name(gguf)
    assert C.parse_hf_name(hf) == (kind, bid, suffix)
    assert C.gguf_name(kind, bid, suffix) == gguf and C.hf_name(kind, bid, suffix) == hf


def test_enum_and_templates():
    assert C.TENSOR_NAMES[T.ATTN_Q] == "blk.{bid}.otter_attn_q"
    assert C.gguf_name(T.ATTN_OUT, 17) == "blk.17.otter_attn_output.weight"
    assert C.hf_name(T.FFN_DOWN, 17) == "otter.layers.17.mlp.down_proj.weight"
    assert C.gguf_tensor_name("otter.layers.123.self_attn.k_proj.bias") == "blk.123.otter_attn_k.bias"
    assert set(C.TENSOR_NAMES) == set(C.GEMMA3_HF_TENSOR_NAMES) == set(T)
    assert set(C.HF_TENSOR_NAMES) == set(T) - {T.ATTN_POST_NORM, T.FFN_POST_NORM}
    assert C.NORM_TENSORS == (T.ATTN_NORM, T.FFN_NORM, T.OUTPUT_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM,
                              T.ATTN_POST_NORM, T.FFN_POST_NORM)
    assert C.BIAS_TENSORS == (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.HEAD)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_arch_tensor_names(arch):
    spec = SPEC_ARCH_LAYER_0[arch]
    keys = [k for k in C.tensor_keys(1, biases=False, arch=arch) if k[1] == 0]
    assert [C.gguf_name(*k) for k in keys] == [g for g, _ in spec]
    assert [C.hf_name(*k, arch=arch) for k in keys] == [h for _, h in spec]
    for g, h in spec:
        assert C.gguf_tensor_name(h, arch) == g and C.hf_tensor_name(g, arch) == h
    # the whole file: the llama tensors plus the architecture's, biases still optional
    full = list(C.tensor_keys(2, arch=arch))
    assert [k for k in full if k[0] in C.ARCH_TENSORS["llama"]] == list(C.tensor_keys(2))
    assert {k[0] for k in full} == set(C.ARCH_TENSORS[arch])


def test_gemma3_names_differ_from_the_llama_family():
    # the same adapter name is another tensor on a gemma3 base (docs/OTTER.md §7)
    name = "otter.layers.3.post_attention_layernorm.weight"
    assert C.gguf_tensor_name(name) == C.gguf_tensor_name(name, "qwen3") == "blk.3.otter_ffn_norm.weight"
    assert C.gguf_tensor_name(name, "gemma3") == "blk.3.otter_post_attention_norm.weight"
    assert C.hf_tensor_name("blk.3.otter_ffn_norm.weight", "gemma3") == "otter.layers.3.pre_feedforward_layernorm.weight"
    with pytest.raises(KeyError):
        C.gguf_tensor_name("otter.layers.3.pre_feedforward_layernorm.weight")  # not a llama-family name
    with pytest.raises(KeyError):
        C.hf_tensor_name("blk.3.otter_post_ffw_norm.weight", "qwen3")
    with pytest.raises(ValueError, match="FFN_POST_NORM is not a tensor"):
        C.hf_name(T.FFN_POST_NORM, 0, arch="llama")
    with pytest.raises(ValueError, match="unknown base architecture 'gpt2'"):
        C.hf_name(T.ATTN_Q, 0, arch="gpt2")
    with pytest.raises(ValueError, match="unknown base architecture"):
        list(C.tensor_keys(1, arch="gemma2"))


@pytest.mark.parametrize("name", [
    "otter.layers.0.input_layernorm.bias",  # no bias for a norm
    "otter.norm.bias", "otter.embed_tokens.bias",
    "otter.layers.x.mlp.up_proj.weight", "otter.layers.-1.mlp.up_proj.weight", "otter.layers.01.mlp.up_proj.weight",
    "otter.layers.0.self_attn.o_proj.bias", "otter.layers.0.mlp.gate_proj", "otter.head.weight.x",
    "model.layers.0.mlp.up_proj.weight", "otter_head.weight",  # a GGUF name is not an adapter name
])
def test_not_an_adapter_name(name):
    with pytest.raises(KeyError):
        C.gguf_tensor_name(name)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "token_embd.weight", "output.weight", "blk.0.otter_attn_norm.bias",
                                  "otter.head.weight", "blk.0.otter_head.weight", "otter_head"])
def test_not_a_gguf_name(name):
    with pytest.raises(KeyError):
        C.hf_tensor_name(name)


def test_bad_name_requests():
    with pytest.raises(ValueError, match="layer index"):
        C.gguf_name(T.ATTN_Q)
    with pytest.raises(ValueError, match="not a per-layer"):
        C.gguf_name(T.HEAD, 0)
    with pytest.raises(ValueError, match="no 'bias'"):
        C.hf_name(T.FFN_NORM, 0, BIAS)


def test_is_otter_tensor():
    assert C.is_otter_tensor("otter_anything") and C.is_otter_tensor("blk.3.otter_x.weight")
    assert not C.is_otter_tensor("blk.3.attn_q.weight") and not C.is_otter_tensor("output_norm.weight")


# ----------------------------------------------------------------- the docs
def _doc_tables():
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    keys = re.findall(r"^\| `(otter\.[a-z_.]+)` \|", text, flags=re.M)
    names = []
    for cell in re.findall(r"^\| `((?:blk\.\{l\}\.)?otter_[a-z_{},]+\.(?:weight|bias))`", text, flags=re.M):
        cell = cell.replace("{l}", "{bid}")
        m = re.search(r"\{([a-z]+(?:,[a-z]+)+)\}", cell)  # otter_attn_{q,k,v}.bias
        names += [cell.replace(m.group(0), a) for a in m.group(1).split(",")] if m else [cell]
    return keys, names


def test_docs_format_tables_match():
    keys, names = _doc_tables()
    assert keys == SPEC_KEYS + [k for ks in SPEC_ARCH_KEYS.values() for k in ks]
    templates = {C.TENSOR_NAMES[k] + "." + s for k in T for s in ("weight", "bias")
                 if s == "weight" or k in C.BIAS_TENSORS}
    assert sorted(names) == sorted(templates)
    assert "otter_gguf.format.constants" in (ROOT / "docs" / "FORMAT.md").read_text()


# ---------------------------------------------------------- the C++ patches
def _patch_added_lines():
    lines = []
    for p in sorted((ROOT / "patches").glob("*.patch")):
        lines += [ln[1:] for ln in p.read_text().splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert lines, "no patches found"
    return lines


def test_patches_use_the_same_names():
    """Checked for the architectures the runtime supports (RUNTIME_ARCHITECTURES: llama, qwen2 and, with
    issue 14's patch, qwen3 and gemma3, their tensors and fingerprint keys)."""
    runtime_kinds = {k for a in C.RUNTIME_ARCHITECTURES for k in C.ARCH_TENSORS[a]}
    runtime_keys = {k for a in C.RUNTIME_ARCHITECTURES for k in C.arch_keys(a)}
    added = _patch_added_lines()
    strings = list(itertools.chain.from_iterable(re.findall(r'"([^"\\]*)"', ln) for ln in added))
    # every metadata key the C++ side reads (and its prefix checks)
    cpp_keys = {s for s in strings if s.startswith("otter.") and s != "otter."}
    assert cpp_keys == runtime_keys
    assert "otter." in strings and C.KEY_PREFIX == "otter."
    # the tensor-name table of the loader: LLM_TENSOR_OTTER_* -> "blk.%d.otter_..."
    table = dict(re.findall(r'\{\s*LLM_TENSOR_OTTER_(\w+),\s*"([^"]+)"\s*\}', "\n".join(added)))
    assert {v.replace("%d", "{bid}") for v in table.values()} == {C.TENSOR_NAMES[k] for k in runtime_kinds}
    assert {k: v.replace("%d", "{bid}") for k, v in table.items()} == {k.name: C.TENSOR_NAMES[k] for k in runtime_kinds}
    # every other tensor-name string (outside the graph's cb() node names): the loader's stray-tensor rule
    # ("otter_" prefix or ".otter_" inside, as is_otter_tensor) or a full name in a comment; the quantizer's
    # rules go by the LLM_TENSOR_OTTER_* enums, never by a name or a ".otter_xxx." part of one
    names = {s for ln in added if not re.search(r"\bcb\(", ln)
             for s in re.findall(r'"([^"\\\s]*otter_[^"\\\s]*)"', ln)}
    parts = {"." + C.TENSOR_NAMES[k].rsplit(".", 1)[-1] + "." for k in runtime_kinds}
    assert {C.TENSOR_PREFIX, "." + C.TENSOR_PREFIX} <= names and not parts & names
    for s in names - set(table.values()) - {C.TENSOR_PREFIX, "." + C.TENSOR_PREFIX}:
        assert C.parse_gguf_name(s), s
    quant = "\n".join(ln[1:] for p in sorted((ROOT / "patches").glob("*quantize*.patch"))
                      for ln in p.read_text().splitlines() if ln.startswith("+") and not ln.startswith("+++"))
    for rule in ("ATTN_V", "FFN_DOWN", "ATTN_OUT", "HEAD"):
        assert f"t == LLM_TENSOR_OTTER_{rule}" in quant, rule
    assert set(re.findall(r"LLM_TENSOR_OTTER_(\w+)", quant.split("LLM_TENSORS_OTTER[] = {")[1].split("};")[0])) == \
        set(table), "the quantizer's list of Otter tensors is the loader's table"
    # head kinds the loader accepts, architectures it allows
    kinds = set(re.findall(r'head_kind_str == "(\w+)"', "\n".join(added)))
    assert kinds == {k.value for k in HeadKind}
    archs = set(re.findall(r"model\.arch != LLM_ARCH_(\w+)", "\n".join(added)))
    assert {a.lower() for a in archs} == set(C.RUNTIME_ARCHITECTURES)


def test_the_hf_architecture_table_is_llama_cpps():
    """HF_ARCHITECTURES (the one table of HF class names and model types) covers the supported
    architectures, and the pinned llama.cpp converter registers each HF class name for a model of
    that llama.cpp architecture (conversion/<module>.py: @ModelBase.register(...) class ...:
    model_arch = gguf.MODEL_ARCH.<ARCH>)."""
    import re

    from otter_gguf.io.llama_source import pinned_llama_cpp_source

    assert tuple(C.HF_ARCHITECTURES) == C.SUPPORTED_ARCHITECTURES
    conv = pinned_llama_cpp_source() / "conversion"
    modules = dict(re.findall(r'^\s+"(\w+)": "(\w+)",', (conv / "__init__.py").read_text(), flags=re.M))
    for arch, (hf, _) in C.HF_ARCHITECTURES.items():
        text = (conv / f"{modules[hf]}.py").read_text()
        found = re.findall(r'@ModelBase\.register\(([^)]*)\)\n(?:[@#].*\n)*class \w+\([^)]*\):\n(?:.*\n){0,3}?'
                           r'\s+model_arch = gguf\.MODEL_ARCH\.(\w+)', text)
        archs = {a for names, a in found if f'"{hf}"' in names}
        assert archs == {arch.upper()}, (hf, archs)
