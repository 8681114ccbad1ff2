"""Speculative decoding (llama-cpp-python's ``draft_model``) keeps every reward: the signals of a
completion are those of the kept tokens, equal to ``score()`` of prompt + completion, whatever the
drafter proposes (docs/API.md, "Speculative decoding").

Synthetic drafters pin the edge cases down on the tiny model: one whose drafts are always rejected,
one whose drafts are always kept, one that is right for a while and then wrong; prompt lookup
(``LlamaPromptLookupDecoding``) is the drafter people use. Each is run with each stop reason
(length, a stop string, end of generation), streamed and not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import LLAMA_KW

pytestmark = pytest.mark.runtime

PROMPT = "The quick brown"
N = 10


def _drafters(full, n_prompt, base=None):
    """name -> a draft model: a callable on the fed ids (np.intc) returning draft ids; with ``base`` (a GGUF
    of the same vocabulary) also ``draft_llama``, that model's greedy continuation (otter_gguf.DraftLlama)."""
    from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

    from otter_gguf import DraftLlama

    class Fixed(LlamaDraftModel):
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, input_ids, **kwargs):
            return np.asarray(self.fn(len(input_ids)), dtype=np.intc)

    def right(n):  # the greedy continuation itself: every draft is kept
        return full[n: n + 3]

    def wrong(n):  # never the greedy token
        return [(t + 1) % 64 for t in full[n: n + 3]]

    def half(n):  # kept for one token, then wrong
        nxt = full[n: n + 3]
        return nxt[:1] + [(t + 1) % 64 for t in nxt[1:]]

    out = {"right": Fixed(right), "wrong": Fixed(wrong), "half": Fixed(half),
           "prompt_lookup": LlamaPromptLookupDecoding(num_pred_tokens=3, max_ngram_size=2)}
    if base is not None:
        out["draft_llama"] = DraftLlama(str(base), num_pred_tokens=3, n_ctx=256, n_threads=1)
    return out


@pytest.fixture(scope="module", params=["reward3", "token_reward"])
def reference(request, gguf_models):
    """A greedy completion without speculation and score() of prompt + completion, for a reward head
    (3 signals per token) and a token_reward head (the reward of each chosen token)."""
    from otter_gguf import OtterLlama

    llm = OtterLlama(str(gguf_models.otter(request.param)), **LLAMA_KW)
    ptoks = llm.tokenize(PROMPT.encode())
    o = llm(PROMPT, max_tokens=N, temperature=0)["choices"][0]["otter"]
    s = llm.score(tokens=ptoks + o["tokens"])
    eos = llm(PROMPT, max_tokens=N, temperature=0, logits_processor=_eos_after(6, llm.token_eos()))
    assert eos["choices"][0]["finish_reason"] == "stop" and len(eos["choices"][0]["otter"]["tokens"]) < N
    score = s.signals if request.param == "reward3" else s.token_rewards
    return dict(head=request.param, ptoks=ptoks, toks=o["tokens"], texts=o["token_texts"], score=score[len(ptoks):],
                eos_toks=eos["choices"][0]["otter"]["tokens"])


def _eos_after(n_calls: int, eos: int):
    """A logits processor that makes end-of-generation the greedy token from its ``n_calls``-th call on:
    one call per sampled token with and without a draft model (the ids it is given hold the drafts)."""
    from llama_cpp import LogitsProcessorList

    calls = [0]

    def force(input_ids, scores):
        calls[0] += 1
        if calls[0] >= n_calls:
            scores = scores.copy()
            scores[eos] = scores.max() + 100.0
        return scores

    return LogitsProcessorList([force])


def _rewards(block):
    return block["signals"] if block.get("token_rewards") is None else block["token_rewards"]


def _run(llm, stream, **kw):
    llm.reset()
    out = llm(PROMPT, temperature=0, stream=stream, **kw)
    if not stream:
        c = out["choices"][0]
        return c["otter"]["tokens"], _rewards(c["otter"]), c["text"], c["finish_reason"]
    toks, sigs, text, reason = [], [], [], None
    for ch in out:
        c = ch["choices"][0]
        toks += c["otter"]["tokens"]
        sigs += _rewards(c["otter"])
        text.append(c["text"])
        reason = c["finish_reason"] or reason
    return toks, sigs, "".join(text), reason


@pytest.mark.parametrize("drafter", ["right", "wrong", "half", "prompt_lookup", "draft_llama"])
@pytest.mark.parametrize("stream", [False, True], ids=["single", "stream"])
def test_speculative_rewards_are_the_kept_tokens(gguf_models, reference, drafter, stream):
    from otter_gguf import OtterLlama

    full = reference["ptoks"] + reference["toks"]
    llm = OtterLlama(str(gguf_models.otter(reference["head"])),
                     draft_model=_drafters(full, len(reference["ptoks"]), gguf_models.base)[drafter], **LLAMA_KW)
    # length: every token including the last; a stop string: the tokens before it
    stop = next(t for t in reference["texts"][3:] if len(t.strip()) >= 2)
    eos = dict(max_tokens=N)  # + a fresh end-of-generation processor per run
    for kw, reason in ((dict(max_tokens=N), "length"), (dict(max_tokens=N, stop=[stop]), "stop"), (eos, "stop")):
        extra = dict(logits_processor=_eos_after(6, llm.token_eos())) if kw is eos else {}
        toks, sigs, _, got_reason = _run(llm, stream, **kw, **extra)
        assert got_reason == reason, (drafter, kw)
        assert toks == reference["toks"][: len(toks)] and len(toks) >= 3
        if kw is eos:
            assert toks == reference["eos_toks"]
        assert len(sigs) == len(toks)
        # the tolerance of test_api's completion-vs-score check (batch-shape noise of f32 kernels)
        np.testing.assert_allclose(np.array(sigs, dtype=np.float64), reference["score"][: len(toks)],
                                   rtol=1e-3, atol=2e-3, err_msg=f"{drafter} {kw}")
    # streamed = not streamed
    if stream:
        llm2 = OtterLlama(str(gguf_models.otter(reference["head"])),
                          draft_model=_drafters(full, len(reference["ptoks"]), gguf_models.base)[drafter], **LLAMA_KW)
        assert _run(llm2, False, max_tokens=N)[:3] == _run(llm, True, max_tokens=N)[:3]


@pytest.mark.unit
def test_kept_evaluated_stops_at_the_first_draft_not_kept():
    from otter_gguf.runtime.completion import CompletionRun, kept_evaluated

    run = CompletionRun(guidance=None, prompt_len=3, generated=[7, 8, 9])
    assert kept_evaluated(run, [1, 2, 3]) == 3                # the prompt only
    assert kept_evaluated(run, [1, 2, 3, 7, 8, 9]) == 6       # every generated token fed
    assert kept_evaluated(run, [1, 2, 3, 7, 5, 9]) == 4       # a draft (5) sits where 8 was kept
    assert kept_evaluated(run, [1, 2, 3, 7, 8, 9, 4, 4]) == 6  # drafts past the last kept token
    assert kept_evaluated(CompletionRun(guidance=None), [1, 2]) == 2  # before generation starts


# ---------------------------------------------------------------------------
# guided decoding at speculative speed (token_reward heads)
# ---------------------------------------------------------------------------
GUIDES = [({"weight": 3.0, "top_k": 5}, 0, None), ({"weight": 2.0, "mode": "dexperts"}, 0, None),
          ({"weight": 3.0, "top_k": 5}, 0.8, 11), ({"weight": 2.0, "mode": "dexperts"}, 0.7, 3)]


@pytest.fixture(scope="module")
def guided_reference(gguf_models):
    """Guided completions of the token_reward head without speculation (greedy and seeded sampling)."""
    from otter_gguf import OtterLlama

    llm = OtterLlama(str(gguf_models.otter("token_reward")), **LLAMA_KW)
    out = {}
    for g, temp, seed in GUIDES:
        llm.reset()
        c = llm(PROMPT, max_tokens=N, temperature=temp, seed=seed, guidance=dict(g, trace=True))["choices"][0]
        out[(g["mode"] if "mode" in g else "args", temp)] = c
    plain = llm(PROMPT, max_tokens=N, temperature=0)["choices"][0]["otter"]["tokens"]
    assert out[("args", 0)]["otter"]["tokens"] != plain  # the guidance changes the completion
    return llm.tokenize(PROMPT.encode()), out


@pytest.mark.parametrize("drafter", ["right", "wrong", "half", "prompt_lookup", "draft_llama"])
def test_token_reward_guidance_under_speculation_equals_guidance_without(gguf_models, guided_reference, drafter):
    """Each verified position's guided distribution comes from the verify pass (its base logits and
    its own signal row): greedy guided output is the non-speculative one, and seeded sampling too (one
    draw per kept token, from the same guided distribution); ARGS' trace has one entry per token."""
    from otter_gguf import OtterLlama

    ptoks, ref = guided_reference
    for g, temp, seed in GUIDES:
        want = ref[(g["mode"] if "mode" in g else "args", temp)]
        full = ptoks + want["otter"]["tokens"]
        llm = OtterLlama(str(gguf_models.otter("token_reward")),
                         draft_model=_drafters(full, len(ptoks), gguf_models.base)[drafter], **LLAMA_KW)
        got = llm(PROMPT, max_tokens=N, temperature=temp, seed=seed, guidance=dict(g, trace=True))["choices"][0]
        o, w = got["otter"], want["otter"]
        assert o["tokens"] == w["tokens"] and got["text"] == want["text"], (drafter, g, temp)
        np.testing.assert_allclose(np.array(o["token_rewards"], dtype=float), np.array(w["token_rewards"], dtype=float),
                                   rtol=1e-3, atol=2e-3)
        if g.get("mode") != "dexperts":  # (ARGS traces its candidates; DExperts shifts every logit)
            assert len(o["guidance"]) == len(o["tokens"])
            assert [x["candidates"] for x in o["guidance"]] == [x["candidates"] for x in w["guidance"]]


def test_scalar_guidance_with_a_draft_model_is_refused_naming_why(gguf_models):
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from otter_gguf import OtterLlama

    llm = OtterLlama(str(gguf_models.otter("reward3")), draft_model=LlamaPromptLookupDecoding(), **LLAMA_KW,
                     n_seq_max=4)
    with pytest.raises(ValueError, match="scores top_k=3 candidates as parallel sequences.*use a token_reward head"):
        llm(PROMPT, max_tokens=4, guidance={"top_k": 3, "signal": "honesty"})


def test_a_draft_model_of_another_vocabulary_is_refused_naming_both(gguf_models, tmp_path):
    from otter_gguf import DraftLlama, OtterLlama
    from otter_gguf.io.random_base import write_random_base

    other = write_random_base(tmp_path / "other-vocab.gguf", {"d": 64, "L": 1, "h": 2, "h_kv": 1, "f": 128, "V": 300})
    base = str(gguf_models.otter("reward3"))
    with pytest.raises(ValueError) as e:
        OtterLlama(base, draft_model=DraftLlama(str(other), n_ctx=64), **LLAMA_KW)
    msg = str(e.value)
    assert f"draft model {other} has a vocabulary of 300 tokens" in msg and f"but the base {base} has" in msg
    assert "must share the base's vocabulary" in msg
    with pytest.raises(ValueError, match="num_pred_tokens must be an integer in 1..64, got 0"):
        DraftLlama(str(other), num_pred_tokens=0)


# ---------------------------------------------------------------------------
# the real model: SmolLM2-135M Q4_1 with the demo head, prompt lookup on a copy-heavy prompt
# ---------------------------------------------------------------------------
COPY = ("Repeat this code with the typo fixed.\n\ndef greet(name):\n    print(\"Helo, \" + name)\n"
        "    return name.upper()\n\nFixed:\n\ndef greet(name):\n")


# the base logits' own spread between one-token and batched decodes on this model, measured by
# tests/test_batch_shapes.py (1.17 on the 2-core AMD EPYC), with room for other kernels
LOGIT_SPREAD = 2.0


def _divergence(a, b):
    """The first index where token lists differ (None when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _margin(path, context, chosen, other) -> float:
    """logit[chosen] - logit[other] after ``context``, decoded one token at a time (the plain decode's shapes)."""
    import llama_cpp

    ll = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, verbose=False, logits_all=True)
    ll.eval(context[:-1])
    ll.eval(context[-1:])
    row = np.array(ll.scores[len(context) - 1])
    ll.close()
    return float(row[chosen] - row[other])


def _stream_concat(chunks):
    toks, sigs, text, reason = [], [], "", None
    for ch in chunks:
        c = ch["choices"][0]
        toks += c["otter"]["tokens"]
        sigs += _rewards(c["otter"])
        text += c["text"]
        reason = c["finish_reason"] or reason
    return toks, sigs, text, reason


@pytest.mark.slow
def test_real_model_speculation_keeps_every_reward_and_guidance(otter_runtime, tmp_path):
    """Prompt lookup on SmolLM2: the text of non-speculative decoding, every reward (the last one too) equal
    to score() at the batch-shape bound of tests/test_batch_shapes.py, at length and at a stop string,
    streamed = not; token_reward guidance (a 2-step next_token head) under speculation = without."""
    import subprocess
    import sys

    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from otter_gguf import OtterLlama
    from otter_gguf.demo import smollm2 as demo
    from otter_gguf_converter import convert
    from helpers import REAL_REWARD_TOL as REAL_TOL

    base = demo.model_path(quiet=True)
    path = convert(demo.ADAPTER_DIR, base, tmp_path / "smol.gguf", outtype="q8_0", progress=False)
    kw = dict(n_ctx=1024, n_threads=2, verbose=False)
    plain = OtterLlama(str(path), **kw)
    spec = OtterLlama(str(path), draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4), **kw)
    ptoks = plain.tokenize(COPY.encode())
    want = plain(COPY, max_tokens=32, temperature=0)["choices"][0]
    stop = next(t for t in want["otter"]["token_texts"][12:] if len(t.strip()) >= 3)
    for args in (dict(max_tokens=32), dict(max_tokens=32, stop=[stop])):
        plain.reset()
        ref = plain(COPY, temperature=0, **args)["choices"][0]
        spec.reset()
        got = spec(COPY, temperature=0, **args)["choices"][0]
        o = got["otter"]
        div = _divergence(o["tokens"], ref["otter"]["tokens"])
        if div is None:
            assert got["text"] == ref["text"] and got["finish_reason"] == ref["finish_reason"], args
        else:  # only where the base model is within its own batch-shape rounding of a tie
            margin = _margin(path, ptoks + ref["otter"]["tokens"][:div], ref["otter"]["tokens"][div], o["tokens"][div])
            print(f"real model {args}: speculative text leaves the plain one at token {div}, plain logit margin {margin:.3f}")
            assert 0 <= margin <= LOGIT_SPREAD, (args, div, margin)
        assert len(o["signals"]) == len(o["tokens"])
        sc = plain.score(tokens=ptoks + o["tokens"]).signals[len(ptoks):]
        assert np.max(np.abs(np.array(o["signals"], dtype=float) - sc)) <= REAL_TOL, args
        spec.reset()
        st = _stream_concat(spec(COPY, temperature=0, stream=True, **args))
        assert st[0] == o["tokens"] and st[2] == got["text"] and st[3] == got["finish_reason"]
        np.testing.assert_allclose(np.array(st[1], dtype=float), np.array(o["signals"], dtype=float), atol=1e-6)
    # a draft model: DraftLlama on SmolLM2 itself (the smallest of its family; every greedy draft is the
    # model's own choice up to the batch-shape rounding), rewards of the kept tokens
    from otter_gguf import DraftLlama

    dm = OtterLlama(str(path), draft_model=DraftLlama(str(base), num_pred_tokens=4, n_ctx=1024, n_threads=2), **kw)
    d = dm(COPY, max_tokens=24, temperature=0)["choices"][0]["otter"]
    sc = plain.score(tokens=ptoks + d["tokens"]).signals[len(ptoks):]
    assert len(d["signals"]) == len(d["tokens"]) == 24
    assert np.max(np.abs(np.array(d["signals"], dtype=float) - sc)) <= REAL_TOL
    # guided decoding with a token_reward head at speculative speed
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in (COPY, "The cat sat on the mat.\n") * 4))
    subprocess.run([sys.executable, "-m", "otter_gguf.cli", "train", str(base), str(data), "-o", str(tmp_path / "tr"),
                    "--objective", "next_token", "--d2", "32", "--h2", "1", "--h2-kv", "1", "--f2", "32",
                    "--steps", "2", "--batch-size", "2", "-t", "2", "--force"], check=True, capture_output=True)
    tr = convert(tmp_path / "tr", base, tmp_path / "tr.gguf", outtype="q8_0", progress=False)
    g = {"weight": 1.0, "top_k": 5}
    gp = OtterLlama(str(tr), **kw)
    gs = OtterLlama(str(tr), draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4), **kw)
    a = gp(COPY, max_tokens=24, temperature=0, guidance=g)["choices"][0]
    b = gs(COPY, max_tokens=24, temperature=0, guidance=g)["choices"][0]
    assert b["otter"]["tokens"] == a["otter"]["tokens"] and b["text"] == a["text"]
    plain_tr = gp(COPY, max_tokens=24, temperature=0)["choices"][0]["otter"]["tokens"]
    print(f"real model: guided tokens differ from unguided at {sum(x != y for x, y in zip(plain_tr, a['otter']['tokens']))}"
          f" of 24 positions")


def test_speculation_past_n_batch_tokens(gguf_models):
    """llama-cpp-python sizes its logits store from the logits_all argument (n_batch rows) although a draft
    model turns logits_all on, so a context past n_batch tokens failed in eval; OtterLlama asks for
    logits_all itself when given a draft model."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from otter_gguf import OtterLlama

    prompt = " ".join(["one two three four"] * 10)
    path = str(gguf_models.otter("reward3"))
    plain = OtterLlama(path, **LLAMA_KW)
    spec = OtterLlama(path, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=3), **LLAMA_KW)
    assert len(spec.tokenize(prompt.encode())) > LLAMA_KW["n_batch"] + 20
    want = plain(prompt, max_tokens=12, temperature=0)["choices"][0]
    got = spec(prompt, max_tokens=12, temperature=0)["choices"][0]
    assert got["otter"]["tokens"] == want["otter"]["tokens"]
    np.testing.assert_allclose(got["otter"]["signals"], want["otter"]["signals"], rtol=1e-3, atol=2e-3)
