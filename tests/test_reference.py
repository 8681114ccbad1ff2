"""The PyTorch reference: base forward vs transformers, Otter vs an
independently built wide-form oracle, KV cache, batching, float64, copy init.

Every architecture of docs/OTTER.md §7 (llama, qwen2, qwen3, gemma3) where a test applies to all; what only
qwen3 and gemma3 have (per-head Q/K norms, gemma3's sliding window, local RoPE base, sandwich norms, 1 + w
norms, their adapter format) in its own section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import cached_base, cached_otter, rand_tokens, wide_forward

from otter_gguf.format.adapter import AdapterError, load_adapter, open_adapter, save_adapter
from otter_gguf.format.constants import BIAS, HeadKind, hf_name
from otter_gguf.format.constants import OtterTensor as OT
from otter_gguf.reference.model import (
    BaseConfig,
    OtterModel,
    ReferenceError,
    insert_otter,
    load_base,
    load_otter,
)

pytestmark = pytest.mark.unit

ARCHS = ("qwen3", "gemma3")  # the architectures with per-head Q/K norms (docs/OTTER.md §7)
# their cases run longer prompts: past gemma3's sliding window of 8 (several times)
LONG = ARCHS


@pytest.fixture(params=["reward1", "reward3", "token_reward", "qwen2", "qwen3", "gemma3"])
def otter_case(request, tiny_llama_dir, tiny_qwen2_dir, adapter_reward1_dir, adapter_reward3_dir,
               adapter_token_reward_dir, qwen2_adapter_dir, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir,
               gemma3_adapter_dir):
    """(case, base dir, adapter dir); the case is the architecture for qwen2, qwen3 and gemma3."""
    base_dir, ad = {
        "reward1": (tiny_llama_dir, adapter_reward1_dir),
        "reward3": (tiny_llama_dir, adapter_reward3_dir),
        "token_reward": (tiny_llama_dir, adapter_token_reward_dir),
        "qwen2": (tiny_qwen2_dir, qwen2_adapter_dir),
        "qwen3": (tiny_qwen3_dir, qwen3_adapter_dir),
        "gemma3": (tiny_gemma3_dir, gemma3_adapter_dir),
    }[request.param]
    return request.param, base_dir, ad


@pytest.fixture(params=ARCHS)
def arch_case(request, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir, gemma3_adapter_dir):
    """qwen3 and gemma3: (arch, base dir, adapter dir)"""
    return {"qwen3": ("qwen3", tiny_qwen3_dir, qwen3_adapter_dir),
            "gemma3": ("gemma3", tiny_gemma3_dir, gemma3_adapter_dir)}[request.param]


# ------------------------------------------------------- base vs transformers
@pytest.mark.parametrize("which", ["llama", "qwen2", "qwen3", "gemma3"])
def test_base_matches_transformers(which, request):
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(f"tiny_{which}_dir")
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}[which]
    hf = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    base = cached_base(path)
    assert base.config.architecture == which
    toks = rand_tokens(2, 40, seed=1)
    with torch.no_grad():
        ref = hf(toks).logits
    got = base(toks)
    assert got.shape == (2, 40, 512)
    err = (got - ref).abs().max().item()
    assert err <= 1e-5, err
    assert ref.std() > 0.5  # non-degenerate logits


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"type": "linear", "factor": 4.0},
])
def test_rope_scaling_matches_transformers(tmp_path, tiny_llama_dir, scaling):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "m"
    d.mkdir()
    for fn in ("config.json", "model.safetensors"):
        (d / fn).symlink_to(Path(tiny_llama_dir) / fn)
    cfg = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    cfg["rope_scaling"] = scaling
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(cfg))
    hf = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    base = load_base(d)
    toks = rand_tokens(1, 48, seed=2)
    with torch.no_grad():
        ref = hf(toks).logits
    got = base(toks)
    assert (got - ref).abs().max().item() <= 1e-5
    # and the scaling really changes the output
    assert (got - cached_base(tiny_llama_dir)(toks)).abs().max().item() > 0.1


def test_unsupported_rope_scaling_and_arch_named():
    d = json.loads(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 10,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }))
    with pytest.raises(ReferenceError, match="'yarn'"):
        BaseConfig.from_hf_dict(d)
    d["rope_scaling"] = None
    c = BaseConfig.from_hf_dict(d)
    assert c.head_dim == 4 and c.num_key_value_heads == 2 and c.rope_theta == 10000.0
    d["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(ReferenceError, match="GPT2LMHeadModel"):
        BaseConfig.from_hf_dict(d)


def test_transformers5_rope_parameters_form():
    c = BaseConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 10,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    })
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file
    w = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(Path(tiny_llama_dir) / "config.json", d / "config.json")
    wm = {}
    for fn, ns in shards.items():
        save_file({n: w[n] for n in ns}, str(d / fn))
        wm.update({n: fn for n in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    toks = rand_tokens(16, seed=3)
    assert torch.equal(load_base(d)(toks), cached_base(tiny_llama_dir)(toks))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ReferenceError, match="model-00002-of-00002.safetensors"):
        load_base(d)


@pytest.mark.parametrize("arch, missing", [
    ("llama", "model.layers.2.mlp.up_proj.weight"),
    ("qwen3", "model.layers.1.self_attn.k_norm.weight"),  # a per-head Q/K norm
], ids=["llama", "qwen3"])
def test_missing_base_tensor_named(tmp_path, request, arch, missing):
    from safetensors.torch import load_file, save_file
    src = Path(request.getfixturevalue(f"tiny_{arch}_dir"))
    w = load_file(str(src / "model.safetensors"))
    del w[missing]
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(ReferenceError, match=missing):
        load_base(d)


# ------------------------------------------------------------ Otter forward
def test_main_logits_bit_identical_to_base(otter_case):
    name, base_dir, ad = otter_case
    m = cached_otter(base_dir, ad)
    base = m.base
    for toks in (rand_tokens(20, seed=4), rand_tokens(2, 9, seed=5)):
        out = m(toks)
        ref = base(toks)
        assert out.logits.shape == ref.shape
        assert torch.equal(out.logits, ref)
        assert out.signals.shape == (*toks.shape, m.n_out)
    # also through a cache, chunk by chunk (qwen3, gemma3: past gemma3's window)
    n = 20 if name in LONG else 12
    toks = rand_tokens(n, seed=6)
    c1, c2 = m.new_cache(), base.new_cache()
    for a, b in ((0, 5), (5, 6), (6, n)):
        assert torch.equal(m(toks[a:b], cache=c1).logits, base(toks[a:b], cache=c2))


def test_signals_match_independent_wide_form(otter_case):
    name, base_dir, ad = otter_case
    m = cached_otter(base_dir, ad)
    toks = rand_tokens(24 if name in LONG else 14, seed=7)  # qwen3, gemma3: 3x gemma3's window
    out = m(toks)
    logits, signals = wide_forward(m.base, m.config, m.tensors, toks)
    serr = (out.signals - signals).abs().max().item()
    lerr = (out.logits - logits).abs().max().item()
    assert serr <= 1e-5, serr
    assert lerr <= 1e-5, lerr
    # signals are O(1), vary per token and depend on the side stream
    assert out.signals.abs().mean() > 0.2
    assert out.signals.std(dim=0).min() > 0.1
    t = dict(m.tensors)
    w = t[hf_name(OT.HEAD)].clone()
    w[:, m.config.hidden_size:] = 0
    t[hf_name(OT.HEAD)] = w
    no_side = OtterModel(m.base, m.config, t)(toks).signals
    assert (no_side - out.signals).abs().mean() > 0.1
    if name in ARCHS:  # the side heads' own Q/K norms matter (and never change the logits)
        for qk in (hf_name(OT.ATTN_Q_NORM, 0, arch=name), hf_name(OT.ATTN_K_NORM, 1, arch=name)):
            t = dict(m.tensors)
            t[qk] = t[qk] * 1.5 + 0.3
            other = OtterModel(m.base, m.config, t)(toks)
            assert torch.equal(other.logits, out.logits)
            assert (other.signals - out.signals).abs().max() > 1e-3, qk


@pytest.mark.parametrize("base, adapter, n", [
    ("tiny_llama_dir", "adapter_reward3_dir", 10),
    ("tiny_qwen3_dir", "qwen3_adapter_dir", 20),
    ("tiny_gemma3_dir", "gemma3_adapter_dir", 20),
], ids=["llama", "qwen3", "gemma3"])
def test_float64_matches_wide_form_tightly(request, base, adapter, n):
    base_dir, ad = request.getfixturevalue(base), request.getfixturevalue(adapter)
    m64 = cached_otter(base_dir, ad, torch.float64)
    m32 = cached_otter(base_dir, ad)
    toks = rand_tokens(n, seed=8)
    out = m64(toks)
    assert out.logits.dtype == torch.float64 and out.signals.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in m64.base.weights.values())
    logits, signals = wide_forward(m64.base, m64.config, m64.tensors, toks)
    assert (out.signals - signals).abs().max().item() <= 1e-10
    assert (out.logits - logits).abs().max().item() <= 1e-10
    assert torch.equal(out.logits, m64.base(toks))
    o32 = m32(toks)
    assert (o32.signals.double() - out.signals).abs().max().item() <= 1e-4
    assert (o32.logits.double() - out.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 5], [7, 3]])
def test_kv_cache_equals_full_forward(tiny_llama_dir, adapter_reward3_dir, chunks):
    m = cached_otter(tiny_llama_dir, adapter_reward3_dir)
    toks = rand_tokens(10, seed=9)
    full = m(toks)
    cache = m.new_cache()
    logits, sig = [], []
    pos = 0
    for n in chunks:
        o = m(toks[pos:pos + n], cache=cache)
        assert o.cache is cache
        pos += n
        assert len(cache) == pos
        logits.append(o.logits)
        sig.append(o.signals)
    assert (torch.cat(logits) - full.logits).abs().max().item() <= 1e-5
    assert (torch.cat(sig) - full.signals).abs().max().item() <= 1e-5
    # a base-only cache continues positions too
    bc = m.base.new_cache()
    parts = [m.base(toks[:6], cache=bc), m.base(toks[6:], cache=bc)]
    assert (torch.cat(parts) - full.logits).abs().max().item() <= 1e-5


def test_cache_continues_from_returned_cache(qwen2_adapter_dir, tiny_qwen2_dir):
    m = cached_otter(tiny_qwen2_dir, qwen2_adapter_dir)
    toks = rand_tokens(2, 8, seed=10)
    full = m(toks)
    o1 = m(toks[:, :5])
    o2 = m(toks[:, 5:], cache=o1.cache)
    assert (o2.signals - full.signals[:, 5:]).abs().max().item() <= 1e-5
    assert (o2.logits - full.logits[:, 5:]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="batch"):
        m(toks[0, :2], cache=o2.cache)
    with pytest.raises(ValueError, match="different model"):
        m.base(toks[:, :2], cache=o2.cache)


@pytest.mark.parametrize("base, adapter, n", [
    ("tiny_llama_dir", "adapter_token_reward_dir", 11),
    ("tiny_gemma3_dir", "gemma3_adapter_dir", 13),
], ids=["llama", "gemma3"])
def test_batch_equals_each_alone(request, base, adapter, n):
    m = cached_otter(request.getfixturevalue(base), request.getfixturevalue(adapter))
    toks = rand_tokens(2, n, seed=11)
    both = m(toks)
    for b in range(2):
        one = m(toks[b])
        assert (both.logits[b] - one.logits).abs().max().item() <= 1e-5
        assert (both.signals[b] - one.signals).abs().max().item() <= 1e-5
    assert (both.signals[0] - both.signals[1]).abs().max() > 0.1


def test_adapter_base_mismatch_rejected(tiny_llama_dir, qwen2_adapter_dir):
    cfg, t = load_adapter(qwen2_adapter_dir)
    with pytest.raises(AdapterError, match="base_architecture: adapter 'qwen2', base 'llama'"):
        OtterModel(cached_base(tiny_llama_dir), cfg, t)


def test_load_otter_and_bad_tokens(tiny_llama_dir, adapter_reward1_dir):
    m = load_otter(tiny_llama_dir, adapter_reward1_dir)
    assert m.signal_names == ["reward"]
    assert all(not v.requires_grad for v in m.base.weights.values())
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([3, 512]))


# ----------------------------------------------------------------- insert
def _assert_side_copies_main(base, cfg, tensors, d2: int, n_tokens: int) -> None:
    """A copy-initialised head: the base logits are untouched and the side stream is the main stream's
    first d2 dims."""
    out = OtterModel(base, cfg, tensors)(toks := rand_tokens(n_tokens, seed=12), return_hidden=True)
    assert torch.equal(out.logits, base(toks))
    assert (out.side_hidden - out.hidden[:, :d2]).abs().max().item() <= 1e-4


def test_insert_otter_copy_init(tiny_qwen2_dir):
    base = cached_base(tiny_qwen2_dir)
    before = {k: v.clone() for k, v in base.weights.items()}
    d2, h2, h2kv, f2, hd, d = 128, 2, 1, 192, 64, 256
    cfg, t = insert_otter(base, d2=d2, h2=h2, h2_kv=h2kv, f2=f2, n_out=2,
                          signal_names=["a", "b"], init="copy", seed=5, base_model="q")
    W = base.weights
    assert cfg.signal_names == ["a", "b"] and cfg.base_architecture == "qwen2"
    assert all(not v.requires_grad for v in t.values())
    assert torch.equal(t[hf_name(OT.TOKEN_EMBD)], W["model.embed_tokens.weight"][:, :d2])
    assert torch.equal(t[hf_name(OT.OUTPUT_NORM)], W["model.norm.weight"][:d2])
    for l in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{l}.", f"otter.layers.{l}."
        for nm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(t[q + nm + ".weight"], W[p + nm + ".weight"][:d2])
        for nm, rows in (("self_attn.q_proj", h2 * hd), ("self_attn.k_proj", h2kv * hd),
                         ("self_attn.v_proj", h2kv * hd), ("mlp.gate_proj", f2), ("mlp.up_proj", f2)):
            R = W[p + nm + ".weight"][:rows]
            S = t[q + nm + ".weight"]
            assert S.shape == (rows, d + d2)
            assert torch.equal(S[:, :d2], torch.zeros(rows, d2))
            assert torch.equal(S[:, d2:d], R[:, d2:])
            assert torch.equal(S[:, d:], R[:, :d2])
        for x, rows in (("q", h2 * hd), ("k", h2kv * hd), ("v", h2kv * hd)):
            assert torch.equal(t[q + f"self_attn.{x}_proj.bias"], W[p + f"self_attn.{x}_proj.bias"][:rows])
        O = t[q + "self_attn.o_proj.weight"]
        assert torch.equal(O[:, :4 * hd], W[p + "self_attn.o_proj.weight"][:d2])
        assert not O[:, 4 * hd:].any()
        Dn = t[q + "mlp.down_proj.weight"]
        assert torch.equal(Dn[:, :768], W[p + "mlp.down_proj.weight"][:d2])
        assert not Dn[:, 768:].any()
    assert t[hf_name(OT.HEAD)].shape == (2, d + d2) and t[hf_name(OT.HEAD)].std() > 0.01
    assert not t[hf_name(OT.HEAD, suffix=BIAS)].any()
    for k, v in base.weights.items():
        assert torch.equal(v, before[k]), k
    # behaviour: the side stream is a copy of the main stream's first d2 dims
    _assert_side_copies_main(base, cfg, t, d2, n_tokens=9)
    # and insert_otter is deterministic in its seed
    _, t2 = insert_otter(base, d2=d2, h2=h2, h2_kv=h2kv, f2=f2, n_out=2, signal_names=["a", "b"],
                         init="copy", seed=5)
    assert all(torch.equal(t[k], t2[k]) for k in t)


def test_insert_otter_random_init(tiny_llama_dir):
    base = cached_base(tiny_llama_dir)
    cfg, t = insert_otter(base, d2=64, h2=2, h2_kv=2, f2=64, head_kind=HeadKind.TOKEN_REWARD.value, init="random",
                          seed=1)
    assert cfg.head_output_size == 512 and cfg.signal_names == []
    assert set(t) == set(cfg.required_tensor_shapes()) | {hf_name(OT.HEAD, suffix=BIAS)}
    w = t[hf_name(OT.FFN_GATE, 0)]
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(t[hf_name(OT.ATTN_NORM, 3)], torch.ones(64))
    _, t3 = insert_otter(base, d2=64, h2=2, h2_kv=2, f2=64, head_kind=HeadKind.TOKEN_REWARD.value, init="random",
                         seed=2)
    assert not torch.equal(t3[hf_name(OT.HEAD)], t[hf_name(OT.HEAD)])
    m = OtterModel(base, cfg, t)
    assert m(rand_tokens(5)).signals.shape == (5, 512)
    with pytest.raises(ValueError, match="copy init needs"):
        insert_otter(base, d2=512, h2=2, h2_kv=1, f2=64, init="copy")
    with pytest.raises(AdapterError, match="otter_num_attention_heads"):
        insert_otter(base, d2=64, h2=3, h2_kv=2, f2=64)


# ------------------------------------------------------------ qwen3 and gemma3 (docs/OTTER.md §7)
# What only these architectures have: gemma3's config (sliding window, local RoPE base, attention and embedding
# scales, 1 + w norms) and its unsupported features, the side sandwich norms, the KV cache across the window,
# insert_otter's Q/K and sandwich norms, and the adapter format of these architectures. Shared with llama and
# qwen2 above: the base vs transformers, the main logits, the wide form, float64, batching, missing tensors.
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


# --- base config (test_base_matches_transformers above)
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


# --- Otter forward
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


# --- insert
@pytest.mark.parametrize("arch", ARCHS)
def test_insert_otter_copy_init_qk_and_sandwich_norms(arch, tiny_qwen3_dir, tiny_gemma3_dir):
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
    _assert_side_copies_main(base, cfg, t, d2, n_tokens=20)
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


# --- adapter format
def test_adapter_tensor_names_and_shapes(arch_case):
    arch, base_dir, ad = arch_case
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


# ------------------------------------------------------------- fixtures
def test_fixtures_are_deterministic(tmp_path, tiny_llama_dir):
    from otter_gguf.reference.fixtures import make_tiny_llama
    again = make_tiny_llama(tmp_path / "again", seed=0)
    for fn in ("model.safetensors", "tokenizer.model", "config.json", "tokenizer_config.json"):
        assert (again / fn).read_bytes() == (Path(tiny_llama_dir) / fn).read_bytes(), fn
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 512


def test_tokenizer_byte_fallback(tiny_llama_dir):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny_llama_dir) / "tokenizer.model"))
    assert sp.vocab_size() == 512
    assert sp.id_to_piece(0) == "<unk>" and sp.bos_id() == 1 and sp.eos_id() == 2
    text = "The otter paid 42 dollars. Ünïcode ✓"
    ids = sp.encode(text)
    assert 0 not in ids  # no <unk>: byte fallback covers everything
    assert sp.decode(ids) == text


@pytest.mark.runtime
def test_llama_cpp_converts_tiny_llama_and_tokenizes_alike(tmp_path, tiny_llama_dir):
    """llama.cpp's own converter (pinned source) accepts the fixture, and
    llama.cpp's tokenizer agrees with SentencePiece on a sample."""
    from otter_gguf_converter import convert_hf_base

    out = convert_hf_base(tiny_llama_dir, tmp_path / "tiny.gguf", outtype="f32")
    import gguf
    r = gguf.GGUFReader(str(out))
    assert len(r.tensors) == 39
    import llama_cpp
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny_llama_dir) / "tokenizer.model"))
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    from otter_gguf.reference.fixtures import CORPUS_PATH
    samples = CORPUS_PATH.read_text().split("\n\n")[:20] + ["Hello  world\tÜ ✓ 日本 12345"]
    for s in samples:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == sp.encode(s), s
