"""Otter adapter GGUFs in the runtime: a head beside an unchanged base, several heads at once.

Base + sidecar gives the one-file model's signals bit for bit and the base's logits bit
for bit; two heads each give what that head gives alone; sidecars for another base and
malformed sidecars are refused with a named error (NULL from llama_adapter_otter_init, a
ValueError from OtterLlama) and the process survives; an adapter GGUF is not a model;
a vocabulary with a duplicate token text is a load error, not an abort.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType

from helpers import LLAMA_KW, Model, pristine_lib_dir, rewrite, sidecar_mutations
from otter_gguf.cli import main as cli_main
from otter_gguf.format.constants import Keys, gguf_name
from otter_gguf.format.constants import OtterTensor as T
from otter_gguf.runtime import capi

pytestmark = pytest.mark.runtime

TOKS = [1] + list(range(20, 80))


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory, gguf_models, adapter_reward1_dir, adapter_reward3_dir):
    """(kind, outtype) -> (one-file GGUF, sidecar); the base is gguf_models.base."""
    from otter_gguf_converter import convert

    d = tmp_path_factory.mktemp("sidecar-rt")
    adapters = {"reward1": adapter_reward1_dir, "reward3": adapter_reward3_dir}
    made = {}

    def make(kind: str, outtype: str = "f32"):
        if (kind, outtype) not in made:
            a, base = adapters[kind], gguf_models.base
            one = convert(a, base, d / f"one-{kind}-{outtype}.gguf", outtype=outtype, progress=False)
            side = convert(a, base, d / f"{kind}-{outtype}.gguf", outtype=outtype, progress=False,
                           sidecar=True, name=kind)
            made[kind, outtype] = (one, side)
        return made[kind, outtype]

    return make


def llm(path, heads=None, **kw):
    from otter_gguf import OtterLlama

    return OtterLlama(str(path), otter_heads=heads, **{**LLAMA_KW, **kw})


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_k_m"])
def test_sidecar_equals_one_file_and_base_logits_unchanged(files, gguf_models, outtype):
    base = gguf_models.base
    before = sha(base)
    one, side = files("reward3", outtype)
    a = llm(one)
    b = llm(base, [side])
    assert b.signal_names == a.signal_names and b.head_kind == "reward" and b.n_out == 3
    sa, sb = a.score(tokens=TOKS).signals, b.score(tokens=TOKS).signals
    assert sa.shape == (len(TOKS), 3) and np.isfinite(sa).all()
    assert np.array_equal(sa, sb)
    # main logits: bit-identical to the base alone, signals to the one-file model's, for every row
    plain, with_head = llm(base, logits_all=True), llm(base, [side], logits_all=True)
    one_all = llm(one, logits_all=True)
    for m in (plain, with_head, one_all):
        m.eval(TOKS)
    n = len(TOKS)
    assert np.array_equal(with_head.scores[:n], plain.scores[:n])
    assert np.array_equal(with_head.signals, one_all.signals) and not np.isnan(with_head.signals).any()
    assert sha(base) == before


@pytest.fixture(scope="module")
def two(files, gguf_models):
    """(two-head OtterLlama, reward1 alone, reward3 alone) on the base."""
    h1, h3 = files("reward1")[1], files("reward3")[1]
    base = gguf_models.base
    return llm(base, {"harmless": h1, "helpful": h3}, n_seq_max=5), llm(base, [h1]), llm(base, [h3])


def test_two_heads_each_equal_that_head_alone(two):
    both, one, three = two
    assert [h.name for h in both.otter_heads] == ["harmless", "helpful"]
    assert both.signal_names == ["harmless/reward"] + [f"helpful/{n}" for n in three.signal_names]
    assert both.n_out == 4 and one.n_out == 1 and three.n_out == 3
    s = both.score(tokens=TOKS)  # all-positions mode
    assert s.signals.shape == (len(TOKS), 4)
    assert np.array_equal(s.signals[:, :1], one.score(tokens=TOKS).signals)
    assert np.array_equal(s.signals[:, 1:], three.score(tokens=TOKS).signals)
    assert set(s.rewards) == set(both.signal_names)
    # a completion: rewards named head/signal, the values of score() at the same positions
    out = both("Once upon a time", max_tokens=6, temperature=0)
    o = out["choices"][0]["otter"]
    assert o["signal_names"] == both.signal_names and len(o["rewards"]) == len(o["tokens"]) > 0
    prompt = both.tokenize(b"Once upon a time", add_bos=True, special=True)
    ref = both.score(tokens=prompt + o["tokens"]).signals[len(prompt):]
    # token-by-token decode vs one batch: the tolerance test_api.py uses for the same comparison
    np.testing.assert_allclose(np.asarray(o["signals"], dtype=np.float32), ref, rtol=1e-3, atol=2e-3)
    chunks = list(both("Once upon a time", max_tokens=6, temperature=0, stream=True))
    streamed = [r for c in chunks if c["choices"][0].get("otter") for r in c["choices"][0]["otter"]["rewards"]]
    assert [list(r) for r in streamed] == [list(r) for r in o["rewards"]]  # same names, head by head
    assert np.allclose([list(r.values()) for r in streamed], [list(r.values()) for r in o["rewards"]], atol=1e-3)


def test_guidance_with_a_weighted_combination_across_heads(two):
    from otter_gguf import Guidance

    both, one, three = two
    name3 = f"helpful/{three.signal_names[0]}"
    g = Guidance(weight=3.0, top_k=4, signal={"harmless/reward": 0.5, name3: 0.5}, trace=True)
    out = both("Once upon a time", max_tokens=5, temperature=0, guidance=g)
    o = out["choices"][0]["otter"]
    prompt = both.tokenize(b"Once upon a time", add_bos=True, special=True)
    ref1 = one.score(tokens=prompt + o["tokens"]).signals[len(prompt):, 0]
    ref3 = three.score(tokens=prompt + o["tokens"]).signals[len(prompt):, 0]
    assert len(o["guidance"]) == len(o["tokens"])
    for k, step in enumerate(o["guidance"]):
        scores = np.asarray(step["logits"]) + 3.0 * np.asarray(step["rewards"])
        assert np.allclose(step["scores"], scores, atol=1e-4)
        assert step["chosen"] == step["candidates"][int(np.argmax(scores))] == o["tokens"][k]
        r = step["rewards"][step["candidates"].index(step["chosen"])]
        assert r == pytest.approx(0.5 * ref1[k] + 0.5 * ref3[k], abs=1e-3)
    plain = both("Once upon a time", max_tokens=5, temperature=0)
    g0 = Guidance(weight=0.0, top_k=4, signal={"harmless/reward": 0.5, name3: 0.5})
    assert both("Once upon a time", max_tokens=5, temperature=0, guidance=g0)["choices"][0]["text"] == \
        plain["choices"][0]["text"]


def test_many_heads(files, gguf_models):
    """Eight heads (the graph budget grows with the attached heads' tensors); each part is that head's."""
    _, side = files("reward1")
    m = llm(gguf_models.base, {f"h{i}": side for i in range(8)})
    assert m.n_out == 8 and m.signal_names == [f"h{i}/reward" for i in range(8)]
    s = m.score(tokens=TOKS).signals
    ref = llm(gguf_models.base, [side]).score(tokens=TOKS).signals
    for i in range(8):
        assert np.array_equal(s[:, i:i + 1], ref)


def test_one_file_model_plus_a_sidecar(files):
    one1, _ = files("reward1")
    _, side3 = files("reward3")
    m = llm(one1, [side3])
    stem = Path(one1).stem
    assert [h.name for h in m.otter_heads] == [stem, "reward3"]
    s = m.score(tokens=TOKS).signals
    assert np.array_equal(s[:, :1], llm(one1).score(tokens=TOKS).signals)
    assert np.array_equal(s[:, 1:], llm(files("reward3")[0]).score(tokens=TOKS).signals)


def _rows(c, tokens):
    """Decode ``tokens`` from position 0 of a cleared context: (logits [n, V], signals [n, n_out] or None)."""
    c.clear()
    c.decode(tokens)
    sig = [c.signals_ith(i) for i in range(len(tokens))]
    return (np.stack([c.logits_ith(i) for i in range(len(tokens))]),
            None if sig[0] is None else np.stack(sig))


def test_heads_are_activated_per_context(rt, files, gguf_models):
    """One base model in memory, its adapters loaded once: contexts with head A, heads A+B and none
    at the same time; each runs exactly its heads, and the base logits of all three are those of the
    base GGUF alone (bit for bit); switching a context's heads mid-life gives the new heads' signals
    after the documented reset (memory re-created, cleared)."""
    ll, lib, logs = rt
    (one_a, side_a), (one_b, side_b) = files("reward1"), files("reward3")
    ref = {}
    for key, path in (("base", gguf_models.base), ("a", one_a), ("b", one_b)):
        m = Model(ll, lib, path)
        ref[key] = _rows(m.context(), TOKS)
        m.close()
    m = Model(ll, lib, gguf_models.base)
    a = lib.llama_adapter_otter_init(m.ptr, os.fsencode(str(side_a)))
    b = lib.llama_adapter_otter_init(m.ptr, os.fsencode(str(side_b)))
    assert a and b and not lib.llama_model_get_adapter_otter(m.ptr)
    none, ca, cab = m.context(), m.context(), m.context()  # loading an adapter activates it nowhere
    assert [lib.llama_otter_n_heads(c.ptr) for c in (none, ca, cab)] == [0, 0, 0]
    assert ca.set_heads([a]) == 0 and cab.set_heads([a, b]) == 0
    assert [(lib.llama_otter_n_heads(c.ptr), c.n_out) for c in (none, ca, cab)] == [(0, 0), (1, 1), (2, 4)]
    got = {name: _rows(c, TOKS) for name, c in (("none", none), ("a", ca), ("ab", cab))}
    for name, (logits, _) in got.items():
        assert np.array_equal(logits, ref["base"][0]), name
    assert got["none"][1] is None
    assert np.array_equal(got["a"][1], ref["a"][1])
    assert np.array_equal(got["ab"][1], np.concatenate([ref["a"][1], ref["b"][1]], axis=1))

    # switch mid-life: the memory is re-created empty, then B's signals
    ca.clear()
    ca.decode(TOKS[:5])
    assert ll.llama_memory_seq_pos_max(ca.mem, 0) == 4
    assert ca.set_heads([b]) == 0 and ca.n_out == 3
    assert ll.llama_memory_seq_pos_max(ca.mem, 0) == -1
    logits, sig = _rows(ca, TOKS)
    assert np.array_equal(logits, ref["base"][0]) and np.array_equal(sig, ref["b"][1])
    assert cab.set_heads([]) == 0 and cab.n_out == 0  # none: the base graph, no signals
    logits, sig = _rows(cab, TOKS)
    assert np.array_equal(logits, ref["base"][0]) and sig is None

    # refused: an error code and a log line naming why; the context keeps its heads
    m2 = Model(ll, lib, gguf_models.base)
    other = lib.llama_adapter_otter_init(m2.ptr, os.fsencode(str(side_a)))
    assert other
    for heads, needle in (([other], "not an Otter adapter loaded for this context's model"),
                          ([b, b], "listed twice")):
        del logs[:]
        assert ca.set_heads(heads) == -1
        assert needle in "".join(logs) and "keeps its 1 head(s)" in "".join(logs), logs
        assert ca.n_out == 3
    del logs[:]
    lib.llama_adapter_otter_free(b)  # ca runs it: refused, it stays loaded
    assert "is run by 1 context(s)" in "".join(logs), logs
    assert np.array_equal(_rows(ca, TOKS)[1], ref["b"][1])
    assert ca.set_heads([a]) == 0
    lib.llama_adapter_otter_free(b)  # no context runs it now: freed
    del logs[:]
    assert ca.set_heads([b]) == -1 and "already freed" in "".join(logs)
    assert np.array_equal(_rows(ca, TOKS)[1], ref["a"][1])
    for c in (none, ca, cab):
        c.close()
    m.close()
    m2.close()


def test_a_one_file_models_own_head_is_its_adapter(rt, files, gguf_models):
    """A one-file Otter GGUF carries its head as an adapter: a new context runs it, a context can drop
    it (the base graph: its logits bit for bit) and take it back, and it is freed with the model only."""
    ll, lib, logs = rt
    one, side = files("reward3")
    m = Model(ll, lib, one)
    own = lib.llama_model_get_adapter_otter(m.ptr)
    assert own and lib.llama_adapter_otter_n_out(own) == 3
    c = m.context()
    assert lib.llama_otter_n_heads(c.ptr) == 1
    logits, sig = _rows(c, TOKS)
    del logs[:]
    lib.llama_adapter_otter_free(own)
    assert "freed with the model" in "".join(logs), logs
    assert c.set_heads([]) == 0
    assert np.array_equal(_rows(c, TOKS)[0], logits) and _rows(c, TOKS)[1] is None
    extra = lib.llama_adapter_otter_init(m.ptr, os.fsencode(str(side)))  # the same head, as a sidecar
    assert c.set_heads([own, extra]) == 0 and c.n_out == 6
    l2, s2 = _rows(c, TOKS)
    assert np.array_equal(l2, logits) and np.array_equal(s2, np.concatenate([sig, sig], axis=1))
    c.close()
    m.close()


def test_otter_heads_errors(files, gguf_models, tmp_path):
    base = gguf_models.base
    _, side = files("reward1")
    with pytest.raises(ValueError, match="no such file"):
        llm(base, [tmp_path / "missing.gguf"])
    with pytest.raises(ValueError, match="named 'reward1'"):
        llm(base, [side, side])
    with pytest.raises(ValueError, match="is not an Otter adapter GGUF"):
        llm(base, [base])


@pytest.fixture(scope="module")
def qwen2_side(tmp_path_factory, hf_base_gguf, tiny_qwen2_dir, qwen2_adapter_dir):
    from otter_gguf_converter import convert

    q = hf_base_gguf(tiny_qwen2_dir, "f32")
    return convert(qwen2_adapter_dir, q, tmp_path_factory.mktemp("q") / "qwen2-head.gguf", sidecar=True,
                   progress=False)


def _init(rt, model_path, side):
    ll, lib, logs = rt
    m = Model(ll, lib, model_path)
    del logs[:]
    ad = capi.llama_adapter_otter_init(m.ptr, os.fsencode(str(side)))
    return m, ad, "".join(logs)


def _model_still_works(m):
    c = m.context()
    c.decode([1, 5, 6])
    assert np.isfinite(c.logits_ith(-1)).all()
    c.close()
    m.close()


def test_sidecar_for_another_base_refused(rt, gguf_models, qwen2_side, files, tmp_path):
    with pytest.raises(ValueError, match="fingerprint mismatch: otter.base.architecture"):
        llm(gguf_models.base, [qwen2_side])
    m, ad, log = _init(rt, gguf_models.base, qwen2_side)
    assert not ad
    assert "failed to load Otter adapter" in log and "base fingerprint mismatch" in log, log
    _model_still_works(m)
    # same architecture, another vocabulary / shape: refused by the runtime itself
    _, side = files("reward1")
    for kv, needle, py in (({Keys.Base.VOCAB_HASH: (12345, GGUFValueType.UINT64)}, Keys.Base.VOCAB_HASH,
                            "fingerprint mismatch: otter.base.vocab_hash = 12345"),
                           ({Keys.Base.FEED_FORWARD_LENGTH: (1024, GGUFValueType.UINT32)},
                            Keys.Base.FEED_FORWARD_LENGTH, "otter_ffn_down.weight has shape")):
        bad = rewrite(side, tmp_path / "other.gguf", kv=kv)
        with pytest.raises(ValueError, match=py):
            llm(gguf_models.base, [bad])
        m, ad, log = _init(rt, gguf_models.base, bad)
        assert not ad and f"otter: base fingerprint mismatch: {needle}" in log, log
        _model_still_works(m)


# what the runtime says about each of helpers.sidecar_mutations() (+ one base tensor too many)
MALFORMED = {
    "general_type": "not an Otter adapter GGUF",
    "lora": "adapter.type = 'lora'",
    "missing_key": f"key not found in model: {Keys.FEED_FORWARD_LENGTH}",
    "no_version": f"missing key '{Keys.VERSION}'",
    "key_type": f"key {Keys.EMBEDDING_LENGTH} has wrong type i32 but expected type u32",
    "hash_type": f"key {Keys.Base.VOCAB_HASH} has wrong type u32 but expected type u64",
    "n_out_absurd": f"{Keys.Head.OUTPUT_SIZE} = ",
    "d2_zero": f"{Keys.EMBEDDING_LENGTH} = 0 is out of range",
    "n_out_mismatch": "signal_names has 1 entries",
    "gqa": "head_count_kv = 3",
    "head_kind": f"{Keys.Head.KIND} = 'policy'",
    "version": f"unsupported {Keys.VERSION} 99",
    "arch_mismatch": f"base fingerprint mismatch: {Keys.Base.ARCHITECTURE}",
    "shape": f"{gguf_name(T.ATTN_Q, 1)}' has wrong shape",
    "missing_tensor": gguf_name(T.FFN_UP, 2),
    "norm_f16": f"{gguf_name(T.ATTN_NORM, 0)}' has type f16, expected f32",
    "matrix_int": f"{gguf_name(T.ATTN_OUT, 2)}' has type i32",
    "unknown_key": None,  # the runtime ignores keys it does not read; the Python reader refuses them
    "extra_tensor": "wrong number of tensors",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sidecar_refused_by_the_runtime(rt, gguf_models, files, tmp_path, case):
    _, side = files("reward1")
    needle = MALFORMED[case]
    if case == "extra_tensor":  # one base tensor more than the head has
        bad = _add_tensor(side, tmp_path / "extra.gguf", {"token_embd.weight": np.zeros((512, 256), np.float32)})
    else:
        bad = rewrite(side, tmp_path / f"{case}.gguf", **sidecar_mutations()[case](side))
    m, ad, log = _init(rt, gguf_models.base, bad)
    if needle is None:
        assert ad, log
    else:
        assert not ad, case
        assert "failed to load Otter adapter" in log and needle in log, log
    _model_still_works(m)


def _add_tensor(src, dst, tensors):
    import gguf

    r = GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(k, f.contents(), f.types[0], sub_type=sub or (GGUFValueType.STRING
                                                                      if f.types[0] == GGUFValueType.ARRAY else None))
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data, dtype=np.float32))
    for n, a in tensors.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("keep", [0.3, 0.9999])
def test_truncated_sidecar_refused_by_the_runtime(rt, gguf_models, files, tmp_path, keep):
    _, side = files("reward1")
    data = Path(side).read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    m, ad, log = _init(rt, gguf_models.base, bad)
    assert not ad and "data is not within the file bounds" in log, log
    _model_still_works(m)


def test_adapter_gguf_is_not_a_model(rt, files):
    ll, lib, logs = rt
    _, side = files("reward1")
    del logs[:]
    with pytest.raises(ValueError):
        Model(ll, lib, side)
    assert "error loading model" in "".join(logs)


_LOAD = r"""
import sys, llama_cpp
try:
    llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=True)
except ValueError as e:
    print("refused:", e)
    sys.exit(0)
print("loaded")
sys.exit(3)
"""


def _load_in_subprocess(path, lib_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH" or lib_dir is None}
    if lib_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    return subprocess.run([sys.executable, "-c", _LOAD, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_duplicate_token_text_is_a_load_error(gguf_models, tmp_path):
    """The pinned llama.cpp aborts (GGML_ASSERT) on this file; the patched runtime refuses it."""
    base = gguf_models.base
    toks = [bytes(p).decode("utf-8", "replace") for p in
            (lambda f: [f.parts[i] for i in f.data])(GGUFReader(base).fields["tokenizer.ggml.tokens"])]
    toks[300] = toks[299]
    bad = rewrite(base, tmp_path / "dup.gguf",
                  kv={"tokenizer.ggml.tokens": (toks, GGUFValueType.ARRAY, GGUFValueType.STRING)})
    res = _load_in_subprocess(bad)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert "refused:" in res.stdout
    assert "invalid vocabulary: token 300 has the same text as token 299" in res.stderr


@pytest.mark.slow
def test_pristine_llama_cpp_refuses_a_sidecar_as_a_model(files):
    _, side = files("reward1")
    res = _load_in_subprocess(side, pristine_lib_dir())
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert "refused:" in res.stdout and "error loading model" in res.stderr


def test_cli_run_and_score_with_heads(files, gguf_models):
    h1, h3 = files("reward1")[1], files("reward3")[1]
    base = gguf_models.base
    r = CliRunner().invoke(cli_main, ["score", str(base), "--head", str(h1), "--head", str(h3),
                                      "--tokens", ",".join(map(str, TOKS)), "--json", "-c", "256", "-t", "1"])
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(r.stdout[r.stdout.index("{"):])
    three = llm(base, [h3])
    assert d["signal_names"] == ["reward1/reward"] + [f"reward3/{n}" for n in three.signal_names]
    assert np.array_equal(np.asarray(d["signals"], dtype=np.float32)[:, 1:], three.score(tokens=TOKS).signals)
    r = CliRunner().invoke(cli_main, ["run", str(base), "--head", str(h1), "--head", str(h3), "-p", "Once",
                                      "-n", "3", "--temp", "0", "--json", "-c", "256", "-t", "1"])
    assert r.exit_code == 0, r.output
    assert '"reward1/reward"' in r.stdout
    r = CliRunner().invoke(cli_main, ["score", str(base), "--head", str(base), "--text", "hi"])
    assert r.exit_code == 2 and "is not an Otter adapter GGUF" in r.output
