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


def _guidance(**kw):
    from otter_gguf import Guidance

    return Guidance(**kw)


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
BAD_GUIDANCE = [
    *[(f"weight={w!r}", dict(weight=w), "weight") for w in (float("nan"), float("inf"), -float("inf"), "1", None, True)],
    *[(f"top_k={k!r}", dict(top_k=k), "top_k") for k in (0, -3, 1.5, True, "4")],
    ("mode=greedy", dict(mode="greedy"), "mode"),
    ("signal-nan", dict(signal={"a": float("nan")}), "finite"),
    ("signal-empty", dict(signal={}), "empty"),
]


@pytest.mark.unit
@pytest.mark.parametrize("kw,match", [c[1:] for c in BAD_GUIDANCE], ids=[c[0] for c in BAD_GUIDANCE])
def test_guidance_rejects_bad_setting(kw, match):
    from otter_gguf.runtime.guidance import Guidance

    with pytest.raises(ValueError, match=match):
        Guidance(**kw)


@pytest.mark.unit
def test_guidance_coerce_rejects_unknown_option():
    from otter_gguf.runtime.guidance import Guidance

    with pytest.raises(ValueError, match="unknown guidance option"):
        Guidance.coerce({"weight": 1.0, "topk": 3})


@pytest.mark.unit
def test_guidance_coerce_and_resolve_signal_coefficients():
    from otter_gguf.runtime.guidance import Guidance

    g = Guidance.coerce({"weight": 2, "top_k": 3, "signal": {"b": 1, "a": 0.5}})
    assert g.weight == 2.0 and g.top_k == 3
    r = g.resolve(head_kind="reward", n_out=2, signal_names=["a", "b"], n_vocab=10)
    np.testing.assert_array_equal(r.coef, [0.5, 1.0])
    np.testing.assert_allclose(r.reward(np.array([[2.0, 3.0]])), [4.0])


BAD_RESOLVE = [
    # (id, Guidance kwargs, head kind, n_out, signal names, error)
    ("unknown-signal-name", dict(signal="c"), "reward", 2, ["a", "b"], "unknown signal name 'c'"),
    ("no-signal-for-2-signals", dict(), "reward", 2, ["a", "b"], "2 signals"),
    ("dexperts-on-reward-head", dict(mode="dexperts"), "reward", 1, ["r"], "token_reward"),
    ("signal-on-token-head", dict(signal="r"), "token_reward", 10, [], "leave signal unset"),
]


@pytest.mark.unit
@pytest.mark.parametrize("kw,head_kind,n_out,names,match", [c[1:] for c in BAD_RESOLVE],
                         ids=[c[0] for c in BAD_RESOLVE])
def test_guidance_resolve_rejects_mismatch_with_the_head(kw, head_kind, n_out, names, match):
    from otter_gguf.runtime.guidance import Guidance

    with pytest.raises(ValueError, match=match):
        Guidance(**kw).resolve(head_kind=head_kind, n_out=n_out, signal_names=names, n_vocab=10)


SEL_LOGITS = np.array([1.0, 3.0, 3.0, -np.inf, 2.0, 0.5], dtype=np.float32)
SEL_SIGNALS = np.array([0.0, -1.0, 0.0, 9.0, 0.9, 5.0], dtype=np.float32)


@pytest.mark.unit
def test_top_k_ids_ties_to_lower_id_never_neg_inf():
    from otter_gguf.runtime.guidance import top_k_ids

    assert top_k_ids(SEL_LOGITS, 3).tolist() == [1, 2, 4]  # ties to the lower id, -inf never
    assert top_k_ids(SEL_LOGITS, 10).tolist() == [1, 2, 4, 0, 5]


@pytest.mark.unit
def test_top_k_ids_equals_the_full_sort_with_ties_at_the_cut():
    """top_k_ids orders only the values at or above the k-th largest (a partition first): the same ids, in the
    same order, as sorting every finite logit by (value desc, id asc), ties at the k-th value included."""
    from otter_gguf.runtime.guidance import top_k_ids

    def full_sort(x, k):
        finite = np.flatnonzero(np.isfinite(x))
        return finite[np.lexsort((finite, -x[finite].astype(np.float64)))[:k]].tolist()

    rng = np.random.default_rng(7)
    for _ in range(2000):
        n, k = int(rng.integers(1, 50)), int(rng.integers(1, 12))
        x = rng.integers(-3, 3, size=n).astype(np.float32)  # few values: ties at the cut are the rule
        x[rng.random(n) < 0.2] = -np.inf
        x[rng.random(n) < 0.05] = np.nan
        assert top_k_ids(x, k).tolist() == full_sort(x, k), (x.tolist(), k)
    x = rng.normal(size=49152).astype(np.float32)
    assert top_k_ids(x, 10).tolist() == full_sort(x, 10)


@pytest.mark.unit
def test_token_args_logits_scores_top_k_and_masks_the_rest():
    from otter_gguf.runtime.guidance import token_args_logits

    trace = []
    out = token_args_logits(SEL_LOGITS, SEL_SIGNALS, 2.0, 3, trace=trace)
    # candidates 1, 2, 4 score 1.0, 3.0, 3.8; everything else is masked
    np.testing.assert_allclose(out[[1, 2, 4]], [1.0, 3.0, 3.8], rtol=1e-6)
    assert np.isneginf(out[[0, 3, 5]]).all() and int(np.argmax(out)) == 4
    assert trace[0]["candidates"] == [1, 2, 4]


@pytest.mark.unit
def test_dexperts_logits_add_w_signal():
    from otter_gguf.runtime.guidance import dexperts_logits

    np.testing.assert_allclose(dexperts_logits(SEL_LOGITS[:3], SEL_SIGNALS[:3], 2.0), [1.0, 1.0, 3.0])


@pytest.mark.unit
def test_args_pick_greedy_ties_to_lower_id():
    from otter_gguf.runtime.guidance import args_pick

    assert args_pick(np.array([1.0, 5.0, 5.0]), 0.0, None) == 1


@pytest.mark.unit
def test_args_pick_sampling_follows_the_rng():
    from otter_gguf.runtime.guidance import args_pick

    draws = [args_pick(np.array([0.0, 1.0, 2.0]), 1.0, np.random.default_rng(5)) for _ in range(3)]
    assert draws == [args_pick(np.array([0.0, 1.0, 2.0]), 1.0, np.random.default_rng(5)) for _ in range(3)]


def _sparse_token_store():
    """A sparse token-head store after rows 3 and 4 (token 2 fed at 4)."""
    from otter_gguf.runtime.llama import _SignalStore

    st = _SignalStore(16, 4, token_head=True, dense=False)
    st.put(3, np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32))
    st.note_token(4, 2)
    st.put(4, np.array([4.0, 5.0, 6.0, 7.0], dtype=np.float32))
    return st


def test_signal_store_sparse_keeps_only_the_latest_row():
    st = _sparse_token_store()
    assert st.get(3) is None and st.get(4) is not None  # only the latest row is kept
    assert st.token_reward(4) == 2.0


def test_signal_store_sparse_keeps_rows_from_keep_from():
    st = _sparse_token_store()
    st.keep_from = 4
    st.note_token(5, 1)
    st.put(5, np.zeros(4, dtype=np.float32))
    assert st.get(4) is not None and st.token_reward(5) == 5.0


def test_signal_store_truncate_drops_later_rows():
    st = _sparse_token_store()
    st.keep_from = 4
    st.note_token(5, 1)
    st.put(5, np.zeros(4, dtype=np.float32))
    st.truncate(5)
    assert st.get(5) is None and st.token_reward(5) is None and st.get(4) is not None


# ---------------------------------------------------------------------------
# plain GGUF: exactly llama_cpp.Llama
# ---------------------------------------------------------------------------
# the same sequence of calls on llama_cpp.Llama and OtterLlama; each result is compared by name
PLAIN_CALLS = ("greedy", "stop", "stream", "grammar", "seed1", "seed2", "chat", "chat_stream", "tok",
               "after_reset", "state")
PLAIN_GRAMMAR = 'root ::= [a-z ]+ "."'


def _plain_calls(m):
    from llama_cpp import LlamaGrammar

    msgs = [{"role": "user", "content": "the quick brown fox"}]
    out = {}
    out["greedy"] = m(PROMPT, max_tokens=10, temperature=0, logprobs=3)
    out["stop"] = m.create_completion(PROMPT, max_tokens=10, temperature=0, stop=[out["greedy"]["choices"][0]["text"][3:6]])
    out["stream"] = [c["choices"][0]["text"] for c in m(PROMPT, max_tokens=10, temperature=0, stream=True)]
    out["grammar"] = m(PROMPT, max_tokens=12, temperature=0, grammar=LlamaGrammar.from_string(PLAIN_GRAMMAR, verbose=False))
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
    assert tuple(out) == PLAIN_CALLS
    return _strip(out)


@pytest.fixture(scope="module")
def plain_pair(gguf_models):
    """(llama_cpp.Llama, OtterLlama) on the plain GGUF with the same settings."""
    from llama_cpp import Llama

    from otter_gguf import OtterLlama

    path = str(gguf_models.base)
    kw = dict(LLAMA_KW, logits_all=True, seed=1234)
    return Llama(path, **kw), OtterLlama(path, **kw)


@pytest.fixture(scope="module")
def plain_results(plain_pair):
    """The results of _plain_calls on llama_cpp.Llama and on OtterLlama."""
    a, b = plain_pair
    return _plain_calls(a), _plain_calls(b)


def test_plain_gguf_chat_format_is_the_models_template(plain_pair):
    a, b = plain_pair
    assert b.chat_format == a.chat_format == "chat_template.default"


@pytest.mark.parametrize("call", PLAIN_CALLS)
def test_plain_gguf_matches_llama(call, plain_results):
    ra, rb = plain_results
    assert ra[call] == rb[call]


def test_plain_gguf_completion_has_logprobs_and_no_otter(plain_results):
    g = plain_results[1]["greedy"]["choices"][0]
    assert "otter" not in g and g["logprobs"]["token_logprobs"]


def test_plain_gguf_seed_reproduces(plain_results):
    rb = plain_results[1]
    assert rb["seed1"] == rb["seed2"]


def test_plain_gguf_grammar_constrains_the_text(plain_results):
    text = plain_results[1]["grammar"]["choices"][0]["text"]
    assert text.strip() and set(text) <= set("abcdefghijklmnopqrstuvwxyz .")


def test_plain_gguf_load_state_and_chat_are_not_empty(plain_results):
    rb = plain_results[1]
    assert rb["state"][0] > 0 and rb["chat"]["choices"][0]["message"]["content"]


def test_plain_gguf_embedding_matches_llama(gguf_models):
    from llama_cpp import Llama

    from otter_gguf import OtterLlama

    path = str(gguf_models.base)
    ea = Llama(path, embedding=True, **LLAMA_KW).embed("hello world")
    eb = OtterLlama(path, embedding=True, **LLAMA_KW).embed("hello world")
    assert np.array_equal(np.asarray(ea), np.asarray(eb)) and np.asarray(eb).size > 0


@pytest.fixture(scope="module")
def lora_texts(gguf_models):
    """Greedy completions of the plain GGUF: Llama + LoRA, OtterLlama + LoRA, OtterLlama without."""
    from llama_cpp import Llama

    from otter_gguf import OtterLlama

    kw = dict(LLAMA_KW, lora_path=str(gguf_models.lora))
    a = Llama(str(gguf_models.base), **kw)(PROMPT, max_tokens=8, temperature=0)
    b = OtterLlama(str(gguf_models.base), **kw)(PROMPT, max_tokens=8, temperature=0)
    c = OtterLlama(str(gguf_models.base), **LLAMA_KW)(PROMPT, max_tokens=8, temperature=0)
    return a, b, c


def test_lora_same_as_llama(lora_texts):
    a, b, _ = lora_texts
    assert _strip(a) == _strip(b)


def test_lora_is_applied(lora_texts):
    _, b, c = lora_texts
    assert b["choices"][0]["text"] != c["choices"][0]["text"]


@pytest.fixture(scope="module")
def plain_otter(gguf_models):
    from otter_gguf import OtterLlama

    return OtterLlama(str(gguf_models.base), **LLAMA_KW)


def test_plain_gguf_has_no_head(plain_otter):
    llm = plain_otter
    assert (llm.has_otter, llm.n_out, llm.head_kind, llm.signal_names) == (False, 0, None, [])


def _construct_with_guidance(llm):
    from otter_gguf import OtterLlama

    return OtterLlama(llm.model_path, guidance=_guidance(), **LLAMA_KW)


NO_HEAD_USES = {
    "score-text": lambda llm: llm.score("hello"),
    "score-tokens": lambda llm: llm.score(tokens=[1, 2]),
    "signals": lambda llm: llm.signals,
    "set_otter": lambda llm: llm.set_otter(True),
    "completion-guidance": lambda llm: llm(PROMPT, max_tokens=2, guidance=_guidance()),
    "chat-guidance": lambda llm: llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2,
                                                            guidance={"weight": 1.0}),
    "constructor-guidance": _construct_with_guidance,
}


@pytest.mark.parametrize("use", NO_HEAD_USES)
def test_plain_gguf_otter_use_is_a_clear_error(use, plain_otter):
    with pytest.raises(ValueError, match="no Otter head"):
        NO_HEAD_USES[use](plain_otter)


# ---------------------------------------------------------------------------
# the seam, with a deterministic fake source on the plain GGUF (any runtime)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake(gguf_models):
    """OtterLlama with the fake signal source on the plain GGUF, a greedy completion of
    9 tokens and the fake signals of each generated token's history."""
    from otter_gguf import OtterLlama

    llm = OtterLlama(str(gguf_models.base), _signal_source=fake_source_factory(), **LLAMA_KW)
    prompt_toks = llm.tokenize(PROMPT.encode())
    r = llm(PROMPT, max_tokens=9, temperature=0)
    toks = r["choices"][0]["otter"]["tokens"]
    want = [fake_signals(prompt_toks + toks[: i + 1]).tolist() for i in range(len(toks))]
    return dict(llm=llm, prompt_toks=prompt_toks, r=r, o=r["choices"][0]["otter"], toks=toks, want=want)


def test_signals_follow_the_fed_history_fake_source(fake):
    o = fake["o"]
    assert len(fake["toks"]) == fake["r"]["usage"]["completion_tokens"] == 9
    np.testing.assert_allclose(o["signals"], fake["want"], rtol=0, atol=1e-7)  # last one needs the extra decode


def test_rewards_name_the_signals_fake_source(fake):
    o = fake["o"]
    assert o["rewards"][0] == dict(zip(["alpha", "beta"], o["signals"][0]))


def test_token_offsets_fake_source(fake):
    _check_offsets(fake["r"]["choices"][0]["text"], fake["o"])


def test_score_equals_completion_signals_fake_source(fake):
    s = fake["llm"].score(tokens=fake["prompt_toks"] + fake["toks"])
    np.testing.assert_allclose(s.signals[len(fake["prompt_toks"]):], fake["want"], atol=1e-7)


def test_stream_equals_completion_fake_source(fake):
    llm = fake["llm"]
    llm.reset()
    chunks = list(llm(PROMPT, max_tokens=9, temperature=0, stream=True))
    st, ss, text = _stream_tokens(chunks)
    assert st == fake["toks"] and text == fake["r"]["choices"][0]["text"]
    np.testing.assert_allclose(ss, fake["want"], atol=1e-7)


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


def test_scalar_args_needs_n_seq_max_above_top_k(gguf_models):
    from otter_gguf import Guidance, OtterLlama

    g = Guidance(weight=2.5, top_k=4, signal={"alpha": 1.0, "beta": -0.5}, trace=True)
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


@pytest.fixture(scope="module")
def reward3_run(reward3):
    """A greedy 10-token completion of the reward3 GGUF and score() of its tokens."""
    llm = reward3
    prompt_toks = llm.tokenize(PROMPT.encode())
    llm.reset()
    r = llm(PROMPT, max_tokens=10, temperature=0)
    o = r["choices"][0]["otter"]
    s = llm.score(tokens=prompt_toks + o["tokens"])
    return dict(prompt_toks=prompt_toks, r=r, o=o, toks=o["tokens"], s=s)


def test_reward3_head_properties(reward3):
    llm = reward3
    assert (llm.has_otter, llm.n_out, llm.head_kind) == (True, 3, "reward")
    assert llm.signal_names == ["helpfulness", "harmlessness", "honesty"]


def test_completion_signals_per_token(reward3_run):
    r, toks = reward3_run["r"], reward3_run["toks"]
    assert len(toks) == r["usage"]["completion_tokens"] == 10
    sig = np.array(reward3_run["o"]["signals"], dtype=np.float64)  # None would make this an object array
    assert sig.shape == (10, 3) and np.isfinite(sig).all()
    assert np.ptp(sig, axis=0).min() > 0.1  # real, varying per token


def test_completion_signals_equal_score(reward3_run):
    n = len(reward3_run["prompt_toks"])
    s = reward3_run["s"]
    assert s.signals.shape == (n + 10, 3)
    sig = np.array(reward3_run["o"]["signals"], dtype=np.float64)
    np.testing.assert_allclose(sig, s.signals[n:], rtol=1e-3, atol=2e-3)


def test_completion_rewards_name_the_signals(reward3_run):
    o = reward3_run["o"]
    assert [list(d.values()) for d in o["rewards"]] == o["signals"]


def test_score_text_equals_score_tokens(reward3, reward3_run):
    prompt_toks = reward3_run["prompt_toks"]
    s2 = reward3.score(PROMPT)
    assert s2.tokens == prompt_toks
    np.testing.assert_allclose(s2.signals, reward3_run["s"].signals[: len(prompt_toks)], atol=1e-5)


def test_completion_stream_equals_completion(reward3, reward3_run):
    o = reward3_run["o"]
    reward3.reset()
    st, ss, text = _stream_tokens(reward3(PROMPT, max_tokens=10, temperature=0, stream=True))
    assert st == reward3_run["toks"] and ss == o["signals"] and text == reward3_run["r"]["choices"][0]["text"]


def test_completion_stop_stream_equals_completion(reward3, reward3_run):
    llm, o, toks = reward3, reward3_run["o"], reward3_run["toks"]
    stop = next(t for t in o["token_texts"][2:] if len(t) >= 2)
    llm.reset()
    r2 = llm(PROMPT, max_tokens=10, temperature=0, stop=[stop])
    llm.reset()
    st2, ss2, text2 = _stream_tokens(llm(PROMPT, max_tokens=10, temperature=0, stop=[stop], stream=True))
    assert r2["choices"][0]["finish_reason"] == "stop" and text2 == r2["choices"][0]["text"]
    assert st2 == r2["choices"][0]["otter"]["tokens"] == toks[: len(st2)] and ss2 == o["signals"][: len(st2)]


@pytest.fixture(scope="module")
def token_run(token_head):
    """A greedy 8-token completion of the token_reward GGUF and score() of its tokens."""
    llm = token_head
    prompt_toks = llm.tokenize(PROMPT.encode())
    llm.reset()
    o = llm(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]
    return dict(prompt_toks=prompt_toks, o=o, s=llm.score(tokens=prompt_toks + o["tokens"]))


def test_token_reward_head_properties(token_head):
    llm = token_head
    assert (llm.head_kind, llm.n_out, llm.signal_names) == ("token_reward", llm.n_vocab(), [])


def test_token_reward_head_completion_token_rewards_equal_score(token_run):
    o, s, n = token_run["o"], token_run["s"], len(token_run["prompt_toks"])
    assert o["signals"] is None and len(o["token_rewards"]) == 8
    np.testing.assert_allclose(o["token_rewards"], s.token_rewards[n:], rtol=1e-3, atol=2e-3)


def test_token_reward_head_full_signals_equal_score(token_head, token_run, gguf_models):
    from otter_gguf import OtterLlama

    o, s, n = token_run["o"], token_run["s"], len(token_run["prompt_toks"])
    full = OtterLlama(str(gguf_models.otter("token_reward")), otter_full_signals=True, **LLAMA_KW)
    of = full(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]
    assert of["tokens"] == o["tokens"] and len(of["signals"]) == 8 and len(of["signals"][0]) == token_head.n_vocab()
    np.testing.assert_allclose(of["signals"], s.signals[n:], rtol=1e-3, atol=2e-3)


CHAT_MSGS = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def chat_run(reward3):
    reward3.reset()
    r = reward3.create_chat_completion(CHAT_MSGS, max_tokens=7, temperature=0)
    return r, r["choices"][0]["otter"]


def test_chat_completion_carries_signals(chat_run):
    r, o = chat_run
    assert len(o["tokens"]) == r["usage"]["completion_tokens"] and all(x is not None for x in o["signals"])


def test_chat_completion_token_offsets(chat_run):
    r, o = chat_run
    _check_offsets(r["choices"][0]["message"]["content"], o)


def test_chat_stream_equals_chat_completion(reward3, chat_run):
    _, o = chat_run
    reward3.reset()
    chunks = list(reward3.create_chat_completion(CHAT_MSGS, max_tokens=7, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    toks = [t for c in chunks[1:] for t in c["choices"][0]["otter"]["tokens"]]
    sigs = [x for c in chunks[1:] for x in c["choices"][0]["otter"]["signals"]]
    assert toks == o["tokens"] and sigs == o["signals"]


@pytest.mark.parametrize("mode", ["args", "dexperts"])
def test_token_head_guidance_picks_logit_plus_w_signal(mode, token_head):
    from otter_gguf import Guidance
    from otter_gguf.runtime.guidance import top_k_ids

    llm = token_head
    prompt_toks = llm.tokenize(PROMPT.encode())
    k, w = 5, 4.0
    llm.reset()
    greedy = llm(PROMPT, max_tokens=6, temperature=0)["choices"][0]["otter"]["tokens"]
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


SCALAR_K, SCALAR_W = 4, 3.0
SCALAR_COEF = np.array([0.5, 0.0, 1.0])


@pytest.fixture(scope="module")
def scalar_args(reward3):
    """Scalar-head ARGS on reward3 (decodes counted), and per generated step the
    prefix's logits, its top-k candidates and each candidate's reward scored one by one."""
    from otter_gguf import Guidance
    from otter_gguf.runtime.guidance import top_k_ids

    llm = reward3
    g = Guidance(weight=SCALAR_W, top_k=SCALAR_K, signal={"helpfulness": 0.5, "honesty": 1.0}, trace=True)
    prompt_toks = llm.tokenize(PROMPT.encode())
    llm.reset()
    n_decodes = []
    real_decode = llm._ctx.decode
    llm._ctx.decode = lambda batch: (n_decodes.append(batch.batch.n_tokens), real_decode(batch))[1]
    try:
        o = llm(PROMPT, max_tokens=6, temperature=0, guidance=g)["choices"][0]["otter"]
    finally:
        del llm._ctx.decode
    steps = []
    for i in range(len(o["tokens"])):
        prefix = prompt_toks + o["tokens"][:i]
        llm.score(tokens=prefix)
        logits = _logits_last(llm).astype(np.float64)
        cands = top_k_ids(logits, SCALAR_K)
        one_by_one = np.array([llm.score(tokens=prefix + [int(c)]).signals[-1] @ SCALAR_COEF for c in cands])
        steps.append(dict(logits=logits, cands=cands, one_by_one=one_by_one))
    return dict(prompt_toks=prompt_toks, o=o, gen=o["tokens"], trace=o["guidance"], n_decodes=n_decodes,
                steps=steps)


def test_scalar_args_one_batched_decode_per_step(scalar_args):
    # the prompt, then exactly one decode of k candidate tokens per generated token
    assert scalar_args["n_decodes"] == [len(scalar_args["prompt_toks"])] + [SCALAR_K] * len(scalar_args["gen"])


def test_scalar_args_changes_the_greedy_text(reward3, scalar_args):
    reward3.reset()
    greedy = reward3(PROMPT, max_tokens=6, temperature=0)["choices"][0]["otter"]["tokens"]
    assert scalar_args["gen"] != greedy


def test_scalar_args_candidates_are_the_top_k(scalar_args):
    for i, (tok, step) in enumerate(zip(scalar_args["gen"], scalar_args["steps"])):
        t = scalar_args["trace"][i]
        assert t["candidates"] == step["cands"].tolist() and t["chosen"] == tok, f"step {i}"


def test_scalar_args_batched_rewards_equal_one_by_one(scalar_args):
    for i, step in enumerate(scalar_args["steps"]):
        t = scalar_args["trace"][i]
        np.testing.assert_allclose(t["rewards"], step["one_by_one"], rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(t["logits"], step["logits"][step["cands"]], rtol=1e-4, atol=1e-3)


def test_scalar_args_picks_logit_plus_w_reward(scalar_args):
    for i, (tok, step) in enumerate(zip(scalar_args["gen"], scalar_args["steps"])):
        cands = step["cands"]
        sc = step["logits"][cands] + SCALAR_W * step["one_by_one"]
        top2 = np.sort(sc)[-2:]
        if top2[1] - top2[0] > 1e-2:
            assert int(cands[int(np.argmax(sc))]) == tok, f"step {i}"


def test_scalar_args_completion_signals_are_the_chosen_candidates(scalar_args):
    o, trace = scalar_args["o"], scalar_args["trace"]
    for i, tok in enumerate(scalar_args["gen"]):
        # the chosen candidate's signals are the completion's signals
        np.testing.assert_allclose(np.array(o["signals"][i]) @ SCALAR_COEF,
                                   trace[i]["rewards"][trace[i]["candidates"].index(tok)], atol=1e-5)


@pytest.fixture(scope="module", params=[("reward3", "honesty"), ("token_head", None)], ids=["reward3", "token_head"])
def guided_texts(request):
    """Per head: the greedy text, the text with weight-0 guidance, and guided samples for seeds 11, 11, 12, 13."""
    from otter_gguf import Guidance

    name, sig = request.param
    llm = request.getfixturevalue(name)
    llm.reset()
    greedy = llm(PROMPT, max_tokens=10, temperature=0)["choices"][0]["text"]
    llm.reset()
    g0 = llm(PROMPT, max_tokens=10, temperature=0, guidance=Guidance(weight=0.0, top_k=4, signal=sig))
    g = Guidance(weight=2.0, top_k=4, signal=sig)
    texts = [llm(PROMPT, max_tokens=10, temperature=0.9, seed=s, guidance=g)["choices"][0]["text"]
             for s in (11, 11, 12, 13)]
    return dict(greedy=greedy, g0=g0["choices"][0]["text"], texts=texts)


def test_weight_zero_guidance_is_greedy(guided_texts):
    assert guided_texts["g0"] == guided_texts["greedy"]


def test_guided_sampling_seed_reproduces(guided_texts):
    texts = guided_texts["texts"]
    assert texts[0] == texts[1]


def test_guided_sampling_seed_matters(guided_texts):
    assert len(set(guided_texts["texts"])) > 1  # the seed matters


@pytest.fixture(scope="module")
def reward3_on_text(reward3):
    """reward3's greedy 8-token completion (Otter on)."""
    reward3.reset()
    return reward3(PROMPT, max_tokens=8, temperature=0)


def _otter_off(gguf_models):
    from otter_gguf import OtterLlama

    return OtterLlama(str(gguf_models.otter("reward3")), otter=False, **LLAMA_KW)


@pytest.fixture(scope="module")
def otter_off(gguf_models):
    return _otter_off(gguf_models)


def test_otter_off_completion_has_no_signals(otter_off):
    r_off = otter_off(PROMPT, max_tokens=8, temperature=0)
    assert "otter" not in r_off["choices"][0] and not otter_off.otter_enabled


def test_otter_off_score_is_an_error(otter_off):
    with pytest.raises(ValueError, match="turned off"):
        otter_off.score("hello")


def test_otter_off_on_and_llama_give_the_same_text(otter_off, reward3_on_text, gguf_models):
    from llama_cpp import Llama

    r_off = otter_off(PROMPT, max_tokens=8, temperature=0)
    plain = Llama(str(gguf_models.otter("reward3")), **LLAMA_KW)(PROMPT, max_tokens=8, temperature=0)
    assert r_off["choices"][0]["text"] == reward3_on_text["choices"][0]["text"] == plain["choices"][0]["text"]


def test_set_otter_turns_the_signals_on(reward3_on_text, gguf_models):
    off = _otter_off(gguf_models)
    off.set_otter(True)
    assert off(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]["tokens"] == \
        reward3_on_text["choices"][0]["otter"]["tokens"]


@pytest.fixture(scope="module")
def otter_lora(gguf_models):
    """LoRA on an Otter GGUF: OtterLlama's and llama_cpp.Llama's greedy completions."""
    from llama_cpp import Llama

    from otter_gguf import OtterLlama

    path, lora = str(gguf_models.otter("reward3")), str(gguf_models.lora)
    return (OtterLlama(path, lora_path=lora, **LLAMA_KW)(PROMPT, max_tokens=6, temperature=0),
            Llama(path, lora_path=lora, **LLAMA_KW)(PROMPT, max_tokens=6, temperature=0))


def test_lora_on_otter_gguf_same_text_as_llama(otter_lora):
    lora, plain_lora = otter_lora
    assert lora["choices"][0]["text"] == plain_lora["choices"][0]["text"]


def test_lora_on_otter_gguf_is_applied(otter_lora, reward3_on_text):
    lora, _ = otter_lora
    assert lora["choices"][0]["text"] != reward3_on_text["choices"][0]["text"][: len(lora["choices"][0]["text"])]


def test_lora_on_otter_gguf_carries_signals(otter_lora):
    lora, _ = otter_lora
    assert len(lora["choices"][0]["otter"]["signals"]) == lora["usage"]["completion_tokens"] >= 6


def test_save_load_state_carries_the_signals(reward3):
    reward3.reset()
    reward3(PROMPT, max_tokens=8, temperature=0)
    st = reward3.save_state()
    saved = reward3.signals.copy()
    assert np.isfinite(saved).any()
    reward3("Something else", max_tokens=3, temperature=0)
    reward3.load_state(st)
    np.testing.assert_array_equal(reward3.signals, saved)


BAD_USES = {
    "unknown-signal-name": (lambda llm: llm(PROMPT, max_tokens=2, guidance={"signal": "nope"}),
                            "unknown signal name 'nope'"),
    "no-signal-for-3-signals": (lambda llm: llm(PROMPT, max_tokens=2, guidance=_guidance()), "3 signals"),
    "top_k-above-n_seq_max": (lambda llm: llm(PROMPT, max_tokens=2, guidance=_guidance(top_k=8, signal="honesty")),
                              "n_seq_max >= 9"),
    "infinite-weight": (lambda llm: llm(PROMPT, max_tokens=2, guidance={"weight": math.inf, "signal": "honesty"}),
                        "finite"),
    "token-outside-vocab": (lambda llm: llm.score(tokens=[1, llm.n_vocab()]), "outside the vocabulary"),
    "score-without-input": (lambda llm: llm.score(), "exactly one"),
}


@pytest.mark.parametrize("use", BAD_USES)
def test_bad_use_is_a_clear_error(use, reward3):
    call, match = BAD_USES[use]
    with pytest.raises(ValueError, match=match):
        call(reward3)
