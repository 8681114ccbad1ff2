"""A token_reward head and a scalar reward head attached together (a "mixed" context).

Each head's part of the signal rows equals that head alone, bit for bit; the named values
(``tr/token_reward``: the token reward, ``harmless/reward``: the scalar signal) are what the
single heads give; completions, streaming, ``score()`` and guidance with a weighted combination
across the two heads compute what the reference combination of the single-head signals gives;
combinations that mean nothing fail with a named error (docs/API.md, "Several heads").
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import LLAMA_KW

pytestmark = pytest.mark.runtime

TOKS = [1] + list(range(20, 80))
PROMPT = "Once upon a time"
NAMES = ["tr/token_reward", "harmless/reward"]


@pytest.fixture(scope="module")
def heads(gguf_models):
    """(base, token_reward sidecar, reward1 sidecar)."""
    return (gguf_models.base, *gguf_models.sidecars)


def llm(path, heads=None, **kw):
    from otter_gguf import OtterLlama

    return OtterLlama(str(path), otter_heads=heads, **{**LLAMA_KW, **kw})


@pytest.fixture(scope="module")
def models(heads):
    """(both heads, token_reward head alone, reward head alone)."""
    base, tr, h1 = heads
    return llm(base, {"tr": tr, "harmless": h1}, n_seq_max=5), llm(base, [tr]), llm(base, [h1])


def test_each_head_equals_that_head_alone(models, heads):
    both, tr, h1 = models
    V = tr.n_out
    assert V == both.n_vocab() and both.n_out == V + 1
    assert both.head_kind == "mixed" and both.signal_names == NAMES
    assert [(h.name, h.head_kind, h.n_out, h.offset) for h in both.otter_heads] == \
        [("tr", "token_reward", V, 0), ("harmless", "reward", 1, V)]
    s, st, sh = both.score(tokens=TOKS), tr.score(tokens=TOKS), h1.score(tokens=TOKS)
    assert s.head_kind == "mixed" and s.signals.shape == (len(TOKS), V + 1) and np.isfinite(s.signals).all()
    assert np.array_equal(s.signals[:, :V], st.signals)
    assert np.array_equal(s.signals[:, V:], sh.signals)
    # the named values: the token reward (NaN at position 0) and the scalar signal
    assert np.array_equal(s.rewards["tr/token_reward"], st.token_rewards, equal_nan=True)
    assert np.isnan(s.rewards["tr/token_reward"][0]) and not np.isnan(s.rewards["tr/token_reward"][1:]).any()
    assert np.array_equal(s.rewards["harmless/reward"], sh.signals[:, 0])
    assert np.array_equal(s.token_rewards, st.token_rewards, equal_nan=True)
    assert np.array_equal(s.values, np.stack([st.token_rewards, sh.signals[:, 0]], axis=1), equal_nan=True)
    d = s.to_dict()
    assert d["signal_names"] == NAMES and len(d["signals"][0]) == 2 and d["signals"][0][0] is None
    assert d["signals"][5] == [float(st.token_rewards[5]), float(sh.signals[5, 0])]
    # the other order: offsets follow the heads
    base, trp, h1p = heads
    rev = llm(base, {"harmless": h1p, "tr": trp})
    assert rev.signal_names == NAMES[::-1] and [h.offset for h in rev.otter_heads] == [0, 1]
    r = rev.score(tokens=TOKS)
    assert np.array_equal(r.signals[:, :1], sh.signals) and np.array_equal(r.signals[:, 1:], st.signals)
    # every row of an eval (logits_all): the same split, main logits those of the base
    a, t1, o1 = llm(base, {"tr": trp, "harmless": h1p}, logits_all=True), llm(base, [trp], logits_all=True), \
        llm(base, logits_all=True)
    for m in (a, t1, o1):
        m.eval(TOKS)
    n = len(TOKS)
    assert np.array_equal(a.signals[:, :V], t1.signals) and not np.isnan(a.signals).any()
    assert np.array_equal(a.scores[:n], o1.scores[:n])


def test_completion_and_stream(models, heads):
    both, tr, h1 = models
    out = both(PROMPT, max_tokens=6, temperature=0)
    o = out["choices"][0]["otter"]
    assert o["head_kind"] == "mixed" and o["signal_names"] == NAMES and len(o["tokens"]) == 6
    assert "token_rewards" not in o and "signal_rows" not in o
    prompt = both.tokenize(PROMPT.encode(), add_bos=True, special=True)
    seq = prompt + o["tokens"]
    ref_tr = tr.score(tokens=seq).token_rewards[len(prompt):]
    ref_h = h1.score(tokens=seq).signals[len(prompt):, 0]
    got = np.asarray(o["signals"], dtype=np.float32)
    assert got.shape == (6, 2)
    # token-by-token decodes vs one batch: test_api.py's tolerance for the same comparison
    np.testing.assert_allclose(got[:, 0], ref_tr, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(got[:, 1], ref_h, rtol=1e-3, atol=2e-3)
    assert [list(r) for r in o["rewards"]] == [NAMES] * 6
    assert [r["harmless/reward"] for r in o["rewards"]] == [row[1] for row in o["signals"]]
    chunks = list(both(PROMPT, max_tokens=6, temperature=0, stream=True))
    blocks = [c["choices"][0]["otter"] for c in chunks if c["choices"][0].get("otter")]
    assert [t for b in blocks for t in b["tokens"]] == o["tokens"]
    assert [list(r) for b in blocks for r in b["rewards"]] == [NAMES] * 6
    # the stream reuses the cached prompt (other batch shapes): test_sidecar_runtime's tolerance
    assert np.allclose([r for b in blocks for r in b["signals"]], o["signals"], atol=1e-3)
    # otter_full_signals: the concatenated rows as well
    base, trp, h1p = heads
    full = llm(base, {"tr": trp, "harmless": h1p}, otter_full_signals=True)
    f = full(PROMPT, max_tokens=3, temperature=0)["choices"][0]["otter"]
    rows = np.asarray(f["signal_rows"], dtype=np.float32)
    assert rows.shape == (3, both.n_out)
    assert np.array_equal(rows[:, -1], np.asarray(f["signals"], dtype=np.float32)[:, 1])


def _ref_rewards(tr, h1, prefix, cands, c_tr, c_h):
    """The reference combination from the single heads: c_tr * (token_reward head's row at the last
    prefix position)[candidate] + c_h * (reward head's signal at the candidate's own position)."""
    row = tr.score(tokens=prefix).signals[-1]
    return np.array([c_tr * float(row[c]) + c_h * float(h1.score(tokens=prefix + [c]).signals[-1, 0])
                     for c in cands])


def test_guidance_with_a_combination_across_the_two_heads(models):
    from otter_gguf import Guidance

    both, tr, h1 = models
    g = Guidance(weight=3.0, top_k=4, signal={"tr/token_reward": 0.5, "harmless/reward": 0.5}, trace=True)
    out = both(PROMPT, max_tokens=5, temperature=0, guidance=g)
    o = out["choices"][0]["otter"]
    prompt = both.tokenize(PROMPT.encode(), add_bos=True, special=True)
    toks = o["tokens"]
    assert len(o["guidance"]) == len(toks) == 5
    for k, step in enumerate(o["guidance"]):
        ref = _ref_rewards(tr, h1, prompt + toks[:k], step["candidates"], 0.5, 0.5)
        np.testing.assert_allclose(step["rewards"], ref, atol=1e-3)
        scores = np.asarray(step["logits"]) + 3.0 * ref
        assert np.allclose(step["scores"], scores, atol=4e-3)
        top2 = np.sort(scores)[-2:]
        if top2[1] - top2[0] > 1e-2:  # the reference picks the same candidate
            assert step["chosen"] == step["candidates"][int(np.argmax(scores))] == toks[k]
    # the rewards in the result: the named values of the chosen tokens
    seq = prompt + toks
    ref_h = h1.score(tokens=seq).signals[len(prompt):, 0]
    np.testing.assert_allclose([r["harmless/reward"] for r in o["rewards"]], ref_h, atol=2e-3)
    np.testing.assert_allclose([r["tr/token_reward"] for r in o["rewards"]],
                               tr.score(tokens=seq).token_rewards[len(prompt):], atol=2e-3)
    # weight 0: plain decoding
    g0 = Guidance(weight=0.0, top_k=4, signal={"tr/token_reward": 0.5, "harmless/reward": 0.5})
    assert both(PROMPT, max_tokens=5, temperature=0, guidance=g0)["choices"][0]["text"] == \
        both(PROMPT, max_tokens=5, temperature=0)["choices"][0]["text"]


@pytest.mark.parametrize("mode", ["args", "dexperts"])
def test_guidance_on_the_token_reward_head_alone_equals_that_head_alone(models, mode):
    """``signal`` naming only the token_reward head: one pass per step, as with that head alone."""
    from otter_gguf import Guidance

    both, tr, _ = models
    kw = dict(weight=2.0, top_k=6, mode=mode, trace=True)
    a = both(PROMPT, max_tokens=6, temperature=0, guidance=Guidance(signal="tr/token_reward", **kw))
    b = tr(PROMPT, max_tokens=6, temperature=0, guidance=Guidance(**kw))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["otter"]["tokens"] == b["choices"][0]["otter"]["tokens"]
    assert a["choices"][0]["otter"]["guidance"] == b["choices"][0]["otter"]["guidance"]
    # a coefficient scales the head's row: weight 2 x coefficient 1 == weight 1 x coefficient 2
    c = both(PROMPT, max_tokens=6, temperature=0,
             guidance=Guidance(signal={"tr/token_reward": 2.0}, **{**kw, "weight": 1.0}))
    assert c["choices"][0]["otter"]["tokens"] == b["choices"][0]["otter"]["tokens"]


def test_meaningless_combinations_are_named_errors(models):
    from otter_gguf import Guidance

    both, _, _ = models
    with pytest.raises(ValueError, match=r"mode 'dexperts'.*'harmless/reward' is a scalar signal.*use mode='args'"):
        both(PROMPT, max_tokens=2, guidance=Guidance(mode="dexperts", signal={"tr/token_reward": 1.0,
                                                                              "harmless/reward": 1.0}))
    with pytest.raises(ValueError, match=r"runs 2 Otter heads \(signals: tr/token_reward, harmless/reward\); choose"):
        both(PROMPT, max_tokens=2, guidance=Guidance())
    with pytest.raises(ValueError, match="unknown signal name 'token_reward'"):
        both(PROMPT, max_tokens=2, guidance=Guidance(signal="token_reward"))
    with pytest.raises(ValueError, match="needs a context with n_seq_max >= 5"):
        llm(both.model_path, {"tr": both._otter_head_paths[0][1], "harmless": both._otter_head_paths[1][1]})(
            PROMPT, max_tokens=2, guidance=Guidance(top_k=4, signal="harmless/reward"))
