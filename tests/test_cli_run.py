"""`otter-gguf run` and `otter-gguf score`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import LLAMA_KW

CTX = ["--ctx-size", "256", "--threads", "1", "--batch-size", "64"]

pytestmark = pytest.mark.runtime


def _cli(*args):
    from otter_gguf.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def reward3_path(gguf_models):
    return str(gguf_models.otter("reward3"))


def test_score_json_is_exactly_the_api_score(reward3_path):
    from otter_gguf import OtterLlama

    r = _cli("score", reward3_path, "--text", "The quick brown fox", "--json", *CTX)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert list(out) == ["tokens", "signals", "signal_names"]
    ref = OtterLlama(reward3_path, **LLAMA_KW).score("The quick brown fox")
    assert out["tokens"] == ref.tokens and out["signal_names"] == ["helpfulness", "harmlessness", "honesty"]
    np.testing.assert_allclose(out["signals"], ref.signals, atol=1e-6)
    r2 = _cli("score", reward3_path, "--tokens", ",".join(map(str, ref.tokens)), "--json", *CTX)
    assert r2.exit_code == 0 and json.loads(r2.stdout) == out
    table = _cli("score", reward3_path, "--tokens", "1,443,260", *CTX)
    assert table.exit_code == 0 and "helpfulness" in table.stdout
    rows = [ln for ln in table.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", ln)]
    assert len(rows) == 3


def test_score_bad_use_exits_2(reward3_path, gguf_models):
    cases = [
        (["--tokens", "1,2,512"], "outside the vocabulary"),
        (["--tokens", "1,-1"], "outside the vocabulary"),
        (["--tokens", "1,x"], "integers"),
        ([], "exactly one of --text or --tokens"),
        (["--text", "a", "--tokens", "1"], "exactly one of --text or --tokens"),
        (["--text", "a", "--cache-type-k", "q9"], "cache-type-k"),
    ]
    for extra, msg in cases:
        r = _cli("score", reward3_path, *extra, *CTX)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
    r = _cli("score", gguf_models.base, "--text", "hello", *CTX)
    assert r.exit_code == 2 and "no Otter head" in r.output
    r = _cli("score", "/nonexistent.gguf", "--text", "hello")
    assert r.exit_code == 2


@pytest.fixture(scope="module")
def greedy_ref(reward3_path):
    """The API's greedy completion of "The quick brown", 6 tokens."""
    from otter_gguf import OtterLlama

    return OtterLlama(reward3_path, **LLAMA_KW)("The quick brown", max_tokens=6, temperature=0)


def test_run_streams_rewards_and_summary(reward3_path, greedy_ref):
    r = _cli("run", reward3_path, "-p", "The quick brown", "-n", "6", "--temp", "0", "--seed", "3",
             "--flash-attn", "off", "--cache-type-k", "f16", "--cache-type-v", "f16", *CTX)
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.stdout.splitlines() if re.match(r"\s+\d+\s+-?\d+\.\d{4}\s", ln)]
    assert len(rows) == 6
    want = greedy_ref["choices"][0]["otter"]["signals"]
    np.testing.assert_allclose([[float(x) for x in row[1:4]] for row in rows], want, atol=1e-4)
    assert re.search(r"helpfulness: mean -?\d+\.\d+\s+min -?\d+\.\d+\s+last -?\d+\.\d+", r.stdout)
    assert re.search(r"tokens: 6 .* tokens/s", r.stdout)


def test_run_json_is_the_api_completion(reward3_path, greedy_ref):
    j = _cli("run", reward3_path, "-p", "The quick brown", "-n", "6", "--temp", "0", "--json", *CTX)
    assert j.exit_code == 0, j.output
    out = json.loads(j.stdout)
    assert out["choices"][0]["otter"]["tokens"] == greedy_ref["choices"][0]["otter"]["tokens"]
    assert out["choices"][0]["text"] == greedy_ref["choices"][0]["text"]


def test_run_guided_tokens_are_the_api_guided_tokens(reward3_path):
    from otter_gguf import Guidance, OtterLlama

    g = _cli("run", reward3_path, "-p", "The quick brown", "-n", "5", "--temp", "0", "--json",
             "--guidance-weight", "3", "--guidance-top-k", "3", "--guidance-signal", "honesty=1",
             "--guidance-signal", "helpfulness=0.5", *CTX)
    assert g.exit_code == 0, g.output
    out = json.loads(g.stdout)["choices"][0]
    llm = OtterLlama(reward3_path, n_seq_max=4, **LLAMA_KW)
    guidance = Guidance(weight=3.0, top_k=3, signal={"honesty": 1.0, "helpfulness": 0.5})
    ref = llm("The quick brown", max_tokens=5, temperature=0, guidance=guidance)["choices"][0]
    plain = llm("The quick brown", max_tokens=5, temperature=0)["choices"][0]
    assert len(out["otter"]["tokens"]) == 5
    assert out["otter"]["tokens"] == ref["otter"]["tokens"] and out["text"] == ref["text"]
    np.testing.assert_allclose(out["otter"]["signals"], ref["otter"]["signals"], atol=1e-5)
    assert ref["otter"]["tokens"] != plain["otter"]["tokens"], "the guidance changes the tokens"


def test_run_color_display(reward3_path):
    c = _cli("run", reward3_path, "-p", "The quick brown", "-n", "4", "--temp", "0", "--display", "color", *CTX)
    assert c.exit_code == 0 and "\x1b[48;2;" in c.stdout


def test_run_bad_use_exits_2(reward3_path, gguf_models):
    base = ["-p", "hi", "-n", "2", *CTX]
    cases = [
        (["--guidance-weight", "nan", "--guidance-signal", "honesty"], "finite"),
        (["--guidance-weight", "inf", "--guidance-signal", "honesty"], "finite"),
        (["--guidance-top-k", "0", "--guidance-signal", "honesty"], "top_k"),
        (["--guidance-weight", "1", "--guidance-signal", "nope"], "unknown signal name 'nope'"),
        (["--guidance-weight", "1"], "--guidance-signal"),
        (["--guidance-mode", "dexperts", "--guidance-signal", "honesty"], "token_reward"),
        (["--flash-attn", "maybe"], "flash-attn"),
    ]
    for extra, msg in cases:
        r = _cli("run", reward3_path, *base, *extra)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
    r = _cli("run", gguf_models.base, *base, "--guidance-weight", "1")
    assert r.exit_code == 2 and "no Otter head" in r.output
    r = _cli("run", gguf_models.base, *base)  # a plain model still runs, without rewards
    assert r.exit_code == 0 and "no Otter head" in r.stdout
