"""The quality eval (`otter-gguf eval --quality`, docs/EVAL.md "Quality"): tasks, the reward-model baseline and its
GGUF, and the pipeline end to end on the tiny llama."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from otter_gguf.demo import corpus
from otter_gguf.tools.quality import tasks as T

_WORD = re.compile(r"[A-Za-z']+")


def _words(texts) -> set:
    return {w.lower() for t in texts for w in _WORD.findall(t)}


@pytest.mark.unit
def test_sentiment_heldout_shares_no_template_or_sentiment_word_with_training():
    tr, he = T.sentiment_vocab(False), T.sentiment_vocab(True)
    for field in ("positive", "negative", "subjects", "templates"):
        a, b = set(getattr(tr, field)), set(getattr(he, field))
        assert a and b and not a & b, field
    held = T.sentiment_records(200, 5, True)
    train = T.sentiment_records(200, 4, False)
    held_words = _words(r["messages"][-1]["content"] for r in held)
    train_words = _words(r["messages"][-1]["content"] for r in train)
    sentiment = set(corpus.POLARITY)
    assert held_words & sentiment and train_words & sentiment
    assert not (held_words & train_words & sentiment)          # the words that carry the labels
    assert not {r["messages"][0]["content"] for r in held} & {r["messages"][0]["content"] for r in train}
    # the labels follow the demo's rule: a negative-only reply ends at -1
    for r in held:
        text, spans = r["messages"][-1]["content"], r["spans"]
        assert spans[-1][1] == len(text) and all(-1 <= s[2] <= 1 for s in spans)


@pytest.mark.unit
def test_preference_pairs_follow_the_rule_and_hold_out_entities_and_phrasings():
    train, held = T.preference_records(300, 1, False), T.preference_records(100, 2, True)
    facts = {e: a for k in T._KINDS for e, a in k.facts}

    def entity_of(q: str) -> str:
        return next(e for e in sorted(facts, key=len, reverse=True) if e.lower() in q.lower())

    for recs in (train, held):
        for r in recs:
            q = r["prompt"][0]["content"]
            e = entity_of(q)
            assert T.answers(r["chosen"][0]["content"], e, facts[e])
            assert not T.answers(r["rejected"][0]["content"], e, facts[e])
    ents = [{entity_of(r["prompt"][0]["content"]) for r in recs} for recs in (train, held)]
    assert ents[0] and ents[1] and not ents[0] & ents[1]
    qs = [{re.sub(re.escape(entity_of(r["prompt"][0]["content"])), "X", r["prompt"][0]["content"], flags=re.I)
           for r in recs} for recs in (train, held)]
    assert not qs[0] & qs[1]
    plain = T.preference_records(3, 1, False, chat=False)
    assert all(isinstance(r["prompt"], str) and r["prompt"].startswith("Q: ") for r in plain)
    # the rejected reply is about another entity, whose answer is another
    assert all(entity_of(r["rejected"][0]["content"]) != entity_of(r["prompt"][0]["content"]) for r in held)


@pytest.mark.unit
def test_correctness_pairs_differ_in_the_answer_alone():
    """The rejected reply is the chosen one with another entity's answer of the same split: the same entity,
    phrasing and every other word; no answer word tells right from wrong (each is chosen for some entity and
    rejected for another); the preference task's data are unchanged by the option."""
    facts = {e: a for k in T._KINDS for e, a in k.facts}
    for held in (False, True):
        recs = T.correctness_records(400, 5, held)
        assert recs[0].keys() == {"prompt", "chosen", "rejected"}
        chosen_words, rejected_words = set(), set()
        split_answers = {a for k in T._KINDS for a in {a for _, a in T._split_kind(k, held)[0]}}
        for r in recs:
            q, good, bad = r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]
            e = next(e for e in sorted(facts, key=len, reverse=True) if e.lower() in q.lower())
            assert e.lower() in good.lower() and e.lower() in bad.lower()
            assert T.answers(good, e, facts[e]) and not T.answers(bad, e, facts[e])
            wrong = next(a for a in split_answers if a != facts[e] and T.answers(bad, e, a))
            assert bad.lower().replace(wrong.lower(), facts[e].lower()) == good.lower()
            chosen_words.add(facts[e])
            rejected_words.add(wrong)
        assert len(chosen_words & rejected_words) >= 10
    assert T.preference_records(50, 3, True) == T.preference_records(50, 3, True, rejected="other_question")
    with pytest.raises(ValueError, match="wrong_answer"):
        T.preference_records(1, 0, False, rejected="nope")


@pytest.mark.runtime
def test_base_likelihood_margins_equal_the_pytorch_models(otter_runtime, gguf_models, tmp_path):
    """The untrained reference row of a pairwise task: llama.cpp's log-probability margin of every pair (chosen
    minus rejected, over the tokens after the shared prefix) equals the PyTorch base's (float64 log-softmax of
    the reference model's logits; measured max |diff| 8.2e-3 of margins up to 16 on an AVX-512 CPU); the accuracy is the share of positive margins,
    and swapping chosen and rejected negates every margin."""
    import dataclasses

    from otter_gguf.reference.data import load_jsonl
    from otter_gguf.reference.gguf_base import load_base_gguf
    from otter_gguf.tools.quality.scoring import base_likelihood_accuracy, base_logprob_margins
    from otter_gguf.tools.train import GGUFTokenizer

    base = gguf_models.base
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in T.correctness_records(12, 4, True)))
    ex = load_jsonl(p, GGUFTokenizer(base), objective="pairwise").examples
    got = base_logprob_margins(base, ex)
    model = load_base_gguf(base)

    def lp(tokens, start):
        with torch.no_grad():
            ls = torch.log_softmax(model(tokens).double(), -1)
        return sum(float(ls[i - 1, tokens[i]]) for i in range(start, len(tokens)))

    want = []
    for e in ex:
        start = next(i for i, (a, b) in enumerate(zip(e.tokens, e.rejected)) if a != b)
        assert start > 1 and e.tokens[:start] == e.rejected[:start]
        want.append(lp(e.tokens, start) - lp(e.rejected, start))
    np.testing.assert_allclose(got, want, atol=0.05)
    assert np.abs(got).max() > 1.0
    swapped = [dataclasses.replace(e, tokens=e.rejected, rejected=e.tokens) for e in ex]
    np.testing.assert_allclose(base_logprob_margins(base, swapped), -got, atol=1e-4)
    assert base_likelihood_accuracy(base, ex) == {"accuracy": float(np.mean(got > 0)), "pairs": 12}


def _tiny_sentiment(tmp_path: Path, n: int, heldout: bool) -> Path:
    p = tmp_path / f"s-{heldout}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in T.sentiment_records(n, 3, heldout)))
    return p


@pytest.mark.runtime
def test_reward_model_gguf_scores_equal_its_pytorch_scores(otter_runtime, gguf_models, tmp_path):
    """The baseline trained (top 2 layers + score head), written as a reward-model GGUF: llama.cpp's rewards of
    every position equal the PyTorch model's, to float rounding with the fine-tuned matrices in F32 (measured
    max |diff| / max |r| 1.1e-6), and to the 8-bit rounding of Q8_0, the default (measured 1.2e-2)."""
    from otter_gguf.reference.reward_model_gguf import read_score_head
    from otter_gguf.reference.data import load_jsonl
    from otter_gguf.reference.gguf_base import load_base_gguf
    from otter_gguf.reference.reward_model import new_reward_model
    from otter_gguf.reference.training import fit
    from otter_gguf.tools.quality.baseline import save_gguf
    from otter_gguf.tools.quality.scoring import Scorer
    from otter_gguf.tools.train import GGUFTokenizer

    base = gguf_models.base
    data = load_jsonl(_tiny_sentiment(tmp_path, 24, False), GGUFTokenizer(base))
    model = load_base_gguf(base)
    rm = new_reward_model(model, signal_names=["s"], trainable_layers=2, seed=3)
    before = {k: v.clone() for k, v in rm.tensors.items()}
    frozen = model.weights["model.layers.0.self_attn.q_proj.weight"].clone()
    res = fit(rm, "token_regression", data.examples, steps=8, lr=3e-3, batch_size=4, progress=False, device="cpu")
    assert res.history[-1] < res.history[0]
    assert all(not torch.equal(before[k], v) for k, v in rm.tensors.items())   # every trained tensor moved
    assert torch.equal(model.weights["model.layers.0.self_attn.q_proj.weight"], frozen)
    assert "model.layers.1.self_attn.q_proj.weight" not in rm.tensors           # below the top 2 (of 4): frozen
    for mtype, tol in (("f32", 1e-4), ("q8_0", 0.05)):
        out = save_gguf(rm, base, tmp_path / f"rm-{mtype}.gguf", matrix_type=mtype)
        head = read_score_head(out)
        assert head.signal_names == ["s"] and head.trainable_layers == 2
        sc = Scorer(base, reward_model=out, n_ctx=128, threads=1)
        try:
            for ex in data.examples[:4]:
                got = sc.rewards(ex.tokens)
                with torch.no_grad():
                    want = rm(torch.tensor(ex.tokens)).signals[:, 0].numpy()
                err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                assert err < tol, (mtype, err)
        finally:
            sc.close()


@pytest.mark.runtime
def test_score_head_of_a_file_without_one_is_a_clear_error(otter_runtime, gguf_models, tmp_path):
    from otter_gguf.io.errors import InputError
    from otter_gguf.reference.reward_model_gguf import read_score_head, write_reward_model_gguf

    with pytest.raises(InputError, match="not a reward-model GGUF"):
        read_score_head(gguf_models.base)
    stand_in = write_reward_model_gguf(gguf_models.base, tmp_path / "rm.gguf")  # the bench's: no head
    with pytest.raises(InputError, match="not a reward-model GGUF"):
        read_score_head(stand_in)


@pytest.mark.runtime
def test_quality_pipeline_end_to_end_on_the_tiny_model(otter_runtime, gguf_models, tmp_path):
    """Both tasks, an Otter head and a reward model each, in llama.cpp: the held-out metric the runtime measures
    equals the one PyTorch measured at the end of training (same data, same model), the trained Otter head
    ranks the training distribution better than an untrained one, the costs are the files' and processes'."""
    from otter_gguf.format.adapter import save_adapter
    from otter_gguf.reference.data import load_jsonl
    from otter_gguf.reference.gguf_base import load_base_gguf
    from otter_gguf.reference.model import insert_otter
    from otter_gguf.tools.quality import QualitySettings, run_quality
    from otter_gguf.tools.quality.scoring import Scorer, heldout_metrics
    from otter_gguf.tools.train import GGUFTokenizer
    from otter_gguf_converter import convert

    base = gguf_models.base
    s = QualitySettings(d2=(32,), rm_layers=(2,), steps=40, n_train=96, n_heldout=24, threads=1, guided_prompts=2,
                        guided_max_tokens=4, top_k=3, lr=3e-3)
    rep = run_quality(base, tmp_path / "q", s, log=lambda m: None)
    md = (tmp_path / "q" / "quality.md").read_text()
    assert list(rep["tasks"]) == ["sentiment", "preference", "correctness"]
    for name in ("sentiment", "preference", "correctness"):
        t = rep["tasks"][name]
        if t["objective"] == "pairwise":  # the untrained reference: the base's own likelihood
            assert t["base_likelihood"]["pairs"] == 24 and 0 <= t["base_likelihood"]["accuracy"] <= 1
            assert "its log-likelihood ranks" in md
        assert [r["kind"] for r in t["rows"]] == ["otter", "reward_model"]
        m = t["metric"]
        for r in t["rows"]:
            assert r["extra_bytes"] == Path(r["file"]).stat().st_size and r["peak_rss"] > 50 * 2**20
            assert r["train_seconds"] > 0 and np.isfinite(r["extra_ms_per_token"])
            assert set(r["guided"]) == {"w=+8", "w=-8"} and r["guided"]["w=+8"]["n"] == 2
            assert abs(r["heldout"][m] - r["torch_heldout"][m]) < 0.02, (name, r["name"])
            assert r["name"] in md
        for r in t["rows"]:  # each model's own decode measurement, side by side with the base alone
            ms = r["decode"]["ms_per_token"]
            assert ms["base"] > 0 and ms["otter"] > 0 and ms["base+rm"] > ms["base"]
    # a trained head against an untrained one (as `otter-gguf train` initializes it), on the training distribution
    tok = GGUFTokenizer(base)
    train = load_jsonl(tmp_path / "q" / "work" / "sentiment-train.jsonl", tok).examples[:40]
    cfg, tensors = insert_otter(load_base_gguf(base), d2=32, h2=1, h2_kv=1, f2=32, head_kind="reward",
                                signal_names=["sentiment"], init="copy", seed=0)
    save_adapter(tmp_path / "untrained", cfg, tensors)
    untrained = convert(tmp_path / "untrained", base, tmp_path / "untrained.gguf", sidecar=True, progress=False)
    got = {}
    for name, path in (("trained", Path(rep["tasks"]["sentiment"]["rows"][0]["file"])), ("untrained", untrained)):
        sc = Scorer(base, adapter=path, n_ctx=256, threads=1)
        got[name] = heldout_metrics(sc, "token_regression", train)["pearson"]
        sc.close()
    assert got["trained"] > 0.5 and got["trained"] > got["untrained"] + 0.3, got


@pytest.mark.runtime
def test_quality_cli_refuses_bad_input(otter_runtime, hf_base_gguf, tiny_qwen2_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "otter_gguf.cli", "eval", *args], capture_output=True,
                              text=True)

    r = run(str(tmp_path / "none.gguf"), "--quality", "--tasks", "sentiment,nope")
    assert r.returncode == 2 and "unknown task(s) nope" in r.stderr
    qwen = hf_base_gguf(tiny_qwen2_dir)
    r = run(str(qwen), "--quality", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "a qwen2 base" in r.stderr and "llama" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run(str(qwen), "--quality", "--d2", "32,x")
    assert r.returncode == 2 and "--d2" in r.stderr
    r = run(str(qwen))
    assert r.returncode == 2 and "--adapter" in r.stderr
