"""OtterLlama: llama-cpp-python parity, signals next to tokens, score(), guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import LLAMA_KW, fake_signals, fake_source_factory

pytestmark = pytest.mark.runtime

PROMPT = "The quick brown"


def _logits_last(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def _strip(obj):
    """A completion / chat object without its random id and timestamp."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("id", "created")}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    return obj


def _check_offsets(text, o):
    """Every token's text sits at its offset in the completion text."""
    assert len(o["text_offset"]) == len(o["token_texts"]) == len(o["tokens"])
    assert o["text_offset"] == sorted(o["text_offset"])
    for off, t in zip(o["text_offset"], o["token_texts"]):
        if t:
            assert text[off: off + len(t)] == t


def _stream_tokens(chunks):
    toks, sigs, texts = [], [], []
    for c in chunks:
        o = c["choices"][0]["otter"]
        toks += o["tokens"]
        sigs += o["signals"] if o.get("signals") is not None else o["token_rewards"]
        texts.append(c["choices"][0]["text"])
    return toks, sigs, "".join(texts)


# ---------------------------------------------------------------------------
# guidance settings and selection rules (no model)
# ---------------------------------------------------------------------------
@pytest.mark.unit
def test_guidance_validation():
    from otter_gguf.runtime.guidance import Guidance

    for w in (float("nan"), float("inf"), -float("inf"), "1", None, True):
        with pytest.raises(ValueError, match="weight"):
            Guidance(weight=w)
    for k in (0, -3, 1.5, True, "4"):
        with pytest.raises(ValueError, match="top_k"):
            Guidance(top_k=k)
    with pytest.raises(ValueError, match="mode"):
        Guidance(mode="greedy")
    with pytest.raises(ValueError, match="unknown guidance option"):
        Guidance.coerce({"weight": 1.0, "topk": 3})
    with pytest.raises(ValueError, match="finite"):
        Guidance(signal={"a": float("nan")})
    with pytest.raises(ValueError, match="empty"):
        Guidance(signal={})
    g = Guidance.coerce({"weight": 2, "top_k": 3, "signal": {"b": 1, "a": 0.5}})
    assert g.weight == 2.0 and g.top_k == 3
    r = g.resolve(head_kind="reward", n_out=2, signal_names=["a", "b"], n_vocab=10)
    np.testing.assert_array_equal(r.coef, [0.5, 1.0])
    np.testing.assert_allclose(r.reward(np.array([[2.0, 3.0]])), [4.0])
    with pytest.raises(ValueError, match="unknown signal name 'c'"):
        Guidance(signal="c").resolve(head_kind="reward", n_out=2, signal_names=["a", "b"], n_vocab=10)
    with pytest.raises(ValueError, match="2 signals"):
        Guidance().resolve(head_kind="reward", n_out=2, signal_names=["a", "b"], n_vocab=10)
    with pytest.raises(ValueError, match="token_reward"):
        Guidance(mode="dexperts").resolve(head_kind="reward", n_out=1, signal_names=["r"], n_vocab=10)
    with pytest.raises(ValueError, match="leave signal unset"):
        Guidance(signal="r").resolve(head_kind="token_reward", n_out=10, signal_names=[], n_vocab=10)


@pytest.mark.unit
def test_selection_rules():
    from otter_gguf.runtime.guidance import args_pick, dexperts_logits, token_args_logits, top_k_ids

    logits = np.array([1.0, 3.0, 3.0, -np.inf, 2.0, 0.5], dtype=np.float32)
    assert top_k_ids(logits, 3).tolist() == [1, 2, 4]  # ties to the lower id, -inf never
    assert top_k_ids(logits, 10).tolist() == [1, 2, 4, 0, 5]
    sig = np.array([0.0, -1.0, 0.0, 9.0, 0.9, 5.0], dtype=np.float32)
    trace = []
    out = token_args_logits(logits, sig, 2.0, 3, trace=trace)
    # candidates 1, 2, 4 score 1.0, 3.0, 3.8; everything else is masked
    np.testing.assert_allclose(out[[1, 2, 4]], [1.0, 3.0, 3.8], rtol=1e-6)
    assert np.isneginf(out[[0, 3, 5]]).all() and int(np.argmax(out)) == 4
    assert trace[0]["candidates"] == [1, 2, 4]
    np.testing.assert_allclose(dexperts_logits(logits[:3], sig[:3], 2.0), [1.0, 1.0, 3.0])
    assert args_pick(np.array([1.0, 5.0, 5.0]), 0.0, None) == 1
    draws = [args_pick(np.array([0.0, 1.0, 2.0]), 1.0, np.random.default_rng(5)) for _ in range(3)]
    assert draws == [args_pick(np.array([0.0, 1.0, 2.0]), 1.0, np.random.default_rng(5)) for _ in range(3)]


def test_signal_store_sparse_keeps_latest_and_token_rewards():
    from otter_gguf.runtime.llama import _SignalStore

    st = _SignalStore(16, 4, token_head=True, dense=False)
    st.put(3, np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32))
    st.note_token(4, 2)
    st.put(4, np.array([4.0, 5.0, 6.0, 7.0], dtype=np.float32))
    assert st.get(3) is None and st.get(4) is not None  # only the latest row is kept
    assert st.token_reward(4) == 2.0
    st.keep_from = 4
    st.note_token(5, 1)
    st.put(5, np.zeros(4, dtype=np.float32))
    assert st.get(4) is not None and st.token_reward(5) == 5.0
    st.truncate(5)
    assert st.get(5) is None and st.token_reward(5) is None and st.get(4) is not None


# ---------------------------------------------------------------------------
# plain GGUF: exactly llama_cpp.Llama
# ---------------------------------------------------------------------------
def test_plain_gguf_matches_llama(gguf_models):
    from llama_cpp import Llama, LlamaGrammar

    from otter_gguf import OtterLlama

    path = str(gguf_models.base)
    kw = dict(LLAMA_KW, logits_all=True, seed=1234)
    a = Llama(path, **kw)
    b = OtterLlama(path, **kw)
    assert b.chat_format == a.chat_format == "chat_template.default"
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    grammar = 'root ::= [a-z ]+ "."'

    def calls(m):
        out = {}
        out["greedy"] = m(PROMPT, max_tokens=10, temperature=0, logprobs=3)
        out["stop"] = m.create_completion(PROMPT, max_tokens=10, temperature=0, stop=[out["greedy"]["choices"][0]["text"][3:6]])
        out["stream"] = [c["choices"][0]["text"] for c in m(PROMPT, max_tokens=10, temperature=0, stream=True)]
        out["grammar"] = m(PROMPT, max_tokens=12, temperature=0, grammar=LlamaGrammar.from_string(grammar, verbose=False))
        out["seed1"] = m(PROMPT, max_tokens=10, temperature=1.0, seed=7)
        out["seed2"] = m(PROMPT, max_tokens=10, temperature=1.0, seed=7)
        out["chat"] = m.create_chat_completion(msgs, max_tokens=8, temperature=0)
        out["chat_stream"] = list(m.create_chat_completion(msgs, max_tokens=8, temperature=0, stream=True))
        toks = m.tokenize(b"hello world, \xc3\xa9t\xc3\xa9")
        out["tok"] = (toks, m.detokenize(toks))
        m.reset()
        out["after_reset"] = (m.n_tokens, m(PROMPT, max_tokens=6, temperature=0))
        m(PROMPT, max_tokens=4, temperature=0)
        st = m.save_state()
        m("Something else entirely", max_tokens=4, temperature=0)
        m.load_state(st)
        out["state"] = (m.n_tokens, m._input_ids.tolist(), m(PROMPT, max_tokens=6, temperature=0))
        return _strip(out)

    ra, rb = calls(a), calls(b)
    assert ra == rb
    g = rb["greedy"]["choices"][0]
    assert "otter" not in g and g["logprobs"]["token_logprobs"] and rb["seed1"] == rb["seed2"]
    assert rb["grammar"]["choices"][0]["text"].strip() and set(rb["grammar"]["choices"][0]["text"]) <= set("abcdefghijklmnopqrstuvwxyz .")
    assert rb["state"][0] > 0 and rb["chat"]["choices"][0]["message"]["content"]

    ea = Llama(path, embedding=True, **LLAMA_KW).embed("hello world")
    eb = OtterLlama(path, embedding=True, **LLAMA_KW).embed("hello world")
    assert np.array_equal(np.asarray(ea), np.asarray(eb)) and np.asarray(eb).size > 0


def test_lora_same_as_llama(gguf_models):
    from llama_cpp import Llama

    from otter_gguf import OtterLlama

    kw = dict(LLAMA_KW, lora_path=str(gguf_models.lora))
    a = Llama(str(gguf_models.base), **kw)(PROMPT, max_tokens=8, temperature=0)
    b = OtterLlama(str(gguf_models.base), **kw)(PROMPT, max_tokens=8, temperature=0)
    c = OtterLlama(str(gguf_models.base), **LLAMA_KW)(PROMPT, max_tokens=8, temperature=0)
    assert _strip(a) == _strip(b) and a["choices"][0]["text"] != c["choices"][0]["text"]  # the LoRA is applied


def test_plain_gguf_signals_are_a_clear_error(gguf_models):
    from otter_gguf import Guidance, OtterLlama

    llm = OtterLlama(str(gguf_models.base), **LLAMA_KW)
    assert (llm.has_otter, llm.n_out, llm.head_kind, llm.signal_names) == (False, 0, None, [])
    for call in (lambda: llm.score("hello"),
                 lambda: llm.score(tokens=[1, 2]),
                 lambda: llm.signals,
                 lambda: llm.set_otter(True),
                 lambda: llm(PROMPT, max_tokens=2, guidance=Guidance()),
                 lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2,
                                                    guidance={"weight": 1.0})):
        with pytest.raises(ValueError, match="no Otter head"):
            call()
    with pytest.raises(ValueError, match="no Otter head"):
        OtterLlama(str(gguf_models.base), guidance=Guidance(), **LLAMA_KW)


# ---------------------------------------------------------------------------
# the seam, with a deterministic fake source on the plain GGUF (any runtime)
# ---------------------------------------------------------------------------
def test_signals_follow_the_fed_history_fake_source(gguf_models):
    from otter_gguf import OtterLlama

    llm = OtterLlama(str(gguf_models.base), _signal_source=fake_source_factory(), **LLAMA_KW)
    prompt_toks = llm.tokenize(PROMPT.encode())
    r = llm(PROMPT, max_tokens=9, temperature=0)
    o = r["choices"][0]["otter"]
    toks = o["tokens"]
    assert len(toks) == r["usage"]["completion_tokens"] == 9
    want = [fake_signals(prompt_toks + toks[: i + 1]).tolist() for i in range(len(toks))]
    np.testing.assert_allclose(o["signals"], want, rtol=0, atol=1e-7)  # last one needs the extra decode
    assert o["rewards"][0] == dict(zip(["alpha", "beta"], o["signals"][0]))
    _check_offsets(r["choices"][0]["text"], o)
    s = llm.score(tokens=prompt_toks + toks)
    np.testing.assert_allclose(s.signals[len(prompt_toks):], want, atol=1e-7)
    llm.reset()
    chunks = list(llm(PROMPT, max_tokens=9, temperature=0, stream=True))
    st, ss, text = _stream_tokens(chunks)
    assert st == toks and text == r["choices"][0]["text"]
    np.testing.assert_allclose(ss, want, atol=1e-7)


def test_scalar_args_fake_source_picks_logit_plus_w_reward(gguf_models):
    from otter_gguf import Guidance, OtterLlama
    from otter_gguf.runtime.guidance import top_k_ids

    k, w = 4, 2.5
    llm = OtterLlama(str(gguf_models.base), n_seq_max=k + 1, _signal_source=fake_source_factory(), **LLAMA_KW)
    g = Guidance(weight=w, top_k=k, signal={"alpha": 1.0, "beta": -0.5}, trace=True)
    prompt_toks = llm.tokenize(PROMPT.encode())
    gen = llm(PROMPT, max_tokens=6, temperature=0, guidance=g)["choices"][0]["otter"]["tokens"]
    plain = llm(PROMPT, max_tokens=6, temperature=0)["choices"][0]["otter"]["tokens"]
    assert gen != plain  # the guidance changed something
    for i, tok in enumerate(gen):
        prefix = prompt_toks + gen[:i]
        llm.reset()
        llm.eval(prefix)
        logits = _logits_last(llm)
        cands = top_k_ids(logits, k)
        r = np.array([fake_signals(prefix + [int(c)]) @ np.array([1.0, -0.5]) for c in cands])
        assert int(cands[int(np.argmax(logits[cands] + w * r))]) == tok, f"step {i}"
    with pytest.raises(ValueError, match="n_seq_max >= 5"):
        OtterLlama(str(gguf_models.base), _signal_source=fake_source_factory(), **LLAMA_KW)(
            PROMPT, max_tokens=2, guidance=g)


# ---------------------------------------------------------------------------
# the patched runtime
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward3(gguf_models):
    from otter_gguf import OtterLlama

    return OtterLlama(str(gguf_models.otter("reward3")), n_seq_max=5, **LLAMA_KW)


@pytest.fixture(scope="module")
def token_head(gguf_models):
    from otter_gguf import OtterLlama

    return OtterLlama(str(gguf_models.otter("token_reward")), **LLAMA_KW)


def test_completion_rewards_equal_score_and_stream(reward3):
    llm = reward3
    assert (llm.has_otter, llm.n_out, llm.head_kind) == (True, 3, "reward")
    assert llm.signal_names == ["helpfulness", "harmlessness", "honesty"]
    prompt_toks = llm.tokenize(PROMPT.encode())
    llm.reset()
    r = llm(PROMPT, max_tokens=10, temperature=0)
    o = r["choices"][0]["otter"]
    toks = o["tokens"]
    assert len(toks) == r["usage"]["completion_tokens"] == 10
    sig = np.array(o["signals"], dtype=np.float64)  # None would make this an object array
    assert sig.shape == (10, 3) and np.isfinite(sig).all()
    assert np.ptp(sig, axis=0).min() > 0.1  # real, varying per token
    s = llm.score(tokens=prompt_toks + toks)
    assert s.signals.shape == (len(prompt_toks) + 10, 3)
    np.testing.assert_allclose(sig, s.signals[len(prompt_toks):], rtol=1e-3, atol=2e-3)
    assert [list(d.values()) for d in o["rewards"]] == o["signals"]
    # text scoring == token scoring of the same tokens
    s2 = llm.score(PROMPT)
    assert s2.tokens == prompt_toks
    np.testing.assert_allclose(s2.signals, s.signals[: len(prompt_toks)], atol=1e-5)

    llm.reset()
    st, ss, text = _stream_tokens(llm(PROMPT, max_tokens=10, temperature=0, stream=True))
    assert st == toks and ss == o["signals"] and text == r["choices"][0]["text"]

    stop = next(t for t in o["token_texts"][2:] if len(t) >= 2)
    llm.reset()
    r2 = llm(PROMPT, max_tokens=10, temperature=0, stop=[stop])
    llm.reset()
    st2, ss2, text2 = _stream_tokens(llm(PROMPT, max_tokens=10, temperature=0, stop=[stop], stream=True))
    assert r2["choices"][0]["finish_reason"] == "stop" and text2 == r2["choices"][0]["text"]
    assert st2 == r2["choices"][0]["otter"]["tokens"] == toks[: len(st2)] and ss2 == o["signals"][: len(st2)]


def test_token_reward_head_completion(token_head, gguf_models):
    from otter_gguf import OtterLlama

    llm = token_head
    assert (llm.head_kind, llm.n_out, llm.signal_names) == ("token_reward", llm.n_vocab(), [])
    prompt_toks = llm.tokenize(PROMPT.encode())
    llm.reset()
    o = llm(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]
    assert o["signals"] is None and len(o["token_rewards"]) == 8
    s = llm.score(tokens=prompt_toks + o["tokens"])
    np.testing.assert_allclose(o["token_rewards"], s.token_rewards[len(prompt_toks):], rtol=1e-3, atol=2e-3)
    full = OtterLlama(str(gguf_models.otter("token_reward")), otter_full_signals=True, **LLAMA_KW)
    of = full(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]
    assert of["tokens"] == o["tokens"] and len(of["signals"]) == 8 and len(of["signals"][0]) == llm.n_vocab()
    np.testing.assert_allclose(of["signals"], s.signals[len(prompt_toks):], rtol=1e-3, atol=2e-3)


def test_chat_completion_carries_signals(reward3):
    llm = reward3
    msgs = [{"role": "user", "content": "hello there"}]
    llm.reset()
    r = llm.create_chat_completion(msgs, max_tokens=7, temperature=0)
    o = r["choices"][0]["otter"]
    assert len(o["tokens"]) == r["usage"]["completion_tokens"] and all(x is not None for x in o["signals"])
    _check_offsets(r["choices"][0]["message"]["content"], o)
    llm.reset()
    chunks = list(llm.create_chat_completion(msgs, max_tokens=7, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    toks = [t for c in chunks[1:] for t in c["choices"][0]["otter"]["tokens"]]
    sigs = [x for c in chunks[1:] for x in c["choices"][0]["otter"]["signals"]]
    assert toks == o["tokens"] and sigs == o["signals"]


def test_token_head_args_and_dexperts_pick_logit_plus_w_signal(token_head):
    from otter_gguf import Guidance
    from otter_gguf.runtime.guidance import top_k_ids

    llm = token_head
    prompt_toks = llm.tokenize(PROMPT.encode())
    k, w = 5, 4.0
    llm.reset()
    greedy = llm(PROMPT, max_tokens=6, temperature=0)["choices"][0]["otter"]["tokens"]
    for mode in ("args", "dexperts"):
        llm.reset()
        o = llm(PROMPT, max_tokens=6, temperature=0,
                guidance=Guidance(weight=w, top_k=k, mode=mode, trace=True))["choices"][0]["otter"]
        gen = o["tokens"]
        assert gen != greedy, mode
        checked = 0
        for i, tok in enumerate(gen):
            prefix = prompt_toks + gen[:i]
            sig = llm.score(tokens=prefix).signals[-1].astype(np.float64)
            logits = _logits_last(llm).astype(np.float64)  # score() leaves the last row's logits live
            if mode == "args":
                cands = top_k_ids(logits, k)
                sc = logits[cands] + w * sig[cands]
                assert o["guidance"][i]["candidates"] == cands.tolist() and o["guidance"][i]["chosen"] == tok
            else:
                cands = np.arange(len(logits))
                sc = logits + w * sig
            top2 = np.sort(sc)[-2:]
            if top2[1] - top2[0] > 1e-2:
                assert int(cands[int(np.argmax(sc))]) == tok, f"{mode} step {i}"
                checked += 1
        assert checked >= 4


def test_scalar_args_one_batched_decode_per_step_equals_one_by_one(reward3):
    from otter_gguf import Guidance
    from otter_gguf.runtime.guidance import top_k_ids

    llm = reward3
    k, w = 4, 3.0
    coef = np.array([0.5, 0.0, 1.0])
    g = Guidance(weight=w, top_k=k, signal={"helpfulness": 0.5, "honesty": 1.0}, trace=True)
    prompt_toks = llm.tokenize(PROMPT.encode())
    llm.reset()
    n_decodes = []
    real_decode = llm._ctx.decode
    llm._ctx.decode = lambda batch: (n_decodes.append(batch.batch.n_tokens), real_decode(batch))[1]
    try:
        o = llm(PROMPT, max_tokens=6, temperature=0, guidance=g)["choices"][0]["otter"]
    finally:
        del llm._ctx.decode
    gen, trace = o["tokens"], o["guidance"]
    # the prompt, then exactly one decode of k candidate tokens per generated token
    assert n_decodes == [len(prompt_toks)] + [k] * len(gen)
    llm.reset()
    greedy = llm(PROMPT, max_tokens=6, temperature=0)["choices"][0]["otter"]["tokens"]
    assert gen != greedy
    for i, tok in enumerate(gen):
        prefix = prompt_toks + gen[:i]
        llm.score(tokens=prefix)
        logits = _logits_last(llm).astype(np.float64)
        cands = top_k_ids(logits, k)
        assert trace[i]["candidates"] == cands.tolist() and trace[i]["chosen"] == tok
        one_by_one = np.array([llm.score(tokens=prefix + [int(c)]).signals[-1] @ coef for c in cands])
        np.testing.assert_allclose(trace[i]["rewards"], one_by_one, rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(trace[i]["logits"], logits[cands], rtol=1e-4, atol=1e-3)
        sc = logits[cands] + w * one_by_one
        top2 = np.sort(sc)[-2:]
        if top2[1] - top2[0] > 1e-2:
            assert int(cands[int(np.argmax(sc))]) == tok, f"step {i}"
        # the chosen candidate's signals are the completion's signals
        np.testing.assert_allclose(np.array(o["signals"][i]) @ coef, trace[i]["rewards"][trace[i]["candidates"].index(tok)],
                                   atol=1e-5)


def test_weight_zero_is_greedy_and_seeds_reproduce(reward3, token_head):
    from otter_gguf import Guidance

    for llm, sig in ((reward3, "honesty"), (token_head, None)):
        llm.reset()
        greedy = llm(PROMPT, max_tokens=10, temperature=0)["choices"][0]["text"]
        llm.reset()
        g0 = llm(PROMPT, max_tokens=10, temperature=0, guidance=Guidance(weight=0.0, top_k=4, signal=sig))
        assert g0["choices"][0]["text"] == greedy
        g = Guidance(weight=2.0, top_k=4, signal=sig)
        texts = [llm(PROMPT, max_tokens=10, temperature=0.9, seed=s, guidance=g)["choices"][0]["text"]
                 for s in (11, 11, 12, 13)]
        assert texts[0] == texts[1]
        assert len(set(texts)) > 1  # the seed matters


def test_otter_off_state_and_bad_use(reward3, gguf_models):
    from llama_cpp import Llama

    from otter_gguf import Guidance, OtterLlama

    path = str(gguf_models.otter("reward3"))
    off = OtterLlama(path, otter=False, **LLAMA_KW)
    r_off = off(PROMPT, max_tokens=8, temperature=0)
    assert "otter" not in r_off["choices"][0] and not off.otter_enabled
    with pytest.raises(ValueError, match="turned off"):
        off.score("hello")
    reward3.reset()
    r_on = reward3(PROMPT, max_tokens=8, temperature=0)
    plain = Llama(path, **LLAMA_KW)(PROMPT, max_tokens=8, temperature=0)
    assert r_off["choices"][0]["text"] == r_on["choices"][0]["text"] == plain["choices"][0]["text"]
    # LoRA on an Otter GGUF: same text as llama_cpp.Llama with the LoRA, signals alongside
    lora = OtterLlama(path, lora_path=str(gguf_models.lora), **LLAMA_KW)(PROMPT, max_tokens=6, temperature=0)
    plain_lora = Llama(path, lora_path=str(gguf_models.lora), **LLAMA_KW)(PROMPT, max_tokens=6, temperature=0)
    assert lora["choices"][0]["text"] == plain_lora["choices"][0]["text"] != r_on["choices"][0]["text"][: len(lora["choices"][0]["text"])]
    assert len(lora["choices"][0]["otter"]["signals"]) == lora["usage"]["completion_tokens"] >= 6
    off.set_otter(True)
    assert off(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]["tokens"] == \
        r_on["choices"][0]["otter"]["tokens"]

    # save/load_state carries the signals
    st = reward3.save_state()
    saved = reward3.signals.copy()
    reward3("Something else", max_tokens=3, temperature=0)
    reward3.load_state(st)
    np.testing.assert_array_equal(reward3.signals, saved)

    with pytest.raises(ValueError, match="unknown signal name 'nope'"):
        reward3(PROMPT, max_tokens=2, guidance={"signal": "nope"})
    with pytest.raises(ValueError, match="3 signals"):
        reward3(PROMPT, max_tokens=2, guidance=Guidance())
    with pytest.raises(ValueError, match="n_seq_max >= 9"):
        reward3(PROMPT, max_tokens=2, guidance=Guidance(top_k=8, signal="honesty"))
    with pytest.raises(ValueError, match="finite"):
        reward3(PROMPT, max_tokens=2, guidance={"weight": math.inf, "signal": "honesty"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        reward3.score(tokens=[1, reward3.n_vocab()])
    with pytest.raises(ValueError, match="exactly one"):
        reward3.score()
