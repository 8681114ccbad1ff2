"""`otter-gguf train` on the tiny fixtures: data formats, their errors, the loop, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from otter_gguf.cli import main as cli
from otter_gguf.format.adapter import load_adapter
from otter_gguf.reference.data import HFTokenizer, TrainDataError, detect_objective, load_jsonl, split_heldout
from otter_gguf.reference.model import OtterModel, insert_otter, load_base, load_otter
from otter_gguf.reference.training import evaluate, fit, pad_batch
from otter_gguf.tools.train import TrainSettings, train

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return HFTokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return load_base(tiny_llama_dir)


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _model(base, head_kind="reward", seed=0):
    cfg, t = insert_otter(base, d2=64, h2=1, h2_kv=1, f2=64, head_kind=head_kind, seed=seed)
    return OtterModel(base, cfg, t)


POS, NEG = ["great", "lovely", "fresh"], ["awful", "rude", "stale"]


def _sentiment_records(n, seed=0):
    """Token regression: target +1 / -1 from the adjective on, 0 before it."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        adj = rng.choice(POS if i % 2 == 0 else NEG)
        text = f"the food was {adj} today"
        k = text.index(adj)
        out.append({"text": text, "spans": [[0, k, 0.0], [k, len(text), 1.0 if i % 2 == 0 else -1.0]]})
    return out


# ---------------------------------------------------------------- data formats
def test_objective_follows_the_fields(tmp_path, tok):
    cases = {
        "pairwise": {"prompt": "the food was", "chosen": " great", "rejected": " awful"},
        "token_regression": {"text": "the food was great", "spans": [[13, 18, 1.0]]},
        "sequence_regression": {"text": "the food was great", "target": 0.5},
        "next_token": {"text": "the food was great"},
    }
    for want, rec in cases.items():
        ds = load_jsonl(_jsonl(tmp_path / f"{want}.jsonl", [rec, rec]), tok)
        assert ds.objective == want and len(ds) == 2


def test_spans_label_the_tokens_whose_last_character_they_hold(tmp_path, tok):
    text = "the food was great today"
    ds = load_jsonl(_jsonl(tmp_path / "s.jsonl", [{"text": text, "spans": [[13, 18, 2.5]]}]), tok)
    ex = ds.examples[0]
    ids, offs = tok.encode(text)
    assert ex.tokens == ids
    for (a, b), y in zip(offs, ex.targets):
        inside = b > a and 13 <= b - 1 < 18
        assert (y == 2.5) if inside else math.isnan(y), (text[a:b], y)
    assert sum(y == 2.5 for y in ex.targets) >= 1


def test_tokens_and_targets_are_taken_as_given(tmp_path, tok):
    ds = load_jsonl(_jsonl(tmp_path / "t.jsonl", [{"tokens": [1, 5, 9], "targets": [None, 0.5, -1]}]), tok)
    ex = ds.examples[0]
    assert ex.tokens == [1, 5, 9] and math.isnan(ex.targets[0]) and ex.targets[1:] == [0.5, -1.0]


def test_pairs_concatenate_prompt_and_answer(tmp_path, tok):
    ds = load_jsonl(_jsonl(tmp_path / "p.jsonl", [{"prompt": "the food was", "chosen": " great",
                                                    "rejected": " awful"}]), tok)
    ex = ds.examples[0]
    assert ex.tokens == tok.encode("the food was great")[0]
    assert ex.rejected == tok.encode("the food was awful")[0]


class _ChatTok:
    """The tiny tokenizer with a plain chat template."""

    def __init__(self, tok):
        self.tok, self.vocab_size = tok, tok.vocab_size

    def encode(self, text):
        return self.tok.encode(text)

    def render_chat(self, messages):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def test_messages_render_with_the_template_and_label_the_last_message(tmp_path, tok):
    ct = _ChatTok(tok)
    msgs = [{"role": "user", "content": "review the food"}, {"role": "assistant", "content": "it was great"}]
    text = ct.render_chat(msgs)
    start = text.index("it was great")
    ds = load_jsonl(_jsonl(tmp_path / "m.jsonl", [{"messages": msgs, "spans": [[7, 12, 1.0]]}]), ct)
    ids, offs = ct.encode(text)
    ex = ds.examples[0]
    assert ex.tokens == ids
    for (a, b), y in zip(offs, ex.targets):  # spans index the last message's content
        assert (y == 1.0) == (b > a and start + 7 <= b - 1 < start + 12)
    nt = load_jsonl(_jsonl(tmp_path / "n.jsonl", [{"messages": msgs}]), ct).examples[0]
    # next_token: only positions whose next token ends inside the last message are predicted
    want = [1.0 if offs[p + 1][1] > start else 0.0 for p in range(len(ids) - 1)] + [0.0]
    assert nt.targets == want and 0 < sum(want) < len(ids) - 3


def test_messages_need_a_chat_template(tmp_path, tok):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "target": 1.0}])
    with pytest.raises(TrainDataError, match=r"m\.jsonl:1: .*chat template"):
        load_jsonl(path, tok)


BAD = [
    ("not json", "{\"text\": ", r"not valid JSON"),
    ("not an object", "[1, 2]", r"JSON object"),
    ("no known field", {"foo": 1}, r"no known field"),
    ("missing rejected", {"chosen": "a b"}, r"missing field \"rejected\""),
    ("missing target value", {"text": "the food", "target": "high"}, r"\"target\" must be a finite number"),
    ("empty text", {"text": "  ", "target": 1.0}, r"\"text\" is empty"),
    ("span out of range", {"text": "the food", "spans": [[2, 40, 1.0]]}, r"out of range for a text of 8"),
    ("span reversed", {"text": "the food", "spans": [[5, 2, 1.0]]}, r"out of range"),
    ("span not a triple", {"text": "the food", "spans": [[0, 2]]}, r"\[start_char, end_char, target\]"),
    ("spans overlap", {"text": "the food was", "spans": [[0, 5, 1], [3, 8, 1]]}, r"overlap"),
    ("labels of the wrong length", {"tokens": [1, 2, 3], "targets": [0.0, 1.0]}, r"2 labels for 3 tokens"),
    ("token out of vocab", {"tokens": [1, 99999], "targets": [0, 1]}, r"not a token id"),
    ("nan target", {"tokens": [1, 2], "targets": [0, "x"]}, r"finite number"),
    ("all targets null", {"tokens": [1, 2], "targets": [None, None]}, r"every target is null"),
    ("text and messages", {"text": "a", "messages": [], "spans": [[0, 1, 1]]}, r"either \"text\" or \"messages\""),
]


GOOD = {
    "pairwise": {"chosen": "a", "rejected": "b"},
    "token_regression": {"text": "the food was great", "spans": [[13, 18, 1.0]]},
    "sequence_regression": {"text": "the food was great", "target": 1.0},
}


@pytest.mark.parametrize("what,bad,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_the_file_and_line(tmp_path, tok, what, bad, msg):
    kind = detect_objective(bad) if isinstance(bad, dict) else None
    good = GOOD.get(kind, GOOD["sequence_regression"])
    path = _jsonl(tmp_path / "bad.jsonl", [good, "", bad])
    with pytest.raises(TrainDataError, match=rf"bad\.jsonl:3: .*{msg}"):
        load_jsonl(path, tok)


def test_mixed_objectives_and_unknown_objective(tmp_path, tok):
    path = _jsonl(tmp_path / "mix.jsonl", [{"text": "a b", "target": 1.0}, {"chosen": "a", "rejected": "b"}])
    with pytest.raises(TrainDataError, match=r"mix\.jsonl:2: this record is pairwise data but the file's "
                                             r"objective is sequence_regression"):
        load_jsonl(path, tok)
    with pytest.raises(TrainDataError, match=r"unknown objective 'ranking'"):
        load_jsonl(path, tok, objective="ranking")
    with pytest.raises(TrainDataError, match=r"more than max_length 3"):
        load_jsonl(_jsonl(tmp_path / "long.jsonl", [{"text": "the food was great today", "target": 1}]), tok,
                   max_length=3)


def test_heldout_split_is_seeded_and_disjoint(tmp_path, tok):
    ds = load_jsonl(_jsonl(tmp_path / "d.jsonl", _sentiment_records(20)), tok)
    a_tr, a_he = split_heldout(ds, 0.2, seed=3)
    b_tr, b_he = split_heldout(ds, 0.2, seed=3)
    assert [e.line for e in a_he] == [e.line for e in b_he] and len(a_he) == 4 and len(a_tr) == 16
    assert not {e.line for e in a_he} & {e.line for e in a_tr}


# ---------------------------------------------------------------- the loop
def test_right_padding_is_exact(base):
    m = _model(base)
    seqs = [[1, 5, 9, 13, 2], [1, 7], [1, 3, 4]]
    toks, lens = pad_batch(seqs)
    assert toks.shape == (3, 5) and lens.tolist() == [5, 2, 3]
    with torch.no_grad():
        batched = m(toks).signals
        for i, s in enumerate(seqs):
            alone = m(torch.tensor(s)).signals
            torch.testing.assert_close(batched[i, : len(s)], alone, rtol=1e-5, atol=1e-5)


def test_token_regression_learns_and_reports_correlations(tmp_path, tok, base):
    ds = load_jsonl(_jsonl(tmp_path / "d.jsonl", _sentiment_records(48)), tok)
    tr, he = split_heldout(ds, 0.25, seed=0)
    m = _model(base)
    before = evaluate(m, ds.objective, he.examples)
    res = fit(m, ds.objective, tr.examples, he.examples, steps=40, lr=1e-3, batch_size=6, progress=False)
    assert res.metrics["pearson"] > 0.95 > abs(before["pearson"]) + 0.3
    assert res.metrics["spearman"] > 0.8 and res.metrics["mse"] < 0.1 * before["mse"]
    assert np.mean(res.history[-5:]) < 0.1 * np.mean(res.history[:5])
    # the base is untouched
    for k, v in load_base(tok.tok.name_or_path).weights.items():
        torch.testing.assert_close(base.weights[k], v, rtol=0, atol=0)


def test_pairwise_learns_to_rank(tmp_path, tok, base):
    recs = [{"prompt": f"the {s} was", "chosen": f" {p}", "rejected": f" {n}"}
            for s in ("food", "room", "staff", "view") for p in POS for n in NEG]
    ds = load_jsonl(_jsonl(tmp_path / "p.jsonl", recs), tok)
    tr, he = split_heldout(ds, 0.25, seed=1)
    m = _model(base)
    res = fit(m, "pairwise", tr.examples, he.examples, steps=30, lr=1e-3, batch_size=6, progress=False)
    assert res.metrics["accuracy"] == 1.0 and res.metrics["mean_margin"] > 1.0


def test_sequence_regression_and_next_token(tmp_path, tok, base):
    recs = [{"text": f"the food was {a}", "target": 1.0 if a in POS else -1.0} for a in POS + NEG] * 3
    ds = load_jsonl(_jsonl(tmp_path / "s.jsonl", recs), tok)
    m = _model(base)
    res = fit(m, ds.objective, ds.examples, ds.examples, steps=30, lr=1e-3, batch_size=6, progress=False)
    assert res.metrics["pearson"] > 0.95
    # next_token: a token_reward head learns the data's next tokens (below the base's own loss)
    ds = load_jsonl(_jsonl(tmp_path / "n.jsonl", [{"text": f"the food was {a}"} for a in POS] * 4), tok)
    m = _model(base, head_kind="token_reward")
    before = evaluate(m, "next_token", ds.examples)
    res = fit(m, "next_token", ds.examples, ds.examples, steps=30, lr=3e-3, batch_size=4, progress=False)
    assert res.metrics["loss"] < 0.5 * before["loss"] and res.metrics["loss"] < res.metrics["base_loss"]
    with pytest.raises(ValueError, match="token_reward head"):
        fit(_model(base), "next_token", ds.examples, steps=1, progress=False)


def test_resume_continues_exactly(tmp_path, tok, base):
    ds = load_jsonl(_jsonl(tmp_path / "d.jsonl", _sentiment_records(12)), tok)
    kw = dict(steps=6, lr=1e-3, batch_size=4, seed=5, progress=False)
    straight = _model(base)
    r0 = fit(straight, ds.objective, ds.examples, **kw)
    ck = tmp_path / "ck.pt"
    first = _model(base)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(first, ds, ck, kw, 3)
    resumed = _model(base)
    r1 = fit(resumed, ds.objective, ds.examples, checkpoint=ck, checkpoint_every=3, resume=True, **kw)
    assert r1.history == r0.history
    for k in straight.tensors:
        torch.testing.assert_close(resumed.tensors[k], straight.tensors[k], rtol=0, atol=0)
    other = dict(kw, seed=6)
    with pytest.raises(ValueError, match="different run .*seed"):
        fit(_model(base), ds.objective, ds.examples, checkpoint=ck, resume=True, **other)


def _interrupt_after(model, ds, ck, kw, n):
    """Run fit and stop it (KeyboardInterrupt) once the checkpoint after ``n`` steps exists."""
    from otter_gguf.reference import training

    real = training._save_checkpoint

    def save(path, state):
        real(path, state)
        if state["step"] >= n:
            raise KeyboardInterrupt

    training._save_checkpoint = save
    try:
        fit(model, ds.objective, ds.examples, checkpoint=ck, checkpoint_every=n, **kw)
    finally:
        training._save_checkpoint = real


# ---------------------------------------------------------------- API and CLI
def test_train_api_writes_an_adapter_that_loads(tmp_path, tiny_llama_dir):
    data = _jsonl(tmp_path / "d.jsonl", _sentiment_records(24))
    out = tmp_path / "head"
    rep = train(tiny_llama_dir, data, out, TrainSettings(steps=25, lr=1e-3, batch_size=6, d2=64, f2=64,
                                                          signal_name="sentiment", heldout=0.25),
                progress=False, log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["otter_config.json", "otter_model.safetensors",
                                                     "train_metrics.json"]
    cfg, _ = load_adapter(out)
    assert cfg.signal_names == ["sentiment"] and cfg.otter_hidden_size == 64 and cfg.head_kind == "reward"
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["heldout"] == rep["heldout"] and rep["heldout"]["pearson"] > 0.9
    # the saved (bf16) adapter gives the held-out metric it reported, within bf16 rounding
    m = load_otter(tiny_llama_dir, out)
    ds = load_jsonl(data, HFTokenizer(tiny_llama_dir))
    _, he = split_heldout(ds, 0.25, seed=0)
    again = evaluate(m, ds.objective, he.examples)
    assert abs(again["pearson"] - rep["heldout"]["pearson"]) < 0.01


def test_cli_bad_data_exits_2_and_leaves_nothing(tmp_path, tiny_llama_dir):
    data = _jsonl(tmp_path / "d.jsonl", _sentiment_records(3) + [{"text": "the food", "spans": [[0, 99, 1]]}])
    out = tmp_path / "head"
    r = CliRunner().invoke(cli, ["train", str(tiny_llama_dir), str(data), "-o", str(out), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "d.jsonl:4: \"spans\"[0] [0, 99] is out of range" in r.output
    assert not out.exists() and not list(tmp_path.glob(".head*"))


def test_cli_refuses_existing_output_and_unknown_base(tmp_path, tiny_llama_dir):
    data = _jsonl(tmp_path / "d.jsonl", _sentiment_records(4))
    out = tmp_path / "head"
    out.mkdir()
    (out / "keep").write_text("x")
    r = CliRunner().invoke(cli, ["train", str(tiny_llama_dir), str(data), "-o", str(out)])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    assert (out / "keep").read_text() == "x"
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "nope"), str(data), "-o", str(tmp_path / "h2")])
    assert r.exit_code == 2 and "no such file or directory" in r.output
    r = CliRunner().invoke(cli, ["train", str(tiny_llama_dir), str(data), "-o", str(tmp_path / "h3"),
                                 "--d2", "9999"])
    assert r.exit_code == 2 and "copy init needs d2 <= d" in r.output


def test_cli_trains_and_reports(tmp_path, tiny_llama_dir):
    data = _jsonl(tmp_path / "d.jsonl", _sentiment_records(16))
    out = tmp_path / "head"
    r = CliRunner().invoke(cli, ["train", str(tiny_llama_dir), str(data), "-o", str(out), "--steps", "4",
                                 "--batch-size", "4", "--d2", "64", "--f2", "64", "--no-progress",
                                 "--checkpoint", str(tmp_path / "ck.pt")])
    assert r.exit_code == 0, r.output
    assert "token_regression, held-out tokens" in r.output and (out / "otter_model.safetensors").is_file()
    assert (tmp_path / "ck.pt").is_file()
