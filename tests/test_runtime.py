"""The patched llama.cpp runtime against the PyTorch reference (docs/OTTER.md §3).

Runs through llama-cpp-python's low-level bindings on the library it loaded
(LLAMA_CPP_LIB_PATH); skipped only if that library is not the Otter-patched
runtime (no `llama_otter_series`).

The tiny llama (an adapter of each kind: reward1, reward3, token_reward), qwen2, qwen3 and gemma3 bases
(docs/OTTER.md §7): f32 signals with an f32 KV cache (whole prompt, token by token, two interleaved
sequences, seq_rm, state save/restore; gemma3 prompts longer than its sliding window of 8, with a full-size
and a trimmed SWA cache), main logits bit-identical to the base alone at f32 / q8_0 / q4_k_m. What only
qwen3 and gemma3 have in its own section: malformed heads for these architectures refused, base + sidecar
equal to the one-file model, and the real Gemma 3 270M (PyPI) with a copy-initialised head in the slow tier.

Tolerances (issue 14). llama and qwen3: 1e-4 relative. gemma3: ggml's CPU GELU/GEGLU rounds its input to
fp16 and reads an fp16 table (GGML_GELU_FP16), so any float difference can flip a rounding and the base
itself only agrees with the reference to ~3e-4 on the tiny model (~1e-2 on the real one). The signals are
held to GEMMA3_SIGNAL_FACTOR times the base logits' own error against the reference, measured in the same
test on the same tokens (and that error to GEMMA3_BASE_MAX, so a broken base cannot widen the bound); where
the table cannot interfere (every FFN gate zero: GELU(0) is exactly 0, so all FFNs vanish while the
attention, the per-head Q/K norms, the sandwich norms, the windows, RoPE bases, embedding scale and output
norms stay) the signals are held to 1e-4 like llama's.
"""

from __future__ import annotations

import numpy as np
import pytest

from otter_gguf.io.llama_quantize import quantize
from helpers import LLAMA_KW, Model, cached_otter, rel_err, rewrite
from otter_gguf.format.constants import Keys, gguf_name
from otter_gguf.format.constants import OtterTensor as T

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
V = gguf.GGUFValueType

pytestmark = pytest.mark.runtime

LLAMA_KINDS = ("reward1", "reward3", "token_reward")  # the tiny llama with each adapter kind
ARCHS = ("qwen3", "gemma3")
TOL = 1e-4                  # llama, qwen3 (and gemma3 where the fp16 GELU table cannot interfere)
GEMMA3_SIGNAL_FACTOR = 4.0  # gemma3 signals vs the reference: at most this times the base logits' error
GEMMA3_BASE_MAX = 2e-3      # tiny gemma3: the base logits' own error vs the reference (measured ~3e-4)
N_OUT = {"reward1": 1, "reward3": 3, "token_reward": 512, "qwen3": 1, "gemma3": 3}


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
def dirs(tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir, gemma3_adapter_dir):
    """arch -> (HF base dir, adapter dir)"""
    return {"qwen3": (tiny_qwen3_dir, qwen3_adapter_dir), "gemma3": (tiny_gemma3_dir, gemma3_adapter_dir)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, hf_base_gguf, dirs):
    """files(arch, base_outtype="f32", sidecar=False) -> (base GGUF, Otter GGUF or sidecar; head f32)."""
    from otter_gguf_converter import convert

    d = tmp_path_factory.mktemp("rt-q3g3")
    made = {}

    def make(arch, base_outtype="f32", sidecar=False):
        key = (arch, base_outtype, sidecar)
        if key not in made:
            hf, ad = dirs[arch]
            base = hf_base_gguf(hf, base_outtype)
            out = d / f"{arch}-{base_outtype}-{'side' if sidecar else 'one'}.gguf"
            made[key] = (base, convert(ad, base, out, outtype="f32", progress=False, sidecar=sidecar,
                                       name="judge" if sidecar else None))
        return made[key]

    return make


class _Built(dict):
    """A dict whose missing values are built by ``make(key)`` on first use."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = value = self._make(key)
        return value


@pytest.fixture(scope="module")
def models(rt, gguf_dir, files, dirs, tiny_llama_dir, adapter_reward1_dir, adapter_reward3_dir,
           adapter_token_reward_dir):
    """case -> (runtime Model of the f32 one-file GGUF, reference OtterModel of the HF base + adapter), built on
    first use: the tiny llama with each adapter kind (LLAMA_KINDS), qwen3 and gemma3 (ARCHS)."""
    ll, lib, _ = rt
    from otter_gguf.reference.model import load_otter

    llama = {"reward1": adapter_reward1_dir, "reward3": adapter_reward3_dir, "token_reward": adapter_token_reward_dir}

    def make(case):
        if case in llama:
            ad = llama[case]
            return Model(ll, lib, _otter(gguf_dir, tiny_llama_dir, ad)), load_otter(tiny_llama_dir, ad, dtype=torch.float32)
        return Model(ll, lib, files(case)[1]), cached_otter(*dirs[case])

    out = _Built(make)
    yield out
    for m, _ in out.values():
        m.close()


def _tokens(n, seed=0, v=512):
    return [int(t) for t in np.random.RandomState(seed).randint(3, v, size=n)]


def _ref_signals(ref, toks):
    return ref(torch.tensor(toks)).signals.detach().numpy()


def _context(model, monkeypatch, swa_full=True, **kw):
    """model.context(**kw), with a trimmed SWA cache (n_swa + n_ubatch cells) if not ``swa_full``."""
    if not swa_full:
        default = model.ll.llama_context_default_params

        def params():
            p = default()
            p.swa_full = False
            return p

        monkeypatch.setattr(model.ll, "llama_context_default_params", params)
    try:
        return model.context(**kw)
    finally:
        monkeypatch.undo()


def check(case, signals, logits, ref_signals, ref_logits, tight=False):
    """The tolerance rule of the module docstring (``case``: one of LLAMA_KINDS or ARCHS); returns (signal
    error, base logits error)."""
    err_s, err_b = rel_err(signals, ref_signals), rel_err(logits, ref_logits)
    if case != "gemma3" or tight:
        assert err_b <= TOL, f"base logits vs reference: {err_b:.3g}"
        assert err_s <= TOL, f"signals vs reference: {err_s:.3g} (base logits {err_b:.3g})"
    else:
        assert err_b <= GEMMA3_BASE_MAX, f"gemma3 base logits vs reference: {err_b:.3g}"
        assert err_s <= max(GEMMA3_SIGNAL_FACTOR * err_b, TOL), \
            f"gemma3 signals vs reference: {err_s:.3g} > {GEMMA3_SIGNAL_FACTOR} x base logits' {err_b:.3g}"
    return err_s, err_b


def _ref(ref, toks):
    with torch.no_grad():
        o = ref(torch.tensor(toks))
    return o.signals.numpy(), o.logits.numpy()


def _rows(c, idx):
    return np.stack([c.signals_ith(i) for i in idx]), np.stack([c.logits_ith(i) for i in idx])


def _steps(c, steps):
    """Decode each (tokens, seqs, positions) of ``steps`` as one batch: the signal and logits rows of all."""
    sig, lg = [], []
    for toks, seqs, pos in steps:
        c.decode(toks, seqs=seqs, positions=pos)
        s, r = _rows(c, range(len(toks)))
        sig += list(s)
        lg += list(r)
    return np.stack(sig), np.stack(lg)


def _one_by_one(c, toks, pos0=0):
    return _steps(c, [([t], [0], [pos0 + i]) for i, t in enumerate(toks)])


@pytest.mark.parametrize("kind", [*LLAMA_KINDS, *ARCHS])
def test_model_metadata(models, rt, kind):
    _, lib, _ = rt
    m, ref = models[kind]
    assert m.has_otter
    assert m.n_out == ref.n_out == N_OUT[kind]
    assert lib.llama_model_otter_head_kind(m.ptr).decode() == ("token_reward" if kind == "token_reward" else "reward")
    names = [lib.llama_model_otter_signal_name(m.ptr, i).decode()
             for i in range(lib.llama_model_otter_n_signal_names(m.ptr))]
    assert names == ref.signal_names
    assert lib.llama_model_otter_signal_name(m.ptr, len(names)) is None
    assert lib.llama_otter_series().decode().startswith("otter-gguf/")


@pytest.mark.parametrize("kind", [*LLAMA_KINDS, *ARCHS])
def test_whole_prompt(models, kind):
    """40 tokens: five times gemma3's window of 8."""
    m, ref = models[kind]
    toks = _tokens(40, seed=1)
    c = m.context()
    try:
        c.decode(toks)
        got, logits = _rows(c, range(40))
        check(kind, got, logits, *_ref(ref, toks))
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


@pytest.mark.parametrize("kind, swa_full", [pytest.param("reward3", True, id="reward3"),
                                            pytest.param("token_reward", True, id="token_reward"),
                                            ("qwen3", True), ("gemma3", True), ("gemma3", False)])
def test_token_by_token(models, monkeypatch, kind, swa_full):
    """Decoding one token at a time (gemma3: past the window); with a trimmed SWA cache the old cells of the
    sliding layers (main and side K/V alike) are dropped as the window moves on."""
    m, ref = models[kind]
    toks = _tokens(24, seed=2)
    c = _context(m, monkeypatch, swa_full, n_batch=8)
    try:
        check(kind, *_one_by_one(c, toks), *_ref(ref, toks))
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


@pytest.mark.parametrize("kind", ["reward3", *ARCHS])
def test_two_interleaved_sequences(models, kind):
    m, ref = models[kind]
    a, b = _tokens(16, seed=4), _tokens(16, seed=5)
    c = m.context(n_seq_max=2)
    try:
        # both prompts interleaved in one batch, then both sequences a token at a time in one batch
        steps = [([t for pair in zip(a[:10], b[:10]) for t in pair], [0, 1] * 10, [i // 2 for i in range(20)])]
        steps += [([a[i], b[i]], [0, 1], [i, i]) for i in range(10, 16)]
        sig, lg = _steps(c, steps)  # rows alternate a, b
        check(kind, sig[0::2], lg[0::2], *_ref(ref, a))
        check(kind, sig[1::2], lg[1::2], *_ref(ref, b))
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["reward3", *ARCHS])
def test_seq_rm_rewind(models, kind):
    m, ref = models[kind]
    toks, other = _tokens(20, seed=6), _tokens(8, seed=7)
    c = m.context()
    try:
        c.decode(toks[:12] + other)  # 20 tokens, the last 8 will be rewound
        assert c.seq_rm(0, 12, -1)
        c.decode(toks[12:], pos0=12)
        s, r = _ref(ref, toks)
        check(kind, *_rows(c, range(8)), s[12:], r[12:])
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["reward3", *ARCHS])
def test_state_save_restore(models, kind):
    m, ref = models[kind]
    toks = _tokens(20, seed=8)
    s, r = _ref(ref, toks)
    c, c2 = m.context(), m.context()
    try:
        c.decode(toks[:12])
        state = c.state_save()
        c.decode(_tokens(5, seed=9), pos0=12)  # diverge
        c.state_load(state)
        assert c.signals_ith(0) is None  # signals are not part of the state
        c.decode(toks[12:], pos0=12)
        check(kind, *_rows(c, range(8)), s[12:], r[12:])
        c2.state_load(state)  # into a fresh context
        c2.decode(toks[12:], pos0=12)
        check(kind, *_rows(c2, range(8)), s[12:], r[12:])
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

# per architecture: (prompt length, the batch sizes it is decoded in); llama's head is reward3
MAIN_LOGITS = {"llama": (70, (1, 64)), "qwen3": (40, (1, 32)), "gemma3": (40, (1, 32))}


@pytest.mark.parametrize("arch", ["llama", *ARCHS])
@pytest.mark.parametrize("base_outtype", ["f32", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_main_logits_bit_identical(rt, gguf_dir, files, tiny_llama_dir, adapter_reward3_dir, arch, base_outtype,
                                   flash_attn, n_threads):
    ll, lib, _ = rt
    if arch == "llama":
        base_path = _base(gguf_dir, tiny_llama_dir, base_outtype)
        one = _otter(gguf_dir, tiny_llama_dir, adapter_reward3_dir, base_outtype=base_outtype)
    else:
        base_path, one = files(arch, base_outtype)
    base, ot = Model(ll, lib, base_path), Model(ll, lib, one)
    n, batches = MAIN_LOGITS[arch]
    toks = _tokens(n, seed=12)
    try:
        for batch in batches:
            res = []
            for mdl in (base, ot):
                c = mdl.context(n_threads=n_threads, flash_attn=flash_attn, kv_f32=False)
                try:
                    res.append(c.batched_logits(toks, batch))
                    if mdl is ot:
                        sig = c.signals_ith(-1)
                        assert sig is not None and np.isfinite(sig).all()
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


# ================================================================== qwen3 and gemma3 (docs/OTTER.md §7)
# What only these architectures have (shared with llama above: metadata, whole prompt, token by token,
# interleaved sequences, seq_rm, state save/restore, main logits bit-identical).

# ------------------------------------------------------------------ a prompt in ubatches, a trimmed SWA cache
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_in_ubatches_then_decode(models, monkeypatch, arch):
    """A 20-token prompt in ubatches of 8 with a trimmed SWA cache, then 10 tokens one by one."""
    m, ref = models[arch]
    toks = _tokens(30, seed=3)
    c = _context(m, monkeypatch, False, n_batch=32, n_ubatch=8)
    try:
        c.decode(toks[:20])
        prompt, rest = _rows(c, range(20)), _one_by_one(c, toks[20:], 20)
        check(arch, *(np.concatenate(x) for x in zip(prompt, rest)), *_ref(ref, toks))
    finally:
        c.close()


# ------------------------------------------------------------------ gemma3 where the GELU table cannot interfere
@pytest.fixture(scope="module")
def gemma3_no_ffn(tmp_path_factory, tiny_gemma3_dir, hf_base_gguf):
    """(f32 Otter GGUF, reference) of the tiny gemma3 with every FFN gate (base and side) zero."""
    from safetensors.torch import load_file, save_file

    from otter_gguf.format.adapter import load_adapter, save_adapter
    from otter_gguf.reference import fixtures as fx
    from otter_gguf.reference.model import OtterModel, load_base
    from otter_gguf_converter import convert

    d = tmp_path_factory.mktemp("gemma3-no-ffn")
    hf = d / "base"
    hf.mkdir()
    for f in tiny_gemma3_dir.iterdir():
        if f.name != "model.safetensors":
            (hf / f.name).write_bytes(f.read_bytes())
    w = load_file(str(tiny_gemma3_dir / "model.safetensors"))
    save_file({k: (torch.zeros_like(v) if "mlp.gate_proj" in k else v) for k, v in w.items()},
              str(hf / "model.safetensors"), metadata={"format": "pt"})
    ad = fx.make_adapter(d / "adapter", hf, "reward3", seed=11)
    cfg, t = load_adapter(ad)
    t = {k: (torch.zeros_like(v) if "mlp.gate_proj" in k else v) for k, v in t.items()}
    save_adapter(ad, cfg, t, dtype="float32")
    out = convert(ad, hf_base_gguf(hf, "f32"), d / "otter.gguf", outtype="f32", progress=False)
    return out, OtterModel(load_base(hf), *load_adapter(ad))


def test_gemma3_tight_where_the_gelu_table_cannot_interfere(rt, gemma3_no_ffn, monkeypatch):
    ll, lib, _ = rt
    path, ref = gemma3_no_ffn
    m = Model(ll, lib, path)
    toks = _tokens(30, seed=10)
    s, r = _ref(ref, toks)
    try:
        c = m.context()
        c.decode(toks)
        check("gemma3", *_rows(c, range(30)), s, r, tight=True)
        c.close()
        c = _context(m, monkeypatch, False, n_batch=8)
        check("gemma3", *_one_by_one(c, toks), s, r, tight=True)
        c.close()
    finally:
        m.close()


# ------------------------------------------------------------------ qwen3 and gemma3: malformed heads refused
def _q_norm_short(path, bid):
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(path).tensors if t.name == gguf_name(T.ATTN_Q_NORM, bid))
    return np.array(t.data, dtype=np.float32)[:64]


MALFORMED = {
    ("qwen3", "q_norm_shape"): (lambda p: dict(tensors={gguf_name(T.ATTN_Q_NORM, 1): _q_norm_short(p, 1)}),
                                gguf_name(T.ATTN_Q_NORM, 1)),
    ("qwen3", "missing_k_norm"): (lambda p: dict(drop_tensors={gguf_name(T.ATTN_K_NORM, 2)}),
                                  gguf_name(T.ATTN_K_NORM, 2)),
    ("gemma3", "q_norm_shape"): (lambda p: dict(tensors={gguf_name(T.ATTN_Q_NORM, 1): _q_norm_short(p, 1)}),
                                 gguf_name(T.ATTN_Q_NORM, 1)),
    ("gemma3", "missing_post_ffw_norm"): (lambda p: dict(drop_tensors={gguf_name(T.FFN_POST_NORM, 3)}),
                                          gguf_name(T.FFN_POST_NORM, 3)),
    ("gemma3", "sliding_window"): (lambda p: dict(kv={Keys.Base.SLIDING_WINDOW: (16, V.UINT32)}),
                                   Keys.Base.SLIDING_WINDOW),
    ("gemma3", "sliding_window_pattern"): (
        lambda p: dict(kv={Keys.Base.SLIDING_WINDOW_PATTERN: ([True, False] * 3, V.ARRAY, V.BOOL)}),
        Keys.Base.SLIDING_WINDOW_PATTERN),
    ("gemma3", "rope_freq_base_swa"): (lambda p: dict(kv={Keys.Base.ROPE_FREQ_BASE_SWA: (5e4, V.FLOAT32)}),
                                       Keys.Base.ROPE_FREQ_BASE_SWA),
}


@pytest.mark.parametrize("arch, case", sorted(MALFORMED))
def test_malformed_one_file_refused(rt, files, tmp_path, arch, case):
    ll, lib, logs = rt
    mutate, needle = MALFORMED[arch, case]
    _, one = files(arch)
    bad = rewrite(one, tmp_path / f"{case}.gguf", **mutate(one))
    del logs[:]
    with pytest.raises(ValueError):
        Model(ll, lib, bad)
    text = "".join(logs)
    assert "error loading model" in text and needle in text, text[-2000:]


@pytest.mark.parametrize("arch, case", sorted(MALFORMED))
def test_malformed_sidecar_refused(rt, files, tmp_path, arch, case):
    """Refused by OtterLlama (the Python reader, named) and by llama_adapter_otter_init itself (NULL, logged);
    the base keeps working."""
    import os

    from otter_gguf import OtterLlama
    from otter_gguf.runtime import capi

    ll, lib, logs = rt
    mutate, needle = MALFORMED[arch, case]
    base, side = files(arch, sidecar=True)
    bad = rewrite(side, tmp_path / f"{case}.gguf", **mutate(side))
    with pytest.raises(ValueError, match="otter_heads: "):
        OtterLlama(str(base), otter_heads=[str(bad)], **LLAMA_KW)
    m = Model(ll, lib, base)
    try:
        del logs[:]
        assert not capi.llama_adapter_otter_init(m.ptr, os.fsencode(str(bad)))
        text = "".join(logs)
        assert "failed to load Otter adapter" in text and needle in text, text[-2000:]
        c = m.context()
        c.decode([1, 5, 6])
        assert np.isfinite(c.logits_ith(-1)).all()
        c.close()
    finally:
        m.close()


# ------------------------------------------------------------------ qwen3 and gemma3: base + sidecar
@pytest.mark.parametrize("arch", ARCHS)
def test_sidecar_equals_one_file_and_base_logits_unchanged(files, arch):
    from otter_gguf import OtterLlama

    base, one = files(arch)
    _, side = files(arch, sidecar=True)
    toks = [1] + _tokens(30, seed=13)
    a = OtterLlama(str(one), **LLAMA_KW)
    b = OtterLlama(str(base), otter_heads=[str(side)], **LLAMA_KW)
    assert b.signal_names == a.signal_names and b.n_out == a.n_out
    sa, sb = a.score(tokens=toks).signals, b.score(tokens=toks).signals
    assert np.isfinite(sa).all() and np.array_equal(sa, sb)
    plain = OtterLlama(str(base), logits_all=True, **LLAMA_KW)
    with_head = OtterLlama(str(base), otter_heads=[str(side)], logits_all=True, **LLAMA_KW)
    for m in (plain, with_head):
        m.eval(toks)
    assert np.array_equal(with_head.scores[:len(toks)], plain.scores[:len(toks)])


# ------------------------------------------------------------------ the real model: Gemma 3 270M Q4_K_M (PyPI)
PROMPT = (b"The quick brown fox jumps over the lazy dog. Otters are semiaquatic mammals that live in rivers and "
          b"along coasts; they eat fish, crabs and shellfish, and they are known for")


@pytest.fixture(scope="module")
def real(tmp_path_factory, gemma3_270m_ref):
    """Gemma 3 270M with a copy-initialised head (insert_otter on its dequantized weights: d2=64, 2/1 side heads,
    f2=128, 2 signals) as a sidecar (f16), the one-file model merged from it, that model with every tensor
    dequantized to F32, and the reference on the dequantized weights."""
    from otter_gguf.format.adapter import save_adapter
    from otter_gguf.reference.gguf_base import dequantize_gguf, load_otter_gguf
    from otter_gguf.reference.model import insert_otter
    from otter_gguf_converter import convert
    from otter_gguf_converter.sidecar import merge

    d = tmp_path_factory.mktemp("gemma3-270m")
    base, ref_base = gemma3_270m_ref
    cfg, t = insert_otter(ref_base, d2=64, h2=2, h2_kv=1, f2=128, n_out=2, signal_names=["alpha", "beta"],
                          init="copy", seed=0, base_model="gemma-3-270m")
    ad = save_adapter(d / "adapter", cfg, t, dtype="float32")
    side = convert(ad, base, d / "judge.gguf", outtype="f16", sidecar=True, name="judge", progress=False)
    one = merge(base, [side], d / "one.gguf", progress=False)
    return dict(base=base, side=side, one=one, f32=lambda: dequantize_gguf(one, d / "one-f32.gguf"),
                ref=load_otter_gguf(one, cfg, base=ref_base))


def _prompt_tokens(base):
    from llama_cpp import Llama

    return Llama(str(base), vocab_only=True, verbose=False).tokenize(PROMPT, add_bos=True)


@pytest.mark.slow
def test_real_gemma3_main_logits_bit_identical(real):
    from otter_gguf import OtterLlama

    toks = _prompt_tokens(real["base"])
    kw = dict(LLAMA_KW, n_batch=16, logits_all=True)  # several batches
    runs = [OtterLlama(str(real["base"]), **kw), OtterLlama(str(real["base"]), otter_heads=[str(real["side"])], **kw),
            OtterLlama(str(real["one"]), **kw)]
    for m in runs:
        m.eval(toks)
    n = len(toks)
    assert np.array_equal(runs[1].scores[:n], runs[0].scores[:n])
    assert np.array_equal(runs[2].scores[:n], runs[0].scores[:n])
    assert np.isfinite(runs[1].signals[:n]).all() and np.array_equal(runs[1].signals[:n], runs[2].signals[:n])


@pytest.mark.slow
def test_real_gemma3_signals_vs_the_reference(rt, real):
    """On the dequantized weights: with F32 weights the runtime differs from the reference only by float
    rounding and the fp16 GELU table (base logits measured 8e-4), and the signals are held to the module's
    rule; with the Q4_K_M/Q5_0 weights themselves ggml also quantizes the activations to 8 bits for its
    matmuls (base logits vs the same reference ~1e-1, the F32 file's 100x), and the signals follow the
    same rule against that measured error."""
    ll, lib, _ = rt
    toks = _prompt_tokens(real["base"])
    s, r = _ref(real["ref"], toks)
    for path, base_max in ((real["f32"](), 5e-3), (real["one"], 0.2)):
        m = Model(ll, lib, path)
        try:
            c = m.context(n_ctx=256, n_batch=256)
            c.decode(toks)
            sig, lg = _rows(c, range(len(toks)))
            c.close()
            err_s, err_b = rel_err(sig, s), rel_err(lg, r)
            assert err_b <= base_max, (path.name, err_b)
            assert err_s <= GEMMA3_SIGNAL_FACTOR * err_b, (path.name, err_s, err_b)
        finally:
            m.close()


@pytest.mark.slow
def test_real_gemma3_streamed_completion_with_rewards(real):
    """A plain-text prompt (a base model), greedy: the text is the base alone's, every generated token has a
    reward per signal, streamed as in the whole completion."""
    from otter_gguf import OtterLlama

    prompt = "The capital of France is"
    plain = OtterLlama(str(real["base"]), **LLAMA_KW)
    llm = OtterLlama(str(real["base"]), otter_heads=[str(real["side"])], **LLAMA_KW)
    want = plain(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    out = llm(prompt, max_tokens=8, temperature=0)
    assert out["choices"][0]["text"] == want
    o = out["choices"][0]["otter"]
    assert o["signal_names"] == ["alpha", "beta"] and len(o["rewards"]) == len(o["tokens"]) == 8
    vals = np.array([[r["alpha"], r["beta"]] for r in o["rewards"]])
    assert np.isfinite(vals).all() and vals.std(0).min() > 0  # they vary from token to token
    chunks = list(llm(prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    streamed = [r for c in chunks if c["choices"][0].get("otter") for r in c["choices"][0]["otter"]["rewards"]]
    assert len(streamed) == 8 and all(list(r) == ["alpha", "beta"] for r in streamed)
    np.testing.assert_allclose([[r["alpha"], r["beta"]] for r in streamed], vals, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_gemma3_trained_head(tmp_path, gemma3_270m_ref):
    """`otter-gguf train` on the Gemma 3 270M GGUF itself (train on the file you serve): a small sentiment
    head written as a sidecar. The runtime runs it beside the untouched base (main logits bit-identical,
    signals against the reference on the same dequantized weights by the module's rule) and it ranks held-out
    positive texts above negative ones."""
    import json

    from click.testing import CliRunner

    from otter_gguf import OtterLlama
    from otter_gguf.cli import main as cli
    from otter_gguf.format.adapter import load_adapter
    from otter_gguf.reference.model import OtterModel

    base, ref_base = gemma3_270m_ref
    pos, neg = ["great", "lovely", "wonderful", "excellent"], ["awful", "terrible", "horrible", "dreadful"]
    recs = [{"text": f"The {thing} was {adj}.", "target": 1.0 if adj in pos else -1.0}
            for thing in ("food", "room", "service", "film", "trip") for adj in pos + neg]
    data = tmp_path / "sentiment.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out, head = tmp_path / "head", tmp_path / "sentiment.gguf"
    r = CliRunner().invoke(cli, ["train", str(base), str(data), "-o", str(out), "--objective", "sequence_regression",
                                 "--steps", "20", "--lr", "1e-3", "--batch-size", "8", "--d2", "32", "--f2", "64",
                                 "--heldout", "0", "--signal-name", "sentiment", "--no-progress", "--threads", "2",
                                 "--save-dtype", "float32", "--gguf", str(head), "--outtype", "f32", "--sidecar"])
    assert r.exit_code == 0, r.output

    plain = OtterLlama(str(base), **dict(LLAMA_KW, logits_all=True))
    llm = OtterLlama(str(base), otter_heads=[str(head)], **dict(LLAMA_KW, logits_all=True))
    cfg, tensors = load_adapter(out)
    ref = OtterModel(ref_base, cfg, tensors)
    held_out = {"The concert was superb.": 1, "The hotel was fantastic.": 1,
                "The concert was appalling.": -1, "The hotel was disgusting.": -1}
    final = {}
    for text, label in held_out.items():
        toks = plain.tokenize(text.encode(), add_bos=True)
        plain.reset()
        plain.eval(toks)
        llm.reset()
        llm.eval(toks)
        n = len(toks)
        assert np.array_equal(llm.scores[:n], plain.scores[:n])  # the base output, untouched
        with torch.no_grad():
            out_ref = ref(torch.tensor(toks))
        err_b = rel_err(llm.scores[:n], out_ref.logits.numpy())
        err_s = rel_err(llm.signals[:n], out_ref.signals.numpy())
        assert err_s <= GEMMA3_SIGNAL_FACTOR * err_b, (text, err_s, err_b)
        final[text] = float(llm.signals[n - 1][0])
    pos_min = min(v for t, v in final.items() if held_out[t] > 0)
    neg_max = max(v for t, v in final.items() if held_out[t] < 0)
    assert pos_min > neg_max, final
