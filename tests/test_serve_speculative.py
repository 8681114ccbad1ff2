"""otter-gguf serve speculates (--draft-ngram, --model-draft) inside the continuous batching: a
sequence's pending token and its drafts are rows of the shared batch, each row is sampled as the
non-speculative step would sample it, drafts are kept while they are the chosen tokens, and only
kept rows are read. Greedy answers (plain and token_reward-guided) equal the non-speculative
server's, rewards equal score(), streamed = not, several requests at once with and without."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from helpers import SERVE_SAME as SAME
from helpers import SERVE_TOL as TOL
from helpers import concat_blocks as _concat
from helpers import http_request as _http
from helpers import openai_client as _client
from helpers import serve_tiny as _serve

pytestmark = pytest.mark.runtime

PROMPTS = ["The quick brown", "a b c a b c a b", "Once upon a time"]


@pytest.fixture(scope="module")
def plain(gguf_models):
    cfg, s = _serve(gguf_models.otter("reward3"), parallel=4)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["ngram", "model"])
def spec(request, gguf_models):
    """A server drafting by prompt lookup (3 tokens), or with the tiny base GGUF as draft model (its greedy
    continuation is the served model's: every greedy draft is kept)."""
    kw = dict(draft_ngram=3) if request.param == "ngram" else dict(model_draft=str(gguf_models.base), draft_max=3)
    cfg, s = _serve(gguf_models.otter("reward3"), parallel=4, **kw)
    s.kind = request.param
    yield s
    s.stop()


def _engine(s):
    return s.server.config.app.state.server.engine


def _answer(s, stream=False, **kw):
    c = _client(s)
    args = dict(model="any", max_tokens=12, **SAME)
    args["extra_body"] = {**args["extra_body"], **kw.pop("extra", {})}
    if not stream:
        ch = c.completions.create(stream=False, **args, **kw).model_dump()["choices"][0]
        return ch["text"], ch["otter"], ch["finish_reason"]
    chunks = [x.model_dump()["choices"][0] for x in c.completions.create(stream=True, **args, **kw)]
    return "".join(x["text"] for x in chunks), _concat([x["otter"] for x in chunks if x["otter"]]), \
        chunks[-1]["finish_reason"]


def test_speculative_answers_equal_the_plain_server(spec, plain, py3_score):
    eng = _engine(spec)
    before = (eng.drafted_tokens, eng.accepted_tokens)
    for p in PROMPTS:
        want = _answer(plain, prompt=p)
        for stream in (False, True):
            text, o, reason = _answer(spec, stream=stream, prompt=p)
            assert text == want[0] and o["tokens"] == want[1]["tokens"] and reason == want[2], (spec.kind, p, stream)
            np.testing.assert_allclose(o["signals"], want[1]["signals"], **TOL)
            np.testing.assert_allclose(o["signals"], py3_score(p, o["tokens"]), **TOL)
        stop = want[1]["token_texts"][5]
        if stop.strip():  # a stop string inside the drafts
            text, o, reason = _answer(spec, prompt=p, stop=[stop])
            w = _answer(plain, prompt=p, stop=[stop])
            assert (text, o["tokens"], reason) == (w[0], w[1]["tokens"], w[2])
    drafted, accepted = eng.drafted_tokens - before[0], eng.accepted_tokens - before[1]
    assert drafted > 0  # drafts were verified (prompt lookup's are mostly wrong on the random model)
    if spec.kind == "model":
        assert accepted >= 0.8 * drafted  # the draft is the served model's own greedy continuation
    st, _, body = _http(spec, "GET", "/metrics")
    assert f"otter_draft_tokens_total {eng.drafted_tokens}" in body.decode()


def test_speculative_and_plain_requests_at_once(spec, plain):
    want = {p: _answer(plain, prompt=p) for p in PROMPTS}
    out, errors = {}, []

    def client(i):
        p = PROMPTS[i % len(PROMPTS)]
        try:
            extra = {"speculative": False} if i % 2 else {}
            out[i] = (p, _answer(spec, stream=bool(i % 3 == 0), prompt=p, extra=extra))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(out) == 6
    for p, (text, o, reason) in out.values():
        assert text == want[p][0] and o["tokens"] == want[p][1]["tokens"]
        np.testing.assert_allclose(o["signals"], want[p][1]["signals"], **TOL)


def test_token_reward_guidance_speculates(gguf_models):
    """Guided decoding with a token_reward head reads each verified row's own signal row: the greedy
    guided answer is the non-speculative server's."""
    g = {"otter": {"guidance": {"weight": 3.0, "top_k": 5}}}
    cfg, a = _serve(gguf_models.otter("token_reward"), parallel=2)
    cfg, b = _serve(gguf_models.otter("token_reward"), parallel=2, model_draft=str(gguf_models.base), draft_max=3)
    try:
        for p in PROMPTS:
            want = _answer(a, prompt=p, extra=g)
            got = _answer(b, prompt=p, extra=g)
            assert got[0] == want[0] and got[1]["tokens"] == want[1]["tokens"]
            np.testing.assert_allclose(got[1]["token_rewards"], want[1]["token_rewards"], **TOL)
        assert _engine(b).accepted_tokens > 0
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def py3_score(gguf_models):
    from helpers import LLAMA_KW
    from otter_gguf import OtterLlama

    llm = OtterLlama(str(gguf_models.otter("reward3")), **LLAMA_KW)

    def score(prompt, tokens):
        toks = llm.tokenize(prompt.encode())
        return llm.score(tokens=toks + tokens).signals[len(toks):]

    return score


@pytest.mark.parametrize("body,msg", [
    ({"speculative": {"n_max": 99}}, "speculative.n_max must be an integer in 0..32, got 99"),
    ({"speculative": {"depth": 2}}, "speculative: unknown option(s) 'depth'"),
    ({"speculative": True, "otter": {"guidance": {"top_k": 2, "signal": "honesty"}}},
     "speculative: guidance on a scalar reward signal scores top_k=2 candidates"),
])
def test_bad_speculative_requests_are_400(spec, body, msg):
    st, _, out = _http(spec, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
    assert st == 400 and msg in json.loads(out)["error"]["message"], out


def test_scalar_guidance_on_a_speculative_server_runs_without_drafts(spec, plain):
    g = {"otter": {"guidance": {"top_k": 2, "signal": "honesty", "weight": 2.0}}}
    assert _answer(spec, prompt=PROMPTS[0], extra=g)[1]["tokens"] == _answer(plain, prompt=PROMPTS[0], extra=g)[1]["tokens"]


def test_drafter_settings_are_checked(gguf_models, plain, tmp_path):
    from otter_gguf.io.random_base import write_random_base
    from otter_gguf.server import ServeConfig
    from otter_gguf.server.model import load_drafter

    llm = _engine(plain).llm
    model = str(gguf_models.otter("reward3"))
    other = write_random_base(tmp_path / "v300.gguf", {"d": 64, "L": 1, "h": 2, "h_kv": 1, "f": 128, "V": 300})
    for kw, msg in ((dict(draft_ngram=0), "--draft-ngram must be in 1..32, got 0"),
                    (dict(draft_ngram=2, model_draft=str(other)), "give one of --draft-ngram and --model-draft"),
                    (dict(model_draft=str(other)), f"draft model {other} has a vocabulary of 300 tokens"),
                    (dict(model_draft=str(gguf_models.base), draft_max=40), "--draft-max must be in 1..32")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            load_drafter(ServeConfig(model=model, **kw), llm)
    st, _, out = _http(plain, "POST", "/v1/completions", {"prompt": "x", "speculative": {"n_max": 2}})
    assert st == 400 and "this server has no drafter" in json.loads(out)["error"]["message"]


def test_cli_draft_options_exit_2(gguf_models):
    from click.testing import CliRunner

    from otter_gguf.cli import main

    model = str(gguf_models.otter("reward3"))
    for args, msg in ((["--draft-ngram", "0"], "--draft-ngram"), (["--draft-ngram", "40"], "--draft-ngram"),
                      (["--draft-ngram", "2", "--model-draft", model], "give one of --draft-ngram and --model-draft")):
        r = CliRunner().invoke(main, ["serve", model, *args])
        assert r.exit_code == 2 and msg in r.output, r.output
