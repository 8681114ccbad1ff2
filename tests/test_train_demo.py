"""The SmolLM2 demo: its data generator and judge (fast), the committed head (files), and
the demo's label shift on the real model (slow)."""

from __future__ import annotations

import json
import random

import pytest

from otter_gguf.demo import corpus
from otter_gguf.demo import smollm2 as demo
from otter_gguf.demo.smollm2 import data as gen
from otter_gguf.demo.smollm2.run import review_label


@pytest.mark.unit
def test_generated_records_carry_the_corpus_labels(tmp_path):
    rng = random.Random(0)
    for _ in range(50):
        rec = gen.record(rng)
        reply = rec["messages"][-1]["content"]
        assert rec["messages"][-1]["role"] == "assistant" and reply[0].isupper() and reply.endswith(".")
        spans = rec["spans"]
        # contiguous cover of the reply
        assert spans[0][0] == 0 and spans[-1][1] == len(reply)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        # each word's span carries the corpus label after that word
        words = corpus.word_labels(reply.lower())
        for (s, _e, y) in words:
            span = next(sp for sp in spans if sp[0] <= s < sp[1])
            assert span[2] == y
        # the sentence label of the corpus is the sign of the last label of each sentence
        per_sentence = [sp[2] for sp in spans if reply[sp[0]] == "."]
        assert [(y > 0) - (y < 0) for y in per_sentence] == corpus.sentence_labels(reply.lower())
    out = gen.write(tmp_path / "d.jsonl", n=5, seed=3)
    again = gen.write(tmp_path / "e.jsonl", n=5, seed=3)
    assert out.read_text() == again.read_text() and len(out.read_text().splitlines()) == 5


@pytest.mark.unit
def test_review_judge_is_vader():
    """The judge is VADER's verdict (compound score, thresholds +-0.05), not the corpus's lexicon: its own
    words and rules (a clause after "but" weighs more), blind to words outside its lexicon."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for text in ("The food was delicious and the staff were friendly!", "Bland soup, rude waiter, but a lovely view.",
                 "Disappointing pasta", "We ate there on Tuesday.", "The dessert was exceptional",
                 "The food was terrible and the staff were rude."):
        c = vader.polarity_scores(text)["compound"]
        assert review_label(text) == (1 if c >= 0.05 else -1 if c <= -0.05 else 0), (text, c)
    assert review_label("The food was delicious and the staff were friendly!") == 1
    assert review_label("The food was terrible and the staff were rude.") == -1
    assert review_label("Disappointing pasta") == -1 and review_label("We ate there on Tuesday.") == 0
    # where the corpus lexicon says negative (two negative words, one positive), VADER weighs the clause after "but"
    assert review_label("Bland soup, rude waiter, but a lovely view.") == 1


@pytest.mark.unit
def test_committed_head_is_small_and_documented():
    from otter_gguf.format.adapter import open_adapter

    a = open_adapter(demo.ADAPTER_DIR)
    cfg = a.config
    assert cfg.base_architecture == "llama" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    assert cfg.vocab_size == 49152 and cfg.signal_names == ["sentiment"] and cfg.head_kind == "reward"
    size = (demo.ADAPTER_DIR / "otter_model.safetensors").stat().st_size
    assert size < 20 * 2**20
    assert all(a.dtype(n) == "BF16" for n in a.tensor_names)
    metrics = json.loads(demo.METRICS.read_text())
    assert metrics["train_command"] == demo.TRAIN_COMMAND and metrics["data_command"] == demo.DATA_COMMAND
    assert metrics["heldout"]["pearson"] > 0.8
    assert metrics["train_seconds"] < 30 * 60


@pytest.mark.slow
def test_demo_guidance_moves_the_reviews(otter_runtime, tmp_path):
    """On SmolLM2 with the committed head, guidance towards negative sentiment moves the
    sampled sentences from positive to negative as VADER judges them (never the head)."""
    from otter_gguf import Guidance, OtterLlama
    from otter_gguf.demo.smollm2.run import label_shift
    from otter_gguf_converter import convert

    gguf = convert(demo.ADAPTER_DIR, demo.model_path(quiet=True), tmp_path / "d.gguf", outtype="q8_0",
                   progress=False)
    llm = OtterLlama(str(gguf), n_ctx=1024, n_threads=2, verbose=False, n_seq_max=11)
    plain = label_shift(llm, None, 2)
    neg = label_shift(llm, Guidance(weight=-8.0, top_k=10, signal="sentiment"), 2)
    assert plain["positive"] >= 0.5 and neg["positive"] <= plain["positive"] - 0.4, (plain, neg)
    assert neg["negative"] > plain["negative"], (plain, neg)
