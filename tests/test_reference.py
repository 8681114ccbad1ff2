"""The PyTorch reference: base forward vs transformers, Otter vs an
independently built wide-form oracle, KV cache, batching, float64, copy init."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import cached_base, cached_otter, rand_tokens, wide_forward

from otter_gguf.format.adapter import AdapterError, load_adapter
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


@pytest.fixture(params=["reward1", "reward3", "token_reward", "qwen2"])
def otter_case(request, tiny_llama_dir, tiny_qwen2_dir, adapter_reward1_dir, adapter_reward3_dir,
               adapter_token_reward_dir, qwen2_adapter_dir):
    base_dir, ad = {
        "reward1": (tiny_llama_dir, adapter_reward1_dir),
        "reward3": (tiny_llama_dir, adapter_reward3_dir),
        "token_reward": (tiny_llama_dir, adapter_token_reward_dir),
        "qwen2": (tiny_qwen2_dir, qwen2_adapter_dir),
    }[request.param]
    return request.param, base_dir, ad


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


def test_missing_base_tensor_named(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file
    w = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    del w["model.layers.2.mlp.up_proj.weight"]
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(tiny_llama_dir) / "config.json", d / "config.json")
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(ReferenceError, match="model.layers.2.mlp.up_proj.weight"):
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
    # also through a cache, chunk by chunk
    toks = rand_tokens(12, seed=6)
    c1, c2 = m.new_cache(), base.new_cache()
    for a, b in ((0, 5), (5, 6), (6, 12)):
        assert torch.equal(m(toks[a:b], cache=c1).logits, base(toks[a:b], cache=c2))


def test_signals_match_independent_wide_form(otter_case):
    name, base_dir, ad = otter_case
    m = cached_otter(base_dir, ad)
    toks = rand_tokens(14, seed=7)
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


def test_float64_matches_wide_form_tightly(tiny_llama_dir, adapter_reward3_dir):
    m64 = cached_otter(tiny_llama_dir, adapter_reward3_dir, torch.float64)
    m32 = cached_otter(tiny_llama_dir, adapter_reward3_dir)
    toks = rand_tokens(10, seed=8)
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


def test_batch_equals_each_alone(tiny_llama_dir, adapter_token_reward_dir):
    m = cached_otter(tiny_llama_dir, adapter_token_reward_dir)
    toks = rand_tokens(2, 11, seed=11)
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
    m = OtterModel(base, cfg, t)
    toks = rand_tokens(9, seed=12)
    out = m(toks, return_hidden=True)
    assert torch.equal(out.logits, base(toks))
    assert (out.side_hidden - out.hidden[:, :d2]).abs().max().item() <= 1e-4
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
