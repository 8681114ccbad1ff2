"""Converting qwen3 and gemma3 adapters (docs/OTTER.md §7, docs/FORMAT.md): tensor names, order, types and
shapes, gemma3's norm-weight shift (1 + w) and no Q/K permutation, checked with gguf-py; the base fingerprint
of these architectures; bases from HF (llama.cpp's own converter) or GGUF; malformed adapters refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from safetensors.numpy import load_file

from otter_gguf.format.adapter import AdapterError, open_adapter
from otter_gguf.format.constants import ARCH_FINGERPRINT_KEYS, NORM_TENSORS, Keys, gguf_tensor_name, parse_gguf_name
from otter_gguf_converter import qtypes
from otter_gguf_converter.convert import convert

pytestmark = pytest.mark.unit

ARCHS = ("qwen3", "gemma3")


@pytest.fixture
def case(qwen3_gemma3_case):
    """(arch, HF base dir, base GGUF (llama.cpp's converter, f32), adapter dir), per architecture (conftest)"""
    return qwen3_gemma3_case


def otter_tensors(path):
    r = GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors if "otter" in t.name}


def test_convert_f32_names_types_shapes_values(case, tmp_path):
    arch, _, base, ad = case
    out = convert(ad, base, tmp_path / "o.gguf", outtype="f32", progress=False)
    r, ts = otter_tensors(out)
    cfg = open_adapter(ad).config
    order = [n for n in cfg.tensor_order() if n in open_adapter(ad)]
    assert list(ts) == [gguf_tensor_name(n, arch) for n in order]
    w = load_file(str(Path(ad) / "otter_model.safetensors"))
    shift = 1.0 if arch == "gemma3" else 0.0
    for hf in order:
        t = ts[gguf_tensor_name(hf, arch)]
        assert t.tensor_type == QT.F32
        assert [int(x) for x in t.shape] == list(reversed(w[hf].shape))
        got = np.asarray(t.data).reshape(w[hf].shape)
        kind = parse_gguf_name(t.name)[0]
        want = w[hf] + np.float32(shift) if kind in NORM_TENSORS else w[hf]  # Q/K rows unpermuted (NeoX RoPE)
        assert np.array_equal(got, want), hf
    # the new tensors are there, with the names of docs/FORMAT.md
    assert [int(x) for x in ts["blk.3.otter_attn_q_norm.weight"].shape] == [128]
    assert [int(x) for x in ts["blk.3.otter_attn_k_norm.weight"].shape] == [128]
    gemma_only = {"blk.3.otter_post_attention_norm.weight", "blk.3.otter_post_ffw_norm.weight"}
    assert gemma_only & set(ts) == (gemma_only if arch == "gemma3" else set())
    if arch == "gemma3":
        # the shift is the base's own: llama.cpp's converter stored the base norms as 1 + w too
        hfw = load_file(str(Path(case[1]) / "model.safetensors"))
        base_t = {t.name: t for t in r.tensors}
        for name, hf in (("blk.2.post_attention_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
                         ("blk.2.ffn_norm.weight", "model.layers.2.pre_feedforward_layernorm.weight"),
                         ("blk.2.attn_q_norm.weight", "model.layers.2.self_attn.q_norm.weight")):
            assert np.array_equal(np.asarray(base_t[name].data), hfw[hf] + np.float32(1)), name
        # gemma3's adapter name post_attention_layernorm is the sandwich norm, pre_feedforward_layernorm the FFN's
        np.testing.assert_array_equal(np.asarray(ts["blk.0.otter_ffn_norm.weight"].data),
                                      w["otter.layers.0.pre_feedforward_layernorm.weight"] + np.float32(1))


def test_fingerprint(case, tmp_path):
    arch, _, base, ad = case
    out = convert(ad, base, tmp_path / "o.gguf", outtype="f16", progress=False)
    r = GGUFReader(str(out))
    keys = [k for k in r.fields if k.startswith("otter.")]
    assert r.fields[Keys.Base.ATTENTION_KEY_LENGTH].contents() == 128  # hd != d / h
    assert r.fields[Keys.Base.ARCHITECTURE].contents() == arch
    if arch == "qwen3":
        assert not set(keys) & {k for ks in ARCH_FINGERPRINT_KEYS.values() for k in ks}
        return
    assert keys[-4:] == list(ARCH_FINGERPRINT_KEYS["gemma3"])
    f = r.fields
    assert f[Keys.Base.SLIDING_WINDOW].contents() == 8 and f[Keys.Base.SLIDING_WINDOW].types == [GGUFValueType.UINT32]
    pat = f[Keys.Base.SLIDING_WINDOW_PATTERN]
    assert pat.types == [GGUFValueType.ARRAY, GGUFValueType.BOOL]
    assert pat.contents() == [True] * 5 + [False]  # llama.cpp's default period 6, as HF's layer_types
    assert json.loads((Path(case[1]) / "config.json").read_text())["layer_types"] == \
        ["sliding_attention"] * 5 + ["full_attention"]
    assert f[Keys.Base.ROPE_FREQ_BASE].contents() == 1e6 and f[Keys.Base.ROPE_FREQ_BASE_SWA].contents() == 1e4
    assert f[Keys.Base.ROPE_FREQ_BASE].types == [GGUFValueType.FLOAT32]


def test_swa_pattern_as_llama_cpp_resolves_it(tmp_path, hf_base_gguf, tiny_gemma3_dir):
    """An explicit period or per-layer array in the base GGUF wins over the default period 6; no window: none."""
    from helpers import rewrite
    from otter_gguf.io import gguf_read

    base = hf_base_gguf(tiny_gemma3_dir, "f32")
    P = Keys.Base.SLIDING_WINDOW_PATTERN
    for i, (kv, drop, want) in enumerate((
        ({"gemma3.attention.sliding_window_pattern": (2, GGUFValueType.UINT32)}, (), [True, False] * 3),
        ({"gemma3.attention.sliding_window_pattern": ([False, True] * 3, GGUFValueType.ARRAY, GGUFValueType.BOOL)},
         (), [False, True] * 3),
        ({}, ("gemma3.attention.sliding_window",), [False] * 6),
    )):
        p = tmp_path / f"b{i}.gguf"
        rewrite(base, p, kv=kv, drop_kv=drop)
        info = gguf_read.base_info(gguf_read.open_gguf(p))
        assert info.arch_fingerprint[P] == want, kv


def test_hf_base_dir_converts_like_its_gguf(tmp_path, hf_base_gguf, tiny_qwen3_dir, qwen3_adapter_dir):
    """A base given as an HF directory goes through llama.cpp's convert_hf_to_gguf.py (Qwen3ForCausalLM)."""
    a = convert(qwen3_adapter_dir, tiny_qwen3_dir, tmp_path / "a.gguf", outtype="f32", base_outtype="f32",
                progress=False)
    b = convert(qwen3_adapter_dir, hf_base_gguf(tiny_qwen3_dir, "f32"), tmp_path / "b.gguf", outtype="f32",
                progress=False)
    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


@pytest.mark.parametrize("outtype", ["q8_0", "q3_k_m", "q4_k_m"])
def test_quantization_policy_covers_the_new_tensors(case, outtype):
    """The plan (no quantizer needed): 1-D tensors f32 (the shift planned for every gemma3 norm), the matrices
    of these architectures get the same types as llama's for the same role, layer and outtype."""
    from otter_gguf_converter.convert import plan_tensors

    arch, _, _, ad = case
    adapter = open_adapter(ad)
    cfg = adapter.config
    plan, fallbacks = plan_tensors(adapter, cfg, arch, outtype, None)
    assert not fallbacks
    gqa = cfg.otter_num_attention_heads // cfg.otter_num_key_value_heads
    assert [p.name for p in plan] == [gguf_tensor_name(n, arch) for n in adapter.tensor_names]
    for p in plan:
        kind, bid, _ = parse_gguf_name(p.name)
        assert p.permute_heads is None
        if len(p.np_shape) == 1:
            assert p.qtype == QT.F32
            assert p.add == (1.0 if arch == "gemma3" and kind in NORM_TENSORS else 0.0), p.name
        elif p.name != "otter_head.weight":
            assert p.qtype == qtypes.tensor_type(outtype, p.name, cfg.num_hidden_layers, gqa), p.name
    types = {p.name: p.qtype for p in plan}
    if outtype == "q3_k_m":  # the mix's per-layer upgrades reach these architectures' tensors
        assert types["blk.0.otter_attn_v.weight"] == QT.Q5_K and types["blk.2.otter_attn_v.weight"] == QT.Q4_K
        assert types["blk.1.otter_attn_output.weight"] == QT.Q4_K and types["blk.1.otter_ffn_up.weight"] == QT.Q3_K


@pytest.mark.runtime
@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_quantized_types_follow_the_policy(case, tmp_path, outtype):
    """Every 1-D tensor (the new Q/K and sandwich norms included) stays f32 with the shift; every matrix gets
    qtypes' type for its role, as for llama."""
    arch, _, base, ad = case
    out = convert(ad, base, tmp_path / "o.gguf", outtype=outtype, progress=False)
    _, ts = otter_tensors(out)
    cfg = open_adapter(ad).config
    w = load_file(str(Path(ad) / "otter_model.safetensors"))
    n_new = 0
    for name, t in ts.items():
        kind, bid, _ = parse_gguf_name(name)
        if len(t.shape) == 1:
            assert t.tensor_type == QT.F32, name
            n_new += kind.name.endswith(("Q_NORM", "K_NORM", "POST_NORM"))
        elif name == "otter_head.weight":
            assert t.tensor_type == qtypes.head_type(outtype, None)
        else:
            want = qtypes.tensor_type(outtype, name, cfg.num_hidden_layers, cfg.otter_num_attention_heads
                                      // cfg.otter_num_key_value_heads)
            assert t.tensor_type == qtypes.fit_type(name, want, int(t.shape[0]))[0], name
    assert n_new == cfg.num_hidden_layers * (4 if arch == "gemma3" else 2)
    if arch == "gemma3":
        np.testing.assert_array_equal(np.asarray(ts["blk.4.otter_attn_k_norm.weight"].data),
                                      w["otter.layers.4.self_attn.k_norm.weight"] + np.float32(1))


# ------------------------------------------------------------------ refused
def test_adapter_for_another_arch_refused(tmp_path, hf_base_gguf, tiny_gemma3_dir, qwen3_adapter_dir):
    with pytest.raises(AdapterError, match="base_architecture: adapter 'qwen3', base 'gemma3'"):
        convert(qwen3_adapter_dir, hf_base_gguf(tiny_gemma3_dir, "f32"), tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def _bad_adapter(tmp_path, src, edit) -> Path:
    """A copy of the adapter ``src`` whose tensors (name -> numpy array) went through ``edit``, written with
    safetensors directly (save_adapter would refuse it)."""
    from safetensors.numpy import save_file
    t = load_file(str(Path(src) / "otter_model.safetensors"))
    edit(t)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "otter_config.json").write_bytes((Path(src) / "otter_config.json").read_bytes())
    save_file(t, str(d / "otter_model.safetensors"))
    return d


def _drop(name):
    return lambda t: t.pop(name)


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


def _reshape(name, shape):
    return lambda t: t.__setitem__(name, t[name].reshape(shape))


@pytest.mark.parametrize("arch, edit, match", [
    ("gemma3", _drop("otter.layers.2.post_feedforward_layernorm.weight"),
     r"missing required tensor\(s\): otter.layers.2.post_feedforward_layernorm.weight"),
    ("qwen3", _drop("otter.layers.0.self_attn.k_norm.weight"), "otter.layers.0.self_attn.k_norm.weight"),
    # a llama-family name in a gemma3 adapter: its FFN norm is pre_feedforward_layernorm
    ("gemma3", _rename("otter.layers.1.pre_feedforward_layernorm.weight", "otter.layers.1.ffn_norm.weight"),
     "missing required tensor"),
    ("gemma3", _reshape("otter.layers.1.self_attn.q_norm.weight", [64, 2]),
     r"otter.layers.1.self_attn.q_norm.weight' has shape \[64, 2\], expected \[128\]"),
    ("qwen3", _rename("otter.layers.3.self_attn.q_norm.weight", "otter.layers.3.self_attn.q_norm.bias"),
     "missing required tensor"),
])
def test_malformed_adapters_refused(tmp_path, hf_base_gguf, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir,
                                    gemma3_adapter_dir, arch, edit, match):
    src, hf = (gemma3_adapter_dir, tiny_gemma3_dir) if arch == "gemma3" else (qwen3_adapter_dir, tiny_qwen3_dir)
    bad = _bad_adapter(tmp_path, src, edit)
    with pytest.raises(AdapterError, match=match):
        convert(bad, hf_base_gguf(hf, "f32"), tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def test_unexpected_norms_refused_for_qwen3(tmp_path, hf_base_gguf, tiny_qwen3_dir, qwen3_adapter_dir):
    """gemma3's sandwich norms are not tensors of a qwen3 adapter."""
    bad = _bad_adapter(tmp_path, qwen3_adapter_dir, lambda t: t.__setitem__(
        "otter.layers.0.post_feedforward_layernorm.weight", t["otter.layers.0.input_layernorm.weight"]))
    with pytest.raises(AdapterError, match="unexpected tensor.*otter.layers.0.post_feedforward_layernorm"):
        convert(bad, hf_base_gguf(tiny_qwen3_dir, "f32"), tmp_path / "o.gguf", progress=False)
