"""The embedded demo model: its reward means something, and guidance moves the label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from otter_gguf.demo import DEMO_DIR
from otter_gguf.demo import corpus
from otter_gguf.demo.train import N_HELDOUT_DOCS, SEED, encode

pytestmark = pytest.mark.unit


def test_heldout_reward_correlates_with_true_label() -> None:
    import sentencepiece as spm

    from otter_gguf.reference.model import load_otter

    model = load_otter(DEMO_DIR / "base", DEMO_DIR / "adapter")
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_DIR / "base" / "tokenizer.model"))
    pred, true = [], []
    with torch.no_grad():
        # the first 100 of the held-out documents train.py measured on (seed + 1)
        for doc in corpus.corpus(N_HELDOUT_DOCS, SEED + 1)[:100]:
            ids, offsets = encode(sp, doc)
            pred.extend(model(torch.tensor(ids)).signals[:, 0].tolist())
            true.extend(corpus.token_labels(doc, offsets))
    corr = float(np.corrcoef(pred, true)[0, 1])
    assert corr >= 0.9, f"held-out correlation {corr:.4f} < 0.9"
    recorded = json.loads((DEMO_DIR / "metrics.json").read_text())["heldout_token_correlation"]
    assert abs(corr - recorded) < 0.02, (corr, recorded)


def test_labels_follow_the_words() -> None:
    text = "the food was great but the staff was rude . i think the view is lovely ."
    labels = corpus.word_labels(text)
    assert [lab for *_, lab in labels][:5] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert labels[8][2] == 0.0          # 'rude' after 'great' -> (1 - 1) / 2
    assert corpus.sentence_labels(text) == [0, 1]


@pytest.fixture(scope="module")
def demo_q8(tmp_path_factory):
    from otter_gguf_converter import convert

    out = tmp_path_factory.mktemp("demo") / "demo-q8_0.gguf"
    convert(DEMO_DIR / "adapter", DEMO_DIR / "base", out, outtype="q8_0", base_outtype="q8_0",
            progress=False)
    return out


@pytest.mark.slow
def test_guidance_moves_the_true_label(demo_q8) -> None:
    from otter_gguf import Guidance, OtterLlama
    from otter_gguf.demo.run import _label_share

    llm = OtterLlama(str(demo_q8), n_ctx=256, n_threads=1, verbose=False, n_seq_max=11)
    plain, n = _label_share(llm, None, 2, 16)
    steered, _ = _label_share(llm, Guidance(weight=4.0, top_k=10, signal="sentiment"), 2, 16)
    assert n == 16
    assert steered >= plain + 0.3, f"positive share unguided {plain:.0%}, guided {steered:.0%}"
