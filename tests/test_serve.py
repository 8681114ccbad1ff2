"""otter-gguf serve: the OpenAI API with the `otter` field, checked with the official
`openai` client and raw HTTP against the Python API (OtterLlama) on the tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import LLAMA_KW
from helpers import SERVE_SAME as SAME
from helpers import SERVE_TOL as TOL
from helpers import concat_blocks as _concat
from helpers import http_request as _http
from helpers import openai_client as _client
from helpers import serve_tiny as _serve

pytestmark = pytest.mark.runtime

PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def server(gguf_models):
    cfg, s = _serve(gguf_models.otter("reward3"))
    s.cfg = cfg
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token_server(gguf_models):
    cfg, s = _serve(gguf_models.otter("token_reward"), parallel=2)
    s.cfg = cfg
    yield s
    s.stop()


@pytest.fixture(scope="module")
def py3(gguf_models):
    """The Python API on the reward3 model (the reference of the server's answers)."""
    return _python_api(gguf_models, "reward3", n_seq_max=5)


@pytest.fixture(scope="module")
def py_token(gguf_models):
    return _python_api(gguf_models, "token_reward")


def _python_api(gguf_models, kind, **kw):
    return _python_api_path(gguf_models.otter(kind), **kw)


def _python_api_path(path, **kw):
    from otter_gguf.runtime.llama import OtterLlama

    return OtterLlama(str(path), **kw, **LLAMA_KW)


def _capped(ref, max_tokens):
    """The Python API's choice as the server answers it. ``llama_cpp.Llama`` (and so OtterLlama, its drop-in)
    generates past ``max_tokens`` while the text ends inside a UTF-8 character; the server stops at
    ``max_tokens`` (llama-server's ``n_predict``) and drops the incomplete character. Which of the two a greedy
    random model hits depends on the CPU's kernels, so a comparison takes the reference's first ``max_tokens``
    tokens (and their rows) and, when that cut something, only a prefix of its text (``"prefix"``)."""
    o = ref["otter"]
    n = len(o["tokens"])
    if n <= max_tokens:
        return ref
    cut = {k: (v[:max_tokens] if isinstance(v, list) and len(v) == n else v) for k, v in o.items()}
    return {**ref, "otter": cut, "finish_reason": "length", "prefix": True}


def _text(choice):
    return choice["text"] if "text" in choice else choice["message"]["content"]


def _assert_text(got, ref):
    """The served text is the reference's, or (reference run past max_tokens) the start of it."""
    assert _text(ref).startswith(_text(got)) if ref.get("prefix") else _text(got) == _text(ref)


# ---------------------------------------------------------------------------
# completions and chat with the openai client
# ---------------------------------------------------------------------------
def test_completion_equals_python_api_and_rewards_equal_score(server, py3):
    r = _client(server).completions.create(model=server.cfg.name, prompt=PROMPT, max_tokens=10, **SAME)
    ch = r.model_dump()["choices"][0]
    o = ch["otter"]
    ref = _capped(py3(PROMPT, max_tokens=10, temperature=0)["choices"][0], 10)
    _assert_text(ch, ref)
    assert ch["finish_reason"] == ref["finish_reason"] == "length"
    assert o["tokens"] == ref["otter"]["tokens"] and len(o["tokens"]) == r.usage.completion_tokens == 10
    for k in ("token_texts", "text_offset", "head_kind", "signal_names"):
        assert o[k] == ref["otter"][k], k
    np.testing.assert_allclose(o["signals"], ref["otter"]["signals"], **TOL)
    assert o["signal_names"] == ["helpfulness", "harmlessness", "honesty"]
    assert [list(d) for d in o["rewards"]] == [o["signal_names"]] * 10
    # rewards == score(prompt + completion) at the completion's positions
    prompt_toks = py3.tokenize(PROMPT.encode())
    sc = py3.score(tokens=prompt_toks + o["tokens"])
    got = np.array([[d[n] for n in o["signal_names"]] for d in o["rewards"]])
    np.testing.assert_allclose(got, sc.signals[len(prompt_toks):], **TOL)
    assert r.usage.prompt_tokens == len(prompt_toks)


def test_stream_chunks_concatenate_to_the_result(exact_server):
    """(On the server without the prompt cache: the same decode shapes, so the same values.)"""
    c = _client(exact_server)
    full = c.completions.create(model="any", prompt=PROMPT, max_tokens=12, stop=["Q"], **SAME)
    chunks = [x.model_dump() for x in c.completions.create(model="any", prompt=PROMPT, max_tokens=12,
                                                           stop=["Q"], stream=True, **SAME)]
    ch = full.model_dump()["choices"][0]
    assert "".join(x["choices"][0]["text"] for x in chunks) == ch["text"]
    assert [x["choices"][0]["finish_reason"] for x in chunks][-1] == ch["finish_reason"]
    assert all(x["choices"][0]["finish_reason"] is None for x in chunks[:-1])
    joined = _concat([x["choices"][0]["otter"] for x in chunks])
    for k, v in joined.items():
        if k in ("signals", "rewards"):
            np.testing.assert_allclose(np.array([list(d.values()) if isinstance(d, dict) else d for d in v]),
                                       np.array([list(d.values()) if isinstance(d, dict) else d
                                                 for d in ch["otter"][k]]), atol=1e-5)
        else:
            assert v == ch["otter"][k], k
    for x in chunks[:-1]:  # a chunk carries the tokens of its text
        o = x["choices"][0]["otter"]
        assert o["tokens"] and "".join(o["token_texts"]).startswith(x["choices"][0]["text"][:1])


def test_stop_string_cuts_text_keeps_tokens(server, py3):
    ref = py3(PROMPT, max_tokens=10, temperature=0)["choices"][0]
    stop = ref["text"][5:7]  # a stop inside the greedy completion
    r = _client(server).completions.create(model=server.cfg.name, prompt=PROMPT, max_tokens=10, stop=[stop], **SAME)
    ch = r.model_dump()["choices"][0]
    py = py3(PROMPT, max_tokens=10, temperature=0, stop=[stop])["choices"][0]
    assert ch["text"] == py["text"] == ref["text"][: ref["text"].index(stop)]
    assert ch["finish_reason"] == "stop" and ch["otter"]["tokens"] == py["otter"]["tokens"]
    np.testing.assert_allclose(ch["otter"]["signals"], py["otter"]["signals"], **TOL)


def _byte_token(llm, byte: int) -> int:
    """The byte-fallback token whose text is that one byte (the tiny SentencePiece vocabulary has all 256)."""
    (tok,) = [t for t in range(llm.n_vocab()) if llm.detokenize([t]) == bytes([byte])]
    return tok


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_max_tokens_is_a_hard_cap_inside_a_multibyte_character(server, max_tokens):
    """Every token chosen is 0xE2, the lead byte of a 3-byte UTF-8 character (logit_bias), so the text
    never ends on a whole character: the completion still stops at max_tokens with finish_reason
    "length" (llama-server's n_predict), streamed or not, and the incomplete character is dropped from
    the text; the otter block has a row for each of the max_tokens tokens."""
    lead = _byte_token(server.server.config.app.state.server.llm, 0xE2)
    kw = dict(model=server.cfg.name, prompt=PROMPT, max_tokens=max_tokens, temperature=0, logit_bias={str(lead): 100.0})
    c = _client(server)
    r = c.completions.create(**kw)
    ch = r.model_dump()["choices"][0]
    assert r.usage.completion_tokens == max_tokens and ch["finish_reason"] == "length"
    assert ch["otter"]["tokens"] == [lead] * max_tokens and len(ch["otter"]["signals"]) == max_tokens
    assert ch["text"] == ""
    chunks = [x.model_dump()["choices"][0] for x in c.completions.create(**kw, stream=True)]
    assert "".join(x["text"] for x in chunks) == "" and chunks[-1]["finish_reason"] == "length"
    assert _concat([x["otter"] for x in chunks if x["otter"]])["tokens"] == [lead] * max_tokens


def test_chat_streamed_and_not(server, py3):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    c = _client(server)
    r = c.chat.completions.create(model=server.cfg.name, messages=msgs, max_tokens=8, **SAME).model_dump()
    ref = _capped(py3.create_chat_completion(messages=msgs, max_tokens=8, temperature=0)["choices"][0], 8)
    ch = r["choices"][0]
    _assert_text(ch, ref)
    assert ch["otter"]["tokens"] == ref["otter"]["tokens"]
    np.testing.assert_allclose(ch["otter"]["signals"], ref["otter"]["signals"], **TOL)
    chunks = [x.model_dump() for x in c.chat.completions.create(model=server.cfg.name, messages=msgs, max_tokens=8,
                                                                stream=True, **SAME)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[0]["choices"][0]["otter"] is None
    text = "".join(x["choices"][0]["delta"].get("content") or "" for x in chunks)
    assert text == ch["message"]["content"]
    assert _concat([x["choices"][0]["otter"] for x in chunks[1:]])["tokens"] == ch["otter"]["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == ch["finish_reason"]


def test_guidance_extra_body_equals_python_api(server, py3):
    c = _client(server)
    for g, temp, seed in (({"weight": 2.0, "top_k": 3, "signal": "honesty"}, 0, None),
                          ({"weight": 1.5, "top_k": 3, "signal": {"helpfulness": 0.5, "harmlessness": 1.0},
                            "trace": True}, 0.9, 7)):
        r = c.completions.create(model=server.cfg.name, prompt=PROMPT, max_tokens=8, temperature=temp, seed=seed,
                                 extra_body={"repeat_penalty": 1.0, "otter": {"guidance": g}}).model_dump()
        ref = _capped(py3(PROMPT, max_tokens=8, temperature=temp, seed=seed, guidance=g)["choices"][0], 8)
        o = r["choices"][0]["otter"]
        assert o["tokens"] == ref["otter"]["tokens"]
        _assert_text(r["choices"][0], ref)
        plain = py3(PROMPT, max_tokens=8, temperature=0)["choices"][0]["otter"]["tokens"]
        assert o["tokens"] != plain  # guidance changed the completion
        np.testing.assert_allclose(o["signals"], ref["otter"]["signals"], **TOL)
        if g.get("trace"):
            assert [s["chosen"] for s in o["guidance"]] == o["tokens"]
            assert [s["candidates"] for s in o["guidance"]] == [s["candidates"] for s in ref["otter"]["guidance"]]


def test_token_reward_head_guidance_and_full_signals(token_server, py_token):
    c = _client(token_server)
    name = token_server.cfg.name
    for g, temp, seed in (({"weight": 3.0, "top_k": 5}, 0.8, 11), ({"weight": 2.0, "mode": "dexperts"}, 0.7, 3)):
        r = c.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=temp, seed=seed,
                                 extra_body={"repeat_penalty": 1.0, "otter": {"guidance": g}}).model_dump()
        ref = _capped(py_token(PROMPT, max_tokens=8, temperature=temp, seed=seed, guidance=g)["choices"][0], 8)
        o = r["choices"][0]["otter"]
        assert o["tokens"] == ref["otter"]["tokens"]
        np.testing.assert_allclose(o["token_rewards"], ref["otter"]["token_rewards"], **TOL)
        assert o["signals"] is None and "rewards" not in o
    r = c.completions.create(model=name, prompt=PROMPT, max_tokens=5, temperature=0,
                             extra_body={"repeat_penalty": 1.0, "otter": {"full_signals": True}}).model_dump()
    o = r["choices"][0]["otter"]
    rows = np.array(o["signals"])
    assert rows.shape == (5, py_token.n_vocab()) and o["head_kind"] == "token_reward"
    # token_rewards[i] = row of the previous position at the token
    np.testing.assert_allclose(o["token_rewards"][1:], [rows[i - 1][t] for i, t in enumerate(o["tokens"]) if i],
                               atol=1e-6)
    sc = py_token.score(tokens=py_token.tokenize(PROMPT.encode()) + o["tokens"])
    np.testing.assert_allclose(rows, sc.signals[-5:], **TOL)


def test_side_stream_off_for_one_request(server, exact_server):
    c = _client(exact_server)
    on = c.completions.create(model="any", prompt=PROMPT, max_tokens=6, **SAME).model_dump()
    off = c.completions.create(model="any", prompt=PROMPT, max_tokens=6, temperature=0,
                               extra_body={"repeat_penalty": 1.0, "otter": {"side_stream": False}}).model_dump()
    assert "otter" not in off["choices"][0] and off["choices"][0]["text"] == on["choices"][0]["text"]
    again = c.completions.create(model="any", prompt=PROMPT, max_tokens=6, **SAME).model_dump()
    assert again["choices"][0]["otter"] == on["choices"][0]["otter"]  # the next request is unaffected
    # the prompt cache never reuses cells decoded with the side stream off for a request with signals
    c = _client(server)
    nocache = {"repeat_penalty": 1.0, "cache_prompt": False}
    p2 = "Zebra crossings at midnight are"
    off = c.completions.create(model="any", prompt=p2, max_tokens=4, temperature=0,
                               extra_body={"repeat_penalty": 1.0, "otter": {"side_stream": False}}).model_dump()
    on = c.completions.create(model="any", prompt=p2, max_tokens=4, **SAME).model_dump()
    assert on["usage"]["prompt_tokens_details"]["cached_tokens"] <= 1  # (a BOS another sequence holds)
    ref = c.completions.create(model="any", prompt=p2, max_tokens=4, temperature=0, extra_body=nocache).model_dump()
    np.testing.assert_allclose(on["choices"][0]["otter"]["signals"], ref["choices"][0]["otter"]["signals"], **TOL)
    again = c.completions.create(model="any", prompt=p2 + " very", max_tokens=4, **SAME).model_dump()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == on["usage"]["prompt_tokens"]


def test_score_endpoint_equals_score(server, py3):
    ref = py3.score("Paris is the capital of France.")
    st, _, body = _http(server, "POST", "/v1/otter/score", {"text": "Paris is the capital of France."})
    assert st == 200
    d = json.loads(body)
    assert d["tokens"] == ref.tokens and d["signal_names"] == ref.signal_names and d["head_kind"] == "reward"
    np.testing.assert_allclose(d["signals"], ref.signals, **TOL)
    assert d["token_texts"] == ref.token_texts
    assert d["rewards"][2] == dict(zip(ref.signal_names, d["signals"][2]))
    st, _, body = _http(server, "POST", "/v1/otter/score", {"tokens": ref.tokens[:4]})
    np.testing.assert_allclose(json.loads(body)["signals"], ref.signals[:4], **TOL)


def test_models_health_metrics(server, py3):
    m = _client(server).models.list().model_dump()
    (info,) = m["data"]
    assert info["id"] == server.cfg.name
    names = ["helpfulness", "harmlessness", "honesty"]
    (head,) = py3.otter_heads  # the model's own head, named as the Python API names it
    assert info["otter"] == {"head_kind": "reward", "n_out": 3, "signal_names": names,
                             "heads": [{"name": head.name, "head_kind": "reward", "n_out": 3, "signal_names": names}]}
    st, _, body = _http(server, "GET", "/health")
    h = json.loads(body)
    assert st == 200 and h["status"] == "ok" and h["slots_idle"] == 4 and h["queue_depth"] == 0
    _client(server).completions.create(model=server.cfg.name, prompt=PROMPT, max_tokens=3, **SAME)
    st, hdr, body = _http(server, "GET", "/metrics")
    text = body.decode()
    assert st == 200 and hdr["content-type"].startswith("text/plain")
    vals = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert vals['otter_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert vals["otter_generated_tokens_total"] >= 3 and vals["otter_queue_depth"] == 0
    assert vals["otter_sequences_total"] == 4 and vals["otter_request_latency_seconds_count"] >= 1
    assert vals['otter_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert "# TYPE otter_request_latency_seconds histogram" in text


# ---------------------------------------------------------------------------
# raw HTTP: SSE framing, errors
# ---------------------------------------------------------------------------
def test_sse_framing(server):
    st, hdr, body = _http(server, "POST", "/v1/completions",
                          {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True})
    assert st == 200 and hdr["content-type"].startswith("text/event-stream")
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    data = [json.loads(e[6:]) for e in events[:-1]]
    assert all(d["object"] == "text_completion" and len(d["choices"]) == 1 for d in data)
    assert sum(len(d["choices"][0]["otter"]["tokens"]) for d in data) == 5
    st, hdr, body = _http(server, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    events = body.decode().split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"


BAD = [
    ("/v1/completions", b'{"prompt": "x", ', "not valid JSON"),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"signal": "nope"}}}, "unknown signal name 'nope'"),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"mode": "dexperts", "signal": "honesty"}}},
     "needs a 'token_reward' head"),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"top_k": 4}}}, "choose one with signal="),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"top_k": 4, "signal": "honesty"}}},
     "needs 5 sequences; this server has --parallel 4"),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"weight": "big", "signal": "honesty"}}}, "weight"),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"top_k": 0, "signal": "honesty"}}}, "top_k"),
    ("/v1/completions", {"prompt": "x", "otter": {"guidance": {"colour": 1}}}, "unknown guidance option"),
    ("/v1/completions", {"prompt": "x", "otter": {"colour": 1}}, "otter.colour: Extra inputs are not permitted"),
    ("/v1/completions", {"prompt": "x", "otter": {"heads": 1}}, "otter.heads: Input should be a valid list"),
    ("/v1/completions", {"prompt": "x", "otter": {"heads": ["nope"]}}, "otter.heads: unknown head 'nope'"),
    ("/v1/completions", {"prompt": "x", "otter": {"side_stream": False, "guidance": {"signal": "honesty",
                                                                                     "top_k": 2}}}, "side stream"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "temperature": 7}, "temperature must be in [0, 2]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, "exceeds this server's limit"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n must be >= 1"),
    ("/v1/completions", {"prompt": "x", "n": 65}, "n=65 choices exceed this server's queue of 64"),
    ("/v1/completions", {"prompt": "x", "logprobs": 10 ** 6}, "logprobs=1000000 exceeds the vocabulary"),
    ("/v1/completions", {"prompt": ""}, "prompt is empty"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "word " * 400}, "context per request is 256"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, "grammar: "),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages is empty"),
    ("/v1/otter/score", {"text": "a", "tokens": [1]}, "exactly one of text and tokens"),
    ("/v1/otter/score", {"tokens": []}, "nothing to score"),
    ("/v1/otter/score", {"tokens": [1, -4]}, "outside the vocabulary"),
]


@pytest.mark.parametrize("path,body,msg", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_are_400_with_a_message(server, path, body, msg):
    raw = body if isinstance(body, bytes) else None
    st, hdr, out = _http(server, "POST", path, None if raw else body, raw=raw)
    assert st == 400, out
    err = json.loads(out)["error"]
    assert msg in err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400


def test_any_model_name_is_answered_by_the_served_model(exact_server):
    """The openai client always sends a model name and apps hard-code theirs: a one-model server
    answers any name with its model (llama-server, llama-cpp-python's server); responses and
    /v1/models name the real id. (The server without the prompt cache: the same shapes, the same values.)"""
    server = exact_server
    c = _client(server)
    want = c.completions.create(model=server.cfg.name, prompt=PROMPT, max_tokens=4, **SAME).model_dump()
    for name in ("gpt-4o-mini", "llama3:8b", "other"):
        r = c.completions.create(model=name, prompt=PROMPT, max_tokens=4, **SAME).model_dump()
        assert r["model"] == server.cfg.name and r["choices"][0]["text"] == want["choices"][0]["text"]
        assert r["choices"][0]["otter"]["tokens"] == want["choices"][0]["otter"]["tokens"]
        ch = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert ch.model == server.cfg.name
    assert [m.id for m in c.models.list().data] == [server.cfg.name]
    # one head: naming it is the same request; another name is a 400 naming the head there is
    (head,) = c.models.list().model_dump()["data"][0]["otter"]["heads"]
    r = c.completions.create(model=f"{server.cfg.name}:{head['name']}", prompt=PROMPT, max_tokens=4, **SAME)
    assert r.model_dump()["choices"][0]["otter"] == want["choices"][0]["otter"]
    st, _, out = _http(server, "POST", "/v1/completions", {"model": f"{server.cfg.name}:x", "prompt": "x"})
    assert st == 400 and json.loads(out)["error"]["message"] == (
        f"model: unknown head 'x'; the heads of this server are: {head['name']}")


def test_bad_requests_other_codes(server):
    big = {"prompt": "x" * (server.cfg.max_request_bytes + 10)}
    st, _, out = _http(server, "POST", "/v1/completions", big)
    assert st == 413 and "--max-request-bytes" in json.loads(out)["error"]["message"]
    st, _, out = _http(server, "GET", "/v1/nothing")
    assert st == 404 and json.loads(out)["error"]["code"] == 404
    # the openai client raises its own typed errors on them
    import openai

    with pytest.raises(openai.BadRequestError, match="unknown signal name"):
        _client(server).completions.create(model=server.cfg.name, prompt="x",
                                           extra_body={"otter": {"guidance": {"signal": "nope"}}})


def test_plain_model_serves_without_otter(gguf_models):
    cfg, s = _serve(gguf_models.base, parallel=2)
    try:
        r = _client(s).completions.create(model=cfg.name, prompt=PROMPT, max_tokens=4, temperature=0).model_dump()
        assert "otter" not in r["choices"][0] and r["usage"]["completion_tokens"] == 4
        assert "otter" not in _client(s).models.list().model_dump()["data"][0]
        st, _, out = _http(s, "POST", "/v1/otter/score", {"text": "hi"})
        assert st == 400 and "has no Otter head" in json.loads(out)["error"]["message"]
        st, _, out = _http(s, "POST", "/v1/completions", {"prompt": "x", "otter": {"guidance": {}}})
        assert st == 400 and "has no Otter head" in json.loads(out)["error"]["message"]
    finally:
        s.stop()


def test_api_key_and_queue_bound(gguf_models):
    import openai

    cfg, s = _serve(gguf_models.otter("reward1"), parallel=1, queue_size=1, api_key="s3cret")
    try:
        for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            st, _, out = _http(s, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=hdr)
            assert st == 401 and json.loads(out)["error"]["type"] == "authentication_error"
        st, _, _ = _http(s, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert st == 401
        assert _http(s, "GET", "/health")[0] == 200  # load balancers probe without a key
        with pytest.raises(openai.AuthenticationError):
            _client(s, "wrong").models.list()
        ok = _client(s, "s3cret")
        assert ok.completions.create(model=cfg.name, prompt="x", max_tokens=2).usage.completion_tokens == 2
        # one sequence busy with a long stream, one request waiting: the next one is refused with 503
        eos = s.server.config.app.state.server.llm.token_eos()
        stream = ok.completions.create(model=cfg.name, prompt=PROMPT, max_tokens=200, stream=True,
                                       logit_bias={str(eos): -100.0})
        next(iter(stream))
        import threading

        waiting = threading.Thread(target=lambda: ok.completions.create(model=cfg.name, prompt="x", max_tokens=1))
        waiting.start()
        for _ in range(200):
            if s.server.config.app.state.server.engine.queue_depth == 1:
                break
            import time

            time.sleep(0.01)
        st, hdr, out = _http(s, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                             headers={"Authorization": "Bearer s3cret"})
        assert st == 503 and hdr["retry-after"] == "1" and "server busy" in json.loads(out)["error"]["message"]
        stream.close()  # disconnect: frees the sequence, the waiting request runs
        waiting.join(60)
        assert not waiting.is_alive()
    finally:
        s.stop()


def test_cli_serve_subprocess(gguf_models, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from otter_gguf.cli import main

    path = str(gguf_models.otter("reward1"))
    res = CliRunner().invoke(main, ["serve", path, "--head", str(tmp_path / "nohead.gguf")])
    assert res.exit_code == 2 and "nohead.gguf': no such file" in res.output
    res = CliRunner().invoke(main, ["serve", str(gguf_models.base), "--head", f"a={path}", "--head", path])
    assert res.exit_code == 2 and "name every head (NAME=PATH) or none of them" in res.output
    res = CliRunner().invoke(main, ["serve", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    res = CliRunner().invoke(main, ["serve", str(tmp_path / "bad.gguf")])
    assert res.exit_code == 2 and "Error:" in res.output

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "otter-gguf")
    proc = subprocess.Popen([exe, "serve", path, "--port", str(port), "-np", "2", "-c", "128", "-t", "1",
                             "--api-key", "k", "-a", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        class S:
            host, url = "127.0.0.1", f"http://127.0.0.1:{port}"
        S.port = port
        for _ in range(600):
            try:
                if _http(S, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        r = _client(S, "k").completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
        o = r.model_dump()["choices"][0]["otter"]
        assert len(o["tokens"]) == 3 and o["signal_names"] == ["reward"] and r.model == "tiny"
    finally:
        proc.terminate()
        proc.wait(30)


def _serve_heads(base, tmp_path, adapters):
    """A server of ``base`` with each ``(name, adapter dir)`` as a ``--head`` adapter GGUF:
    ``({name: GGUF path}, config, server)``."""
    from otter_gguf_converter import convert

    heads = {name: str(convert(a, base, tmp_path / f"{name}.gguf", outtype="f32", progress=False, sidecar=True,
                               name=name)) for name, a in adapters}
    cfg, s = _serve(base, heads=[f"{n}={p}" for n, p in heads.items()])
    return heads, cfg, s


def test_guidance_across_a_token_reward_and_a_reward_head(gguf_models, tmp_path, adapter_token_reward_dir,
                                                          adapter_reward1_dir):
    """A server running a token_reward head and a scalar reward head together ("mixed"): guidance
    that names either or both signals gives the tokens, candidates and signals OtterLlama gives on
    the same heads with the same seed (the server once answered 400 to any guidance here)."""
    base = gguf_models.base
    heads, cfg, s = _serve_heads(base, tmp_path, (("tr", adapter_token_reward_dir), ("harmless", adapter_reward1_dir)))
    try:
        ref_llm = _python_api_path(base, otter_heads=heads, n_seq_max=5)
        assert _client(s).models.list().model_dump()["data"][0]["otter"]["head_kind"] == "mixed"
        cases = (({"weight": 3.0, "top_k": 3, "signal": {"tr/token_reward": 0.5, "harmless/reward": 0.5},
                   "trace": True}, 0, None),  # both heads: batched candidates
                 ({"weight": 2.0, "top_k": 3, "signal": {"tr/token_reward": 1.0, "harmless/reward": -1.0},
                   "trace": True}, 0.9, 5),
                 ({"weight": 2.0, "top_k": 3, "signal": "tr/token_reward"}, 0.8, 11),  # one pass per step
                 ({"weight": 2.0, "mode": "dexperts", "signal": "tr/token_reward"}, 0, None))
        for g, temp, seed in cases:
            r = _client(s).completions.create(model=cfg.name, prompt=PROMPT, max_tokens=6, temperature=temp,
                                              seed=seed, extra_body={"repeat_penalty": 1.0,
                                                                     "otter": {"guidance": g}}).model_dump()
            ch = r["choices"][0]
            ref = _capped(ref_llm(PROMPT, max_tokens=6, temperature=temp, seed=seed, guidance=g)["choices"][0], 6)
            assert ch["otter"]["tokens"] == ref["otter"]["tokens"], g
            _assert_text(ch, ref)
            np.testing.assert_allclose(np.array(ch["otter"]["signals"], dtype=float),
                                       np.array(ref["otter"]["signals"], dtype=float), **TOL)
            if g.get("trace"):
                got, want = ch["otter"]["guidance"], ref["otter"]["guidance"]
                assert [x["candidates"] for x in got] == [x["candidates"] for x in want]
                assert [x["chosen"] for x in got] == ch["otter"]["tokens"]
                np.testing.assert_allclose([x["rewards"] for x in got], [x["rewards"] for x in want], **TOL)
        plain = ref_llm(PROMPT, max_tokens=6, temperature=0)["choices"][0]["otter"]["tokens"]
        g = {"weight": 3.0, "top_k": 3, "signal": {"tr/token_reward": 0.5, "harmless/reward": 0.5}}
        ref = ref_llm(PROMPT, max_tokens=6, temperature=0, guidance=g)["choices"][0]["otter"]["tokens"]
        assert ref != plain  # the guidance of the first case changes the completion
        # guidance that does not apply to these heads is still a 400 naming why
        st, _, body = _http(s, "POST", "/v1/completions",
                            {"prompt": PROMPT, "max_tokens": 2, "otter": {"guidance": {"signal": "nope"}}})
        assert st == 400 and "unknown signal name 'nope'" in json.loads(body)["error"]["message"]
    finally:
        s.stop()


def test_sidecar_heads_served(gguf_models, tmp_path, adapter_reward1_dir, adapter_reward3_dir):
    """--head: the base plus two Otter adapter GGUFs; signals named head/signal, as the Python API."""
    base = gguf_models.base
    heads, cfg, s = _serve_heads(base, tmp_path, (("r1", adapter_reward1_dir), ("r3", adapter_reward3_dir)))
    try:
        ref_llm = _python_api_path(base, otter_heads=heads, n_seq_max=5)
        names = ["r1/reward", "r3/helpfulness", "r3/harmlessness", "r3/honesty"]
        info = _client(s).models.list().model_dump()["data"][0]["otter"]
        assert info["signal_names"] == names and info["n_out"] == 4
        assert [(h["name"], h["n_out"]) for h in info["heads"]] == [("r1", 1), ("r3", 3)]
        g = {"top_k": 3, "signal": {"r1/reward": 1.0, "r3/honesty": 0.5}, "weight": 2.0}
        for kw in (dict(SAME), dict(temperature=0, extra_body={"repeat_penalty": 1.0, "otter": {"guidance": g}})):
            r = _client(s).completions.create(model=cfg.name, prompt=PROMPT, max_tokens=6, **kw).model_dump()
            o = r["choices"][0]["otter"]
            ref = _capped(ref_llm(PROMPT, max_tokens=6, temperature=0,
                                  guidance=kw["extra_body"].get("otter", {}).get("guidance"))["choices"][0],
                          6)["otter"]
            assert o["signal_names"] == names and o["tokens"] == ref["tokens"]
            np.testing.assert_allclose(o["signals"], ref["signals"], **TOL)
        st, _, body = _http(s, "POST", "/v1/otter/score", {"text": PROMPT})
        np.testing.assert_allclose(json.loads(body)["signals"], ref_llm.score(PROMPT).signals, **TOL)
        _check_head_choice(s, cfg, names)
    finally:
        s.stop()


def _check_head_choice(s, cfg, names):
    """Per-request heads on the r1 + r3 server: ``otter.heads`` and the ``name:head`` model id give
    the all-heads answer less the other head's columns; guidance uses only the chosen heads."""
    c = _client(s)
    assert [m.id for m in c.models.list().data] == [cfg.name, f"{cfg.name}:r1", f"{cfg.name}:r3"]
    full = c.completions.create(model=cfg.name, prompt=PROMPT, max_tokens=5, **SAME).model_dump()["choices"][0]
    r3 = [k for k, n in enumerate(names) if n.startswith("r3/")]
    for kw in (dict(model=cfg.name, extra_body={"repeat_penalty": 1.0, "otter": {"heads": ["r3"]}}),
               dict(model=f"{cfg.name}:r3", extra_body={"repeat_penalty": 1.0})):
        r = c.completions.create(prompt=PROMPT, max_tokens=5, temperature=0, **kw).model_dump()
        o = r["choices"][0]["otter"]
        assert r["model"] == kw["model"] and o["heads"] == ["r3"] and o["tokens"] == full["otter"]["tokens"]
        assert o["signal_names"] == [names[k] for k in r3]
        assert o["signals"] == [[row[k] for k in r3] for row in full["otter"]["signals"]]
        assert [list(d) for d in o["rewards"]] == [o["signal_names"]] * 5
    # guidance with one chosen one-signal head needs no signal name; another head's signal is a 400
    g = {"top_k": 3, "weight": 4.0}
    a = c.completions.create(model=f"{cfg.name}:r1", prompt=PROMPT, max_tokens=5, temperature=0,
                             extra_body={"repeat_penalty": 1.0, "otter": {"guidance": g}}).model_dump()
    b = c.completions.create(model=cfg.name, prompt=PROMPT, max_tokens=5, temperature=0,
                             extra_body={"repeat_penalty": 1.0,
                                         "otter": {"guidance": {**g, "signal": "r1/reward"}}}).model_dump()
    assert a["choices"][0]["otter"]["tokens"] == b["choices"][0]["otter"]["tokens"]
    for body, msg in (({"model": f"{cfg.name}:r1", "otter": {"guidance": {"signal": "r3/honesty", "top_k": 2}}},
                       "otter.guidance: signal 'r3/honesty' is not a signal of the request's heads (r1)"),
                      ({"model": f"{cfg.name}:r1", "otter": {"heads": ["r3"]}}, "give one of them"),
                      ({"model": f"{cfg.name}:r1,r9"}, "model: unknown head 'r9'; the heads of this server are: r1, r3")):
        st, _, out = _http(s, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **body})
        assert st == 400 and msg in json.loads(out)["error"]["message"], out


# ---------------------------------------------------------------------------
# logprobs: llama-cpp-python's values, side by side
# ---------------------------------------------------------------------------
LP_TOL = dict(rtol=0, atol=1e-4)  # the server's decode shapes (n_ctx, batch) differ from the reference's
# the whole prompt in one decode, as the reference decodes it (a reused prefix changes the batch shape)
LP_SAME = dict(temperature=0, extra_body={"repeat_penalty": 1.0, "cache_prompt": False})


@pytest.fixture(scope="module")
def exact_server(gguf_models):
    """A server without the prompt cache (--no-cache-prompt): every request decodes its whole prompt in one
    batch over an otherwise empty KV cache, as the reference does (held cells change the attention's shapes)."""
    cfg, s = _serve(gguf_models.otter("reward3"), cache_prompt=False)
    s.cfg = cfg
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lcp(gguf_models):
    """llama-cpp-python's Llama (logits_all, as its server loads models) on the served file."""
    import llama_cpp

    return llama_cpp.Llama(str(gguf_models.otter("reward3")), logits_all=True, **LLAMA_KW)


def _assert_logprobs(got, want, n):
    """Completion-shaped logprobs equal on the first ``n`` tokens (keys, offsets, values)."""
    for k in ("tokens", "text_offset"):
        assert got[k][:n] == want[k][:n], k
    a, b = got["token_logprobs"][:n], want["token_logprobs"][:n]
    assert [x is None for x in a] == [x is None for x in b]
    np.testing.assert_allclose([x for x in a if x is not None], [x for x in b if x is not None], **LP_TOL)
    for ga, wa in zip(got["top_logprobs"][:n], want["top_logprobs"][:n]):
        assert (ga is None) == (wa is None)
        if ga is not None:
            assert sorted(ga) == sorted(wa)
            np.testing.assert_allclose([ga[k] for k in sorted(ga)], [wa[k] for k in sorted(ga)], **LP_TOL)


def test_completion_logprobs_equal_llama_cpp_python(exact_server, lcp):
    c = _client(exact_server)
    want = lcp.create_completion(PROMPT, max_tokens=8, temperature=0, logprobs=3)["choices"][0]
    r = c.completions.create(model="any", prompt=PROMPT, max_tokens=8, logprobs=3, **LP_SAME).model_dump()["choices"][0]
    lp, o = r["logprobs"], r["otter"]
    n = min(len(lp["tokens"]), len(want["logprobs"]["tokens"]))
    assert n >= 4 and len(lp["tokens"]) == len(o["tokens"]) == 8  # aligned with the otter block
    _assert_logprobs(lp, want["logprobs"], n)
    assert lp["text_offset"][0] == len(PROMPT)
    # top 3 plus the chosen token, keyed by text as llama-cpp-python keys them (pieces may coincide)
    assert all(1 <= len(t) <= 4 for t in lp["top_logprobs"])
    # a greedy choice is the top logprob
    assert all(v == max(t.values()) for v, t in zip(lp["token_logprobs"], lp["top_logprobs"]))
    # streamed chunks concatenate to the same lists
    got = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for ch in c.completions.create(model="any", prompt=PROMPT, max_tokens=8, logprobs=3, stream=True, **LP_SAME):
        d = ch.model_dump()["choices"][0]
        if d["logprobs"]:
            for k in got:
                got[k] += d["logprobs"][k]
            assert len(d["logprobs"]["tokens"]) == len(d["otter"]["tokens"])
    assert got == lp
    # echo: the prompt's tokens first (the first without a value), as llama-cpp-python gives them
    want = lcp.create_completion(PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)["choices"][0]
    r = c.completions.create(model="any", prompt=PROMPT, max_tokens=3, logprobs=2, echo=True,
                             **LP_SAME).model_dump()["choices"][0]
    n_prompt = len(lcp.tokenize(PROMPT.encode(), add_bos=False))
    assert r["logprobs"]["token_logprobs"][0] is None and r["logprobs"]["text_offset"][0] == 0
    _assert_logprobs(r["logprobs"], want["logprobs"], n_prompt + 1)
    # logprobs=0: the chosen token's only
    r = c.completions.create(model="any", prompt=PROMPT, max_tokens=2, logprobs=0, **LP_SAME).model_dump()["choices"][0]
    assert [list(t.values()) for t in r["logprobs"]["top_logprobs"]] == [[v] for v in r["logprobs"]["token_logprobs"]]


def test_chat_logprobs_equal_llama_cpp_python(exact_server, lcp):
    msgs = [{"role": "user", "content": "hello there"}]
    want = lcp.create_chat_completion(msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                      repeat_penalty=1.0)["choices"][0]["logprobs"]["content"]
    c = _client(exact_server)
    r = c.chat.completions.create(model="any", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=2,
                                  **LP_SAME).model_dump()["choices"][0]
    got = r["logprobs"]["content"]
    n = min(len(got), len(want))
    assert n >= 3 and len(got) == len(r["otter"]["tokens"])
    assert [x["token"] for x in got[:n]] == [x["token"] for x in want[:n]]
    np.testing.assert_allclose([x["logprob"] for x in got[:n]], [x["logprob"] for x in want[:n]], **LP_TOL)
    for g, w in zip(got[:n], want[:n]):
        assert {t["token"] for t in g["top_logprobs"]} == {t["token"] for t in w["top_logprobs"]}
    streamed = []
    for ch in c.chat.completions.create(model="any", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=2,
                                        stream=True, **LP_SAME):
        d = ch.model_dump()["choices"][0]
        streamed += (d["logprobs"] or {}).get("content") or []
    assert streamed == got
    r = c.chat.completions.create(model="any", messages=msgs, max_tokens=2, **LP_SAME).model_dump()["choices"][0]
    assert r["logprobs"] is None


# ---------------------------------------------------------------------------
# structured output: response_format through llama-cpp-python's JSON-schema grammar
# ---------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "mood": {"enum": ["calm", "angry"]}},
          "required": ["ok", "mood"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "Reply in JSON."}]


def _json_schema(schema):
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def test_response_format_json_schema_with_rewards(server, py3):
    """OpenAI's json_schema form and llama-cpp-python's json_object + schema give the text
    OtterLlama gives with that response_format; every token of the constrained output has its
    rewards; streamed = not."""
    c = _client(server)
    ref = py3.create_chat_completion(messages=CHAT, max_tokens=60, temperature=0,
                                     response_format={"type": "json_object", "schema": SCHEMA})["choices"][0]
    out = json.loads(ref["message"]["content"])  # the Python API's answer obeys the schema ...
    assert set(out) == {"ok", "mood"} and isinstance(out["ok"], bool) and out["mood"] in ("calm", "angry")
    for rf in (_json_schema(SCHEMA), {"type": "json_object", "schema": SCHEMA}):
        r = c.chat.completions.create(model="any", messages=CHAT, max_tokens=60, response_format=rf,
                                      **SAME).model_dump()["choices"][0]
        assert r["message"]["content"] == ref["message"]["content"] and r["finish_reason"] == "stop"
        o = r["otter"]
        assert o["tokens"] == ref["otter"]["tokens"] and len(o["rewards"]) == len(o["tokens"])
        assert np.isfinite(np.array(o["signals"], dtype=float)).all()
        np.testing.assert_allclose(o["signals"], ref["otter"]["signals"], **TOL)
    chunks = [x.model_dump()["choices"][0] for x in
              c.chat.completions.create(model="any", messages=CHAT, max_tokens=60, stream=True,
                                        response_format=_json_schema(SCHEMA), **SAME)]
    assert "".join(x["delta"].get("content") or "" for x in chunks) == ref["message"]["content"]
    # plain JSON mode: a JSON value, or (cut at max_tokens) the start of one
    r = c.chat.completions.create(model="any", messages=CHAT, max_tokens=12, response_format={"type": "json_object"},
                                  **SAME).model_dump()["choices"][0]
    assert r["message"]["content"].lstrip()[:1] in ("{", "[", '"', "-", "t", "f", "n") or \
        r["message"]["content"].lstrip()[:1].isdigit()


def test_guidance_with_a_grammar_chooses_among_allowed_tokens(server, py3, token_server, py_token):
    """Reward guidance and a grammar together: the candidates are the grammar's allowed tokens
    (scalar ARGS with k candidate sequences, token_reward ARGS and DExperts), the output obeys
    the schema, and the tokens are OtterLlama's for the same request."""
    rf = _json_schema(SCHEMA)
    cases = ((server, py3, {"weight": 2.0, "top_k": 3, "signal": "honesty"}),
             (token_server, py_token, {"weight": 3.0, "top_k": 3}),
             (token_server, py_token, {"weight": 2.0, "mode": "dexperts"}))
    for srv, ref_llm, g in cases:
        r = _client(srv).chat.completions.create(model="any", messages=CHAT, max_tokens=60, response_format=rf,
                                                 temperature=0, extra_body={"repeat_penalty": 1.0,
                                                                            "otter": {"guidance": g}})
        ch = r.model_dump()["choices"][0]
        out = json.loads(ch["message"]["content"])
        assert set(out) == {"ok", "mood"} and out["mood"] in ("calm", "angry"), g
        ref = ref_llm.create_chat_completion(messages=CHAT, max_tokens=60, temperature=0, guidance=g,
                                             response_format={"type": "json_object", "schema": SCHEMA})["choices"][0]
        assert ch["otter"]["tokens"] == ref["otter"]["tokens"] and ch["message"]["content"] == ref["message"]["content"]


@pytest.mark.parametrize("body,msg", [
    ({"response_format": {"type": "xml"}}, "response_format.type must be 'text', 'json_object' or 'json_schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 'type "json_schema" needs a schema'),
    ({"response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""}, "give one of grammar and response_format"),
    ({"response_format": {"type": "json_object", "schema": {"$ref": "#/definitions/nope"}}},
     "this JSON schema cannot be turned into a grammar"),
    ({"response_format": {"type": "json_object", "schema": [1]}}, "the schema must be a JSON object"),
])
def test_bad_response_format_is_a_400(server, body, msg):
    st, _, out = _http(server, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **body})
    assert st == 400 and msg in json.loads(out)["error"]["message"], out


# ---------------------------------------------------------------------------
# n > 1: several choices, each its own sequence with its own otter block
# ---------------------------------------------------------------------------
def test_n_choices_are_the_single_requests_with_seed_plus_index(exact_server):
    c = _client(exact_server)  # (no prompt cache: seeded tokens compared exactly, fewer shapes in play)
    kw = dict(model="any", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=40, extra_body={"repeat_penalty": 1.0})
    r = c.completions.create(n=3, logprobs=1, **kw).model_dump()
    assert [ch["index"] for ch in r["choices"]] == [0, 1, 2]
    singles = [c.completions.create(**{**kw, "seed": 40 + i}).model_dump() for i in range(3)]
    for ch, one in zip(r["choices"], singles):
        o, want = ch["otter"], one["choices"][0]["otter"]
        assert ch["text"] == one["choices"][0]["text"] and o["tokens"] == want["tokens"]
        np.testing.assert_allclose(o["signals"], want["signals"], **TOL)
        assert len(ch["logprobs"]["tokens"]) == len(o["tokens"])
    assert len({tuple(ch["otter"]["tokens"]) for ch in r["choices"]}) > 1  # the seeds differ
    assert r["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert r["usage"]["completion_tokens"] == sum(len(ch["otter"]["tokens"]) for ch in r["choices"])
    # streamed: chunks of every index, each index's text and blocks those of its choice
    texts, toks, reasons = {}, {}, {}
    for x in c.completions.create(n=3, stream=True, **kw):
        d = x.model_dump()["choices"][0]
        texts[d["index"]] = texts.get(d["index"], "") + d["text"]
        toks[d["index"]] = toks.get(d["index"], []) + (d["otter"]["tokens"] if d["otter"] else [])
        if d["finish_reason"]:
            reasons[d["index"]] = d["finish_reason"]
    for i, ch in enumerate(r["choices"]):
        assert texts[i] == ch["text"] and toks[i] == ch["otter"]["tokens"] and reasons[i] == ch["finish_reason"]
    # chat: n messages
    ch = c.chat.completions.create(model="any", messages=CHAT, max_tokens=4, n=2, temperature=0.9, seed=5)
    assert [x.index for x in ch.choices] == [0, 1] and all(x.message.role == "assistant" for x in ch.choices)


# ---------------------------------------------------------------------------
# the prompt cache
# ---------------------------------------------------------------------------
def test_prompt_cache_reuses_prefixes_with_the_rewards_of_a_whole_decode(gguf_models, exact_server):
    """A chat's next turn and a longer prompt reuse the prefix a sequence holds (its side K/V
    included): ``usage.prompt_tokens_details.cached_tokens`` says how many tokens; the rewards and
    tokens are those of the whole-prompt decode (exact_server) at the batch-shape tolerance; the
    cache is LRU over the pool and never holds more than the pool's sequences."""
    cfg, s = _serve(gguf_models.otter("reward3"), parallel=2)
    try:
        c, ref = _client(s), _client(exact_server)
        msgs = [{"role": "user", "content": "Tell me about otters."}]
        diffs = []

        def both(**kw):
            a = c.chat.completions.create(model="any", **kw, **SAME).model_dump()
            b = ref.chat.completions.create(model="any", **kw, **SAME).model_dump()
            oa, ob = a["choices"][0]["otter"], b["choices"][0]["otter"]
            assert oa["tokens"] == ob["tokens"] and a["choices"][0]["message"] == b["choices"][0]["message"]
            np.testing.assert_allclose(oa["signals"], ob["signals"], **TOL)
            diffs.append(float(np.max(np.abs(np.array(oa["signals"]) - np.array(ob["signals"])))))
            assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            return a

        r1 = both(messages=msgs, max_tokens=6)
        msgs2 = msgs + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "And their food?"}]
        r2 = both(messages=msgs2, max_tokens=6)
        cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert r1["usage"]["prompt_tokens"] // 2 < cached < r2["usage"]["prompt_tokens"]
        # LRU: two other prompts take both sequences; the chat's turn then finds nothing to reuse
        # but a token or two at the start, a repeated prompt its own tokens but the last
        for p in ("Numbers: 1 2 3 4", "Zebras run across"):
            c.completions.create(model="any", prompt=p, max_tokens=3, **SAME)
        r3 = c.chat.completions.create(model="any", messages=msgs2, max_tokens=6, **SAME).model_dump()
        assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] <= 2 < cached
        assert r3["choices"][0]["otter"]["tokens"] == r2["choices"][0]["otter"]["tokens"]
        r4 = c.completions.create(model="any", prompt="Zebras run across", max_tokens=3, **SAME).model_dump()
        assert r4["usage"]["prompt_tokens_details"]["cached_tokens"] == r4["usage"]["prompt_tokens"] - 1
        # cache_prompt=false: the whole prompt is decoded
        r5 = c.completions.create(model="any", prompt="Zebras run across", max_tokens=3, temperature=0,
                                  extra_body={"repeat_penalty": 1.0, "cache_prompt": False}).model_dump()
        assert r5["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        eng = s.server.config.app.state.server.engine
        assert len(eng._held) <= 2 and eng.cached_tokens >= cached
        print(f"prompt cache: largest signal difference to a whole decode {max(diffs):.2e}")
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# tools: tool_calls in the message and in stream deltas, with rewards for the call's tokens
# ---------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def tool_server(gguf_models):
    """The tiny model's template has no tools: they go to a system message (~700 tokens of this tokenizer)."""
    cfg, s = _serve(gguf_models.otter("reward3"), parallel=2, ctx_size=1536, n_batch=512)
    s.cfg = cfg
    yield s
    s.stop()


def test_tool_choice_named_and_required_give_schema_valid_calls(tool_server):
    c = _client(tool_server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="any", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=250,
                                  **SAME).model_dump()["choices"][0]
    assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None
    (call,) = r["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")
    o = r["otter"]  # rewards for every token of the call
    assert len(o["tokens"]) == len(o["rewards"]) > 10 and np.isfinite(np.array(o["signals"], dtype=float)).all()
    # streamed: no content delta shows call markup; one delta carries the call; the blocks cover every token
    chunks = [x.model_dump()["choices"][0] for x in c.chat.completions.create(
        model="any", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=250, stream=True, **SAME)]
    assert "".join(x["delta"].get("content") or "" for x in chunks) == ""
    deltas = [d for x in chunks for d in (x["delta"].get("tool_calls") or [])]
    assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == \
        [(0, "get_weather", args)]
    assert chunks[-1]["finish_reason"] == "tool_calls"
    assert _concat([x["otter"] for x in chunks[1:] if x["otter"]])["tokens"] == o["tokens"]
    # required: a call of one of the tools
    r = c.chat.completions.create(model="any", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=250,
                                  **SAME).model_dump()["choices"][0]
    assert r["finish_reason"] == "tool_calls"
    assert r["message"]["tool_calls"][0]["function"]["name"] in ("get_weather", "get_time")
    # the deprecated functions / function_call form is the same request
    f = c.chat.completions.create(model="any", messages=ASK, functions=[t["function"] for t in TOOLS],
                                  function_call={"name": "get_weather"}, max_tokens=250, **SAME).model_dump()
    assert f["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]


def test_tool_choice_auto_parses_what_the_model_writes(tool_server):
    """auto: the model may answer or call; here a grammar makes it write text and a call, which come
    back as content and tool_calls, streamed (content without markup) and not; then the next turn
    (the call sent back with content null, and the tool's result) is accepted."""
    c = _client(tool_server)
    g = 'root ::= "Checking. <tool_call>\\n{\\"name\\": \\"get_time\\", \\"arguments\\": {}}\\n</tool_call>"'
    kw = dict(model="any", messages=ASK, tools=TOOLS, max_tokens=150, temperature=0,
              extra_body={"repeat_penalty": 1.0, "grammar": g})
    r = c.chat.completions.create(**kw).model_dump()["choices"][0]
    assert r["message"]["content"] == "Checking." and r["finish_reason"] == "tool_calls"
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in r["message"]["tool_calls"]] == [("get_time", "{}")]
    chunks = [x.model_dump()["choices"][0] for x in c.chat.completions.create(stream=True, **kw)]
    assert "".join(x["delta"].get("content") or "" for x in chunks).strip() == "Checking."
    assert [d["function"]["name"] for x in chunks for d in (x["delta"].get("tool_calls") or [])] == ["get_time"]
    # with tools and no call, a stream's text is all content, its end included (here the last chunk's own
    # text: "</" may start the template's stop string "</s>", so it comes only with the end)
    text = "Just text, no <tools> here </"
    kw2 = dict(kw, extra_body={"repeat_penalty": 1.0, "grammar": 'root ::= "' + text + '"'})
    chunks = [x.model_dump()["choices"][0] for x in c.chat.completions.create(stream=True, **kw2)]
    assert "".join(x["delta"].get("content") or "" for x in chunks) == text
    assert chunks[-1]["finish_reason"] == "stop"
    assert c.chat.completions.create(**kw2).choices[0].message.content == text
    # without tools the same text is plain content
    plain = c.chat.completions.create(model="any", messages=ASK, max_tokens=150, temperature=0,
                                      extra_body={"repeat_penalty": 1.0, "grammar": g}).model_dump()["choices"][0]
    assert plain["message"]["content"].startswith("Checking. <tool_call>") and plain["finish_reason"] == "stop"
    msg = r["message"]
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": msg["tool_calls"]},
                  {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "12:00"}]
    nxt = c.chat.completions.create(model="any", messages=turn, tools=TOOLS, max_tokens=4, **SAME)
    assert nxt.choices[0].finish_reason in ("length", "stop", "tool_calls")


@pytest.mark.parametrize("body,msg", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "names the function 'nope'"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0] must be"),
    ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "grammar": 'root ::= "a"'}, "give one of grammar and tool_choice"),
    ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "give one of tools and functions"),
])
def test_bad_tool_requests_are_400(tool_server, body, msg):
    st, _, out = _http(tool_server, "POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **body})
    assert st == 400 and msg in json.loads(out)["error"]["message"], out


def test_a_chat_template_that_renders_tools_gets_them(gguf_models):
    """--chat-template-file with a template that renders ``tools`` (as Qwen's and Hermes' do): the
    server finds it renders them, passes them on, and a named call still comes back as tool_calls."""
    tmpl = ("{% if tools %}<|system|>\ntools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n{% endif %}"
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    cfg, s = _serve(gguf_models.otter("reward3"), parallel=2, ctx_size=512, chat_template=tmpl)
    try:
        r = _client(s).chat.completions.create(
            model="any", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=120, **SAME).model_dump()
        srv = s.server.config.app.state.server
        assert srv._template_tools is True
        assert r["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
        # the prompt is the template's own: its tools line, no system message of ours
        assert r["usage"]["prompt_tokens"] == len(srv.llm.tokenize(
            srv.chat_prompt(srv_req(ASK, TOOLS)).prompt.encode(), add_bos=False, special=True))
        prompt = srv.chat_prompt(srv_req(ASK, TOOLS)).prompt
        assert prompt.startswith("<|system|>\ntools: get_weather get_time ") and "# Tools" not in prompt
    finally:
        s.stop()


def srv_req(messages, tools):
    from otter_gguf.server.protocol import ChatRequest

    return ChatRequest(messages=messages, tools=tools)
