"""The PyTorch reference on qwen3 and gemma3 bases (docs/OTTER.md §7): the base forward vs transformers'
Qwen3ForCausalLM / Gemma3ForCausalLM, the Otter side stream vs an independently written wide form, the KV
cache across gemma3's sliding window, insert_otter, and the adapter format of these architectures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import cached_base, cached_otter, rand_tokens, wide_forward

from otter_gguf.format.adapter import AdapterError, load_adapter, open_adapter, save_adapter
from otter_gguf.format.constants import BIAS, hf_name
from otter_gguf.format.constants import OtterTensor as OT
from otter_gguf.reference.model import BaseConfig, OtterModel, ReferenceError, insert_otter, load_base

pytestmark = pytest.mark.unit

ARCHS = ("qwen3", "gemma3")


@pytest.fixture(params=ARCHS)
def case(request, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir, gemma3_adapter_dir):
    """(arch, base dir, adapter dir)"""
    return {"qwen3": ("qwen3", tiny_qwen3_dir, qwen3_adapter_dir),
            "gemma3": ("gemma3", tiny_gemma3_dir, gemma3_adapter_dir)}[request.param]


def _hf_class(arch):
    transformers = pytest.importorskip("transformers")
    return {"qwen3": transformers.Qwen3ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}[arch]


def _hf(arch, path):
    return _hf_class(arch).from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def _edited_copy(tmp_path, src, **changes) -> Path:
    d = tmp_path / "m"
    d.mkdir(parents=True)
    (d / "model.safetensors").symlink_to(Path(src) / "model.safetensors")
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ---------------------- base vs transformers (test_base_matches_transformers in test_reference.py)
def test_gemma3_config_read_like_transformers(tiny_gemma3_dir):
    """The fixture's settings, and transformers' own (v5, nested rope_parameters) form of the same config."""
    c = cached_base(tiny_gemma3_dir).config
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta) == (8, 1e6, 1e4)
    assert c.attn_scale == 128 ** -0.5 and c.embed_scale == 16.0 and c.norm_offset == 1.0
    assert c.tie_word_embeddings and c.final_logit_softcapping is None and c.head_dim == 128
    hf = _hf("gemma3", tiny_gemma3_dir)
    d = hf.config.to_dict()
    assert "full_attention" in d["rope_parameters"]
    c2 = BaseConfig.from_hf_dict(d)
    for k in ("layer_types", "sliding_window", "rope_theta", "rope_local_theta", "query_pre_attn_scalar",
              "rope_scaling", "tie_word_embeddings", "head_dim", "rms_norm_eps"):
        assert getattr(c2, k) == getattr(c, k), k
    # defaults as Gemma3TextConfig's: pattern 6, query_pre_attn_scalar 256, rope bases 1e6 / 1e4, hd 256
    c3 = BaseConfig.from_hf_dict({"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
                                  "num_attention_heads": 2, "num_hidden_layers": 7, "intermediate_size": 96,
                                  "vocab_size": 10})
    assert [c3.is_sliding(i) for i in range(7)] == [True] * 5 + [False, True]
    assert (c3.query_pre_attn_scalar, c3.rope_theta, c3.rope_local_theta, c3.head_dim) == (256, 1e6, 1e4, 256)
    assert c3.sliding_window == 4096 and c3.tie_word_embeddings


def test_sliding_window_and_local_rope_matter(tmp_path, tiny_gemma3_dir):
    """A prompt longer than the window: the reference follows transformers with another window and other
    RoPE bases too, and each setting changes the logits (so the agreement above is not vacuous)."""
    toks = rand_tokens(1, 30, seed=2)
    ref0 = cached_base(tiny_gemma3_dir)(toks)
    for i, changes in enumerate(({"sliding_window": 4096}, {"rope_local_base_freq": 1e6},
                                 {"query_pre_attn_scalar": 64}, {"final_logit_softcapping": 3.0})):
        d = _edited_copy(tmp_path / str(i), tiny_gemma3_dir, **changes)
        hf = _hf("gemma3", d)
        with torch.no_grad():
            ref = hf(toks).logits
        got = load_base(d)(toks)
        assert (got - ref).abs().max().item() <= 1e-5, changes
        assert (got - ref0).abs().max().item() > 0.05, changes
    assert got.abs().max().item() <= 3.0  # softcapped


@pytest.mark.parametrize("arch, changes, match", [
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"layer_types": ["full_attention"] * 5}, "layer_types must list 6"),
    ("gemma3", {"sliding_window": 0}, "sliding_window must be a positive integer"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                    "full_attention": {"rope_type": "default"}}}, "sliding layers"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
])
def test_unsupported_features_named(arch, changes, match, tiny_qwen3_dir, tiny_gemma3_dir):
    d = json.loads((Path(tiny_qwen3_dir if arch == "qwen3" else tiny_gemma3_dir) / "config.json").read_text())
    d.update(changes)
    with pytest.raises(ReferenceError, match=match):
        BaseConfig.from_hf_dict(d)


def test_missing_qk_norm_named(tmp_path, tiny_qwen3_dir):
    from safetensors.torch import load_file, save_file
    w = load_file(str(Path(tiny_qwen3_dir) / "model.safetensors"))
    del w["model.layers.1.self_attn.k_norm.weight"]
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(tiny_qwen3_dir) / "config.json", d / "config.json")
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(ReferenceError, match=r"model.layers.1.self_attn.k_norm.weight"):
        load_base(d)


# ------------------------------------------------------------ Otter forward
def test_main_logits_bit_identical_to_base(case):
    arch, base_dir, ad = case
    m = cached_otter(base_dir, ad)
    for toks in (rand_tokens(20, seed=4), rand_tokens(2, 9, seed=5)):
        out = m(toks)
        assert torch.equal(out.logits, m.base(toks))
        assert out.signals.shape == (*toks.shape, m.n_out)
    toks = rand_tokens(20, seed=6)
    c1, c2 = m.new_cache(), m.base.new_cache()
    for a, b in ((0, 5), (5, 6), (6, 20)):
        assert torch.equal(m(toks[a:b], cache=c1).logits, m.base(toks[a:b], cache=c2))


def test_signals_match_independent_wide_form(case):
    arch, base_dir, ad = case
    m = cached_otter(base_dir, ad)
    toks = rand_tokens(24, seed=7)  # 3x gemma3's window
    out = m(toks)
    logits, signals = wide_forward(m.base, m.config, m.tensors, toks)
    assert (out.signals - signals).abs().max().item() <= 1e-5
    assert (out.logits - logits).abs().max().item() <= 1e-5
    assert out.signals.abs().mean() > 0.2
    assert out.signals.std(dim=0).min() > 0.1
    # the side stream and the side heads' own Q/K norms matter
    for name in (hf_name(OT.ATTN_Q_NORM, 0, arch=arch), hf_name(OT.ATTN_K_NORM, 1, arch=arch)):
        t = dict(m.tensors)
        t[name] = t[name] * 1.5 + 0.3
        other = OtterModel(m.base, m.config, t)(toks)
        assert torch.equal(other.logits, out.logits)
        assert (other.signals - out.signals).abs().max() > 1e-3, name


def test_float64_matches_wide_form_tightly(case):
    arch, base_dir, ad = case
    m64 = cached_otter(base_dir, ad, torch.float64)
    toks = rand_tokens(20, seed=8)
    out = m64(toks)
    logits, signals = wide_forward(m64.base, m64.config, m64.tensors, toks)
    assert (out.signals - signals).abs().max().item() <= 1e-10
    assert (out.logits - logits).abs().max().item() <= 1e-10
    o32 = cached_otter(base_dir, ad)(toks)
    assert (o32.signals.double() - out.signals).abs().max().item() <= 1e-4


def test_gemma3_side_sandwich_norm_weight(tiny_gemma3_dir, gemma3_adapter_dir):
    """The side sandwich norm weight (adapter name post_attention_layernorm on gemma3) scales the side block
    output as the wide form says, for several values (its statistic, from the main part only, is the wide
    form's), and it changes the signals but never the logits."""
    m = cached_otter(tiny_gemma3_dir, gemma3_adapter_dir, torch.float64)
    toks = rand_tokens(6, seed=9)
    name = hf_name(OT.ATTN_POST_NORM, 0, arch="gemma3")
    assert name == "otter.layers.0.post_attention_layernorm.weight"
    outs = []
    for c in (1.0, 2.0, 3.0):
        t = dict(m.tensors)
        t[name] = (1 + t[name]) * c - 1  # the applied weight times c
        o = OtterModel(m.base, m.config, t)(toks)
        logits, sig = wide_forward(m.base, m.config, t, toks)
        assert (o.signals - sig).abs().max().item() <= 1e-10
        assert torch.equal(o.logits, m.base(toks))
        outs.append(o.signals)
    assert (outs[0] - outs[2]).abs().max() > 1e-3


@pytest.mark.parametrize("chunks", [[1] * 20, [9, 1, 10], [3, 17]])
def test_gemma3_kv_cache_across_the_window(tiny_gemma3_dir, gemma3_adapter_dir, chunks):
    m = cached_otter(tiny_gemma3_dir, gemma3_adapter_dir)
    toks = rand_tokens(20, seed=10)
    full = m(toks)
    cache = m.new_cache()
    sig, logits, pos = [], [], 0
    for n in chunks:
        o = m(toks[pos:pos + n], cache=cache)
        pos += n
        sig.append(o.signals)
        logits.append(o.logits)
    assert (torch.cat(logits) - full.logits).abs().max().item() <= 1e-5
    assert (torch.cat(sig) - full.signals).abs().max().item() <= 1e-5


def test_batch_equals_each_alone(tiny_gemma3_dir, gemma3_adapter_dir):
    m = cached_otter(tiny_gemma3_dir, gemma3_adapter_dir)
    toks = rand_tokens(2, 13, seed=11)
    both = m(toks)
    for b in range(2):
        one = m(toks[b])
        assert (both.signals[b] - one.signals).abs().max().item() <= 1e-5


# ----------------------------------------------------------------- insert
@pytest.mark.parametrize("arch", ARCHS)
def test_insert_otter_copy_init(arch, tiny_qwen3_dir, tiny_gemma3_dir):
    path = tiny_qwen3_dir if arch == "qwen3" else tiny_gemma3_dir
    base = cached_base(path)
    W = base.weights
    before = {k: v.clone() for k, v in W.items()}
    d2, h2, h2kv, f2 = 128, 2, 1, 192
    cfg, t = insert_otter(base, d2=d2, h2=h2, h2_kv=h2kv, f2=f2, n_out=2, signal_names=["a", "b"], init="copy")
    assert cfg.base_architecture == arch
    assert set(t) == set(cfg.required_tensor_shapes()) | {hf_name(OT.HEAD, suffix=BIAS)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for l in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{l}.", f"otter.layers.{l}."
        for nm in ("self_attn.q_norm", "self_attn.k_norm"):
            assert torch.equal(t[q + nm + ".weight"], W[p + nm + ".weight"])
        for nm in norms:
            assert torch.equal(t[q + nm + ".weight"], W[p + nm + ".weight"][:d2])
    for k, v in W.items():
        assert torch.equal(v, before[k]), k
    # the side stream is a copy of the main stream's first d2 dims (sandwich norms and embedding scale too)
    m = OtterModel(base, cfg, t)
    toks = rand_tokens(20, seed=12)
    out = m(toks, return_hidden=True)
    assert torch.equal(out.logits, base(toks))
    assert (out.side_hidden - out.hidden[:, :d2]).abs().max().item() <= 1e-4
    # and adapters of these architectures round-trip through the format
    ad = save_adapter(Path(str(path) + f"-copy-{arch}"), cfg, t)
    cfg2, t2 = load_adapter(ad)
    assert cfg2 == cfg and all(torch.equal(t[k], t2[k]) for k in t)


@pytest.mark.parametrize("arch", ARCHS)
def test_insert_otter_random_init_identity_norms(arch, tiny_qwen3_dir, tiny_gemma3_dir):
    base = cached_base(tiny_qwen3_dir if arch == "qwen3" else tiny_gemma3_dir)
    cfg, t = insert_otter(base, d2=64, h2=2, h2_kv=2, f2=64, init="random", seed=1)
    ident = 0.0 if arch == "gemma3" else 1.0  # gemma3 applies 1 + w
    assert torch.equal(t[hf_name(OT.ATTN_Q_NORM, 2, arch=arch)], torch.full((128,), ident))
    assert torch.equal(t[hf_name(OT.FFN_NORM, 0, arch=arch)], torch.full((64,), ident))
    assert OtterModel(base, cfg, t)(rand_tokens(5)).signals.shape == (5, 1)


# ------------------------------------------------------------- adapter format
def test_adapter_tensor_names_and_shapes(case):
    arch, base_dir, ad = case
    a = open_adapter(ad)
    c = a.config
    assert c.base_architecture == arch
    hd, d2 = c.head_dim, c.otter_hidden_size
    assert a.shape("otter.layers.3.self_attn.q_norm.weight") == (hd,)
    assert a.shape("otter.layers.3.self_attn.k_norm.weight") == (hd,)
    extra = {"otter.layers.0.pre_feedforward_layernorm.weight", "otter.layers.0.post_feedforward_layernorm.weight"}
    if arch == "gemma3":
        assert all(a.shape(n) == (d2,) for n in extra)
        assert len(a.tensor_names) == 1 + 6 * 16 + 3  # embed; 13 per layer + 3 biases; norm, head, head bias
    else:
        assert not any(n in a for n in extra)
        assert len(a.tensor_names) == 1 + 4 * 11 + 2


@pytest.mark.parametrize("arch, drop, add, match", [
    ("qwen3", "otter.layers.2.self_attn.q_norm.weight", None, r"missing required tensor\(s\): otter.layers.2.self_attn.q_norm"),
    ("gemma3", "otter.layers.5.post_feedforward_layernorm.weight", None, "otter.layers.5.post_feedforward_layernorm"),
    ("gemma3", "otter.layers.0.pre_feedforward_layernorm.weight", None, "otter.layers.0.pre_feedforward_layernorm"),
    ("qwen3", None, ("otter.layers.0.pre_feedforward_layernorm.weight", (256,)), "unexpected tensor"),
    ("gemma3", None, ("otter.layers.0.self_attn.q_norm.bias", (128,)), "unexpected tensor"),
])
def test_malformed_adapters_refused(tmp_path, arch, drop, add, match, qwen3_adapter_dir, gemma3_adapter_dir):
    cfg, t = load_adapter(qwen3_adapter_dir if arch == "qwen3" else gemma3_adapter_dir)
    if drop:
        del t[drop]
    if add:
        t[add[0]] = torch.zeros(add[1])
    with pytest.raises(AdapterError, match=match):
        save_adapter(tmp_path / "bad", cfg, t)


def test_wrong_qk_norm_shape_refused(tmp_path, gemma3_adapter_dir):
    cfg, t = load_adapter(gemma3_adapter_dir)
    t["otter.layers.1.self_attn.k_norm.weight"] = torch.zeros(256)
    with pytest.raises(AdapterError, match=r"k_norm.weight' has shape \[256\], expected \[128\]"):
        save_adapter(tmp_path / "bad", cfg, t)


def test_llama_adapter_names_are_not_gemma3_names(tmp_path, qwen3_adapter_dir):
    """A qwen3 adapter relabelled gemma3 lacks gemma3's pre/post-FFN norms: refused by name."""
    cfg, t = load_adapter(qwen3_adapter_dir)
    cfg.base_architecture = "gemma3"
    with pytest.raises(AdapterError, match="pre_feedforward_layernorm"):
        save_adapter(tmp_path / "bad", cfg, t)
