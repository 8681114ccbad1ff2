"""The patched llama.cpp runtime against the PyTorch reference (docs/OTTER.md §3).

Runs through llama-cpp-python's low-level bindings on the library it loaded
(LLAMA_CPP_LIB_PATH); skipped only if that library is not the Otter-patched
runtime (no `llama_otter_series`).
"""

from __future__ import annotations

import numpy as np
import pytest

from otter_gguf.io.llama_quantize import quantize
from helpers import Model, rel_err

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.runtime

TOL = 1e-4


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rt-gguf")


def _base(gguf_dir, hf_dir, outtype):
    from otter_gguf_converter.hf_base import convert_hf_base

    out = gguf_dir / f"{hf_dir.name}-base-{outtype}.gguf"
    if not out.exists():
        convert_hf_base(hf_dir, out, outtype=outtype)
    return out


def _otter(gguf_dir, hf_dir, adapter_dir, base_outtype="f32", outtype="f32"):
    from otter_gguf_converter.convert import convert

    out = gguf_dir / f"{adapter_dir.name}-{base_outtype}-{outtype}.gguf"
    if not out.exists():
        convert(adapter_dir, _base(gguf_dir, hf_dir, base_outtype), out, outtype=outtype, progress=False)
    return out


@pytest.fixture(scope="module")
def models(rt, gguf_dir, tiny_llama_dir, adapter_reward1_dir, adapter_reward3_dir, adapter_token_reward_dir):
    ll, lib, _ = rt
    from otter_gguf.reference.model import load_otter

    out = {}
    for name, ad in [("reward1", adapter_reward1_dir), ("reward3", adapter_reward3_dir),
                     ("token_reward", adapter_token_reward_dir)]:
        m = Model(ll, lib, _otter(gguf_dir, tiny_llama_dir, ad))
        out[name] = (m, load_otter(tiny_llama_dir, ad, dtype=torch.float32))
    yield out
    for m, _ in out.values():
        m.close()


def _tokens(n, seed=0, v=512):
    return [int(t) for t in np.random.RandomState(seed).randint(3, v, size=n)]


def _ref_signals(ref, toks):
    return ref(torch.tensor(toks)).signals.detach().numpy()


@pytest.mark.parametrize("kind", ["reward1", "reward3", "token_reward"])
def test_model_metadata(models, rt, kind):
    _, lib, _ = rt
    m, ref = models[kind]
    assert m.has_otter
    assert m.n_out == ref.n_out
    assert lib.llama_model_otter_head_kind(m.ptr).decode() == ("token_reward" if kind == "token_reward" else "reward")
    names = [lib.llama_model_otter_signal_name(m.ptr, i).decode()
             for i in range(lib.llama_model_otter_n_signal_names(m.ptr))]
    assert names == ref.signal_names
    assert lib.llama_model_otter_signal_name(m.ptr, len(names)) is None
    assert lib.llama_otter_series().decode().startswith("otter-gguf/")


@pytest.mark.parametrize("kind", ["reward1", "reward3", "token_reward"])
def test_whole_prompt(models, kind):
    m, ref = models[kind]
    toks = _tokens(40, seed=1)
    c = m.context()
    try:
        c.decode(toks)
        got = np.stack([c.signals_ith(i) for i in range(len(toks))])
        assert rel_err(got, _ref_signals(ref, toks)) <= TOL
        # negative index = last output row
        np.testing.assert_array_equal(c.signals_ith(-1), got[-1])
    finally:
        c.close()


def test_prompt_several_ubatches(models):
    m, ref = models["reward3"]
    toks = _tokens(40, seed=16)
    c = m.context(n_batch=64, n_ubatch=16)
    try:
        flags = [i % 3 == 0 or i == 39 for i in range(40)]
        c.decode(toks, logits=flags)
        idx = [i for i, f in enumerate(flags) if f]
        got = np.stack([c.signals_ith(i) for i in idx])
        assert rel_err(got, _ref_signals(ref, toks)[idx]) <= TOL
        sig = lib_signals_all(c, len(idx))
        np.testing.assert_array_equal(sig, got)
    finally:
        c.close()


def lib_signals_all(c, n_rows):
    p = c.lib.llama_get_otter_signals(c.ptr)
    assert p
    return np.ctypeslib.as_array(p, shape=(n_rows, c.model.n_out)).copy()


@pytest.mark.parametrize("kind", ["reward3", "token_reward"])
def test_token_by_token(models, kind):
    m, ref = models[kind]
    toks = _tokens(24, seed=2)
    c = m.context()
    try:
        got = []
        for i, t in enumerate(toks):
            c.decode([t], pos0=i)
            got.append(c.signals_ith(0))
        assert rel_err(np.stack(got), _ref_signals(ref, toks)) <= TOL
    finally:
        c.close()


def test_prompt_then_decode_last_only(models):
    m, ref = models["reward3"]
    toks = _tokens(30, seed=3)
    c = m.context()
    try:
        c.decode(toks[:20], logits="last")
        got = [c.signals_ith(19)]
        assert c.signals_ith(0) is None  # not an output row
        for i in range(20, 30):
            c.decode([toks[i]], pos0=i)
            got.append(c.signals_ith(-1))
        want = _ref_signals(ref, toks)[19:]
        assert rel_err(np.stack(got), want) <= TOL
    finally:
        c.close()


def test_two_interleaved_sequences(models):
    m, ref = models["reward3"]
    a, b = _tokens(16, seed=4), _tokens(16, seed=5)
    c = m.context(n_seq_max=2)
    try:
        # one batch with both prompts interleaved, then token-by-token for both in one batch
        toks = [t for pair in zip(a[:10], b[:10]) for t in pair]
        seqs = [0, 1] * 10
        pos = [i // 2 for i in range(20)]
        c.decode(toks, seqs=seqs, positions=pos)
        ga = [c.signals_ith(2 * i) for i in range(10)]
        gb = [c.signals_ith(2 * i + 1) for i in range(10)]
        for i in range(10, 16):
            c.decode([a[i], b[i]], seqs=[0, 1], positions=[i, i])
            ga.append(c.signals_ith(0))
            gb.append(c.signals_ith(1))
        assert rel_err(np.stack(ga), _ref_signals(ref, a)) <= TOL
        assert rel_err(np.stack(gb), _ref_signals(ref, b)) <= TOL
    finally:
        c.close()


def test_seq_rm_rewind(models):
    m, ref = models["reward3"]
    toks = _tokens(20, seed=6)
    other = _tokens(8, seed=7)
    c = m.context()
    try:
        c.decode(toks[:12] + other)  # 20 tokens, the last 8 will be rewound
        assert c.seq_rm(0, 12, -1)
        c.decode(toks[12:], pos0=12)
        got = np.stack([c.signals_ith(i) for i in range(8)])
        assert rel_err(got, _ref_signals(ref, toks)[12:]) <= TOL
    finally:
        c.close()


def test_state_save_restore(models):
    m, ref = models["reward3"]
    toks = _tokens(20, seed=8)
    c = m.context()
    c2 = m.context()
    try:
        c.decode(toks[:12])
        state = c.state_save()
        c.decode(_tokens(5, seed=9), pos0=12)  # diverge
        c.state_load(state)
        assert c.signals_ith(0) is None  # signals are not part of the state
        c.decode(toks[12:], pos0=12)
        got = np.stack([c.signals_ith(i) for i in range(8)])
        want = _ref_signals(ref, toks)[12:]
        assert rel_err(got, want) <= TOL
        # restore into a fresh context
        c2.state_load(state)
        c2.decode(toks[12:], pos0=12)
        got2 = np.stack([c2.signals_ith(i) for i in range(8)])
        assert rel_err(got2, want) <= TOL
    finally:
        c.close()
        c2.close()


def test_side_stream_off(models, rt):
    _, lib, logs = rt
    m, ref = models["reward1"]
    toks = _tokens(12, seed=10)
    c_on, c_off = m.context(), m.context()
    try:
        lib.llama_set_otter(c_off.ptr, False)
        c_on.decode(toks)
        c_off.decode(toks)
        for i in range(len(toks)):
            np.testing.assert_array_equal(c_on.logits_ith(i), c_off.logits_ith(i))
        del logs[:]
        assert c_off.signals_ith(0) is None
        assert not lib.llama_get_otter_signals(c_off.ptr)
        assert any("no Otter signals" in line for line in logs), logs
        # on again: a fresh sequence works
        lib.llama_set_otter(c_off.ptr, True)
        c_off.clear()
        c_off.decode(toks)
        got = np.stack([c_off.signals_ith(i) for i in range(len(toks))])
        assert rel_err(got, _ref_signals(ref, toks)) <= TOL
    finally:
        c_on.close()
        c_off.close()


def test_all_positions(models, rt):
    _, lib, _ = rt
    m, ref = models["reward3"]
    toks = _tokens(30, seed=11)
    want = _ref_signals(ref, toks)
    c = m.context(n_batch=32, n_ubatch=8)  # several ubatches
    try:
        lib.llama_set_otter_all_positions(c.ptr, True)
        flags = [i % 7 == 3 for i in range(len(toks))]
        c.decode(toks, logits=flags)
        allp = np.stack([c.signals_pos(i) for i in range(len(toks))])
        logits_allpos = [c.logits_ith(i) for i, f in enumerate(flags) if f]
        # the base logits do not change in this mode
        coff = m.context(n_batch=32, n_ubatch=8)
        lib.llama_set_otter(coff.ptr, False)
        coff.decode(toks, logits=flags)
        for a, i in zip(logits_allpos, [i for i, f in enumerate(flags) if f]):
            np.testing.assert_array_equal(a, coff.logits_ith(i))
        coff.close()
        assert rel_err(allp, want) <= TOL
        np.testing.assert_array_equal(c.signals_pos(-1), allp[-1])
        assert c.signals_pos(len(toks)) is None
        # the output rows: same values through signals_ith, logits only there
        for i, f in enumerate(flags):
            if f:
                np.testing.assert_allclose(c.signals_ith(i), allp[i], rtol=0, atol=1e-6)
            else:
                assert c.signals_ith(i) is None
        # off again: signals_pos unavailable, signals_ith works
        lib.llama_set_otter_all_positions(c.ptr, False)
        c.clear()
        c.decode(toks, logits="last")
        assert c.signals_pos(0) is None
        assert rel_err(c.signals_ith(-1), want[-1]) <= TOL
    finally:
        c.close()


# --- main logits bit-identical to the base GGUF -----------------------------------------

@pytest.mark.parametrize("base_outtype", ["f32", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_main_logits_bit_identical(rt, gguf_dir, tiny_llama_dir, adapter_reward3_dir, base_outtype, flash_attn, n_threads):
    ll, lib, _ = rt
    base = Model(ll, lib, _base(gguf_dir, tiny_llama_dir, base_outtype))
    ot = Model(ll, lib, _otter(gguf_dir, tiny_llama_dir, adapter_reward3_dir, base_outtype=base_outtype))
    toks = _tokens(70, seed=12)
    try:
        for batch in (1, 64):
            res = []
            for mdl in (base, ot):
                c = mdl.context(n_threads=n_threads, flash_attn=flash_attn, kv_f32=False)
                try:
                    rows = []
                    for s in range(0, len(toks), batch):
                        chunk = toks[s:s + batch]
                        c.decode(chunk, pos0=s)
                        rows += [c.logits_ith(i) for i in range(len(chunk))]
                    res.append(np.stack(rows))
                    if mdl is ot:
                        assert c.signals_ith(-1) is not None
                finally:
                    c.close()
            assert np.array_equal(res[0], res[1]), f"batch {batch}: main logits differ from the base"
    finally:
        base.close()
        ot.close()


def test_qwen2(rt, gguf_dir, tiny_qwen2_dir, qwen2_adapter_dir):
    ll, lib, _ = rt
    from otter_gguf.reference.model import load_otter

    m = Model(ll, lib, _otter(gguf_dir, tiny_qwen2_dir, qwen2_adapter_dir))
    base = Model(ll, lib, _base(gguf_dir, tiny_qwen2_dir, "f32"))
    ref = load_otter(tiny_qwen2_dir, qwen2_adapter_dir, dtype=torch.float32)
    toks = _tokens(20, seed=13)
    c, cb = m.context(), base.context()
    try:
        c.decode(toks)
        cb.decode(toks)
        got = np.stack([c.signals_ith(i) for i in range(len(toks))])
        assert rel_err(got, _ref_signals(ref, toks)) <= TOL
        for i in range(len(toks)):
            np.testing.assert_array_equal(c.logits_ith(i), cb.logits_ith(i))
    finally:
        c.close()
        cb.close()
        m.close()
        base.close()


# --- llama_model_quantize on Otter GGUFs -------------------------------------------------

@pytest.mark.parametrize("ftype_name,qtype", [("q4_k_m", "Q4_K"), ("q8_0", "Q8_0")])
def test_quantize_f16_otter(rt, gguf_dir, tiny_llama_dir, adapter_reward3_dir, models, ftype_name, qtype):
    ll, lib, _ = rt
    src = _otter(gguf_dir, tiny_llama_dir, adapter_reward3_dir, base_outtype="f16", outtype="f16")
    q = quantize(src, gguf_dir / f"otter-{ftype_name}.gguf", ftype_name, threads=2)
    qbase = quantize(_base(gguf_dir, tiny_llama_dir, "f16"), gguf_dir / f"base-f16-{ftype_name}.gguf", ftype_name,
                     threads=2)

    # tensor types: the base tensors exactly as when quantizing the base alone, Otter rules for the rest
    r, rb = gguf.GGUFReader(q), gguf.GGUFReader(qbase)
    types = {t.name: t.tensor_type for t in r.tensors}
    for t in rb.tensors:
        assert types[t.name] == t.tensor_type, t.name
    T = gguf.GGMLQuantizationType
    assert types["otter_head.weight"] == T.Q8_0
    assert types["blk.0.otter_attn_norm.weight"] == T.F32
    assert types["blk.0.otter_attn_q.weight"] == T[qtype]
    # the mixes' Otter upgrades (docs/FORMAT.md; L = 4: more(i) for i = 2, 3)
    assert types["blk.1.otter_ffn_down.weight"] == T[qtype]
    assert types["blk.3.otter_ffn_down.weight"] == (T.Q6_K if ftype_name == "q4_k_m" else T[qtype])
    assert "otter.head.kind" in r.fields

    m, ref = models["reward3"]
    mq, mb = Model(ll, lib, q), Model(ll, lib, qbase)
    toks = _tokens(24, seed=14)
    c32, cq, cb = m.context(), mq.context(), mb.context()
    try:
        for c in (c32, cq, cb):
            c.decode(toks)
        s32 = np.stack([c32.signals_ith(i) for i in range(len(toks))])
        sq = np.stack([cq.signals_ith(i) for i in range(len(toks))])
        l32 = np.stack([c32.logits_ith(i) for i in range(len(toks))])
        lq = np.stack([cq.logits_ith(i) for i in range(len(toks))])
        # the tiny random model quantizes poorly: the signals may move as much as the base logits do,
        # not more (here q4_k_m: signals ~0.28 vs logits ~0.45; q8_0: ~0.044 vs ~0.058)
        err_s, err_l = rel_err(sq, s32), rel_err(lq, l32)
        assert err_s <= max(0.02, err_l), (err_s, err_l)
        assert err_s <= (0.1 if ftype_name == "q8_0" else 0.5), (err_s, err_l)
        for i in range(len(toks)):
            np.testing.assert_array_equal(cq.logits_ith(i), cb.logits_ith(i))
    finally:
        for c in (c32, cq, cb):
            c.close()
        mq.close()
        mb.close()


def test_seq_add_shift(models):
    """K-shift: decode at positions 100.., shift the sequence to 0.., continue.
    RoPE attention depends on relative positions only, so the result is the
    reference's; a side K left unshifted would break it."""
    m, ref = models["reward3"]
    toks = _tokens(24, seed=15)
    c = m.context()
    try:
        c.decode(toks[:20], pos0=100)
        c.ll.llama_memory_seq_add(c.mem, 0, 0, -1, -100)
        got = []
        for i in range(20, 24):
            c.decode([toks[i]], pos0=i)
            got.append(c.signals_ith(0))
        assert rel_err(np.stack(got), _ref_signals(ref, toks)[20:]) <= 1e-3
    finally:
        c.close()
