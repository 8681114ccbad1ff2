"""`otter-gguf eval`: metrics against hand-computed values, outputs, bad input.

The metric tests are plain numpy. The end-to-end tests run the eval on the
tiny fixtures (few prompts, one or two types) and need the patched runtime.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from otter_gguf.cli import main
from otter_gguf.io.llama_quantize import quantize
from otter_gguf.tools import eval as ev

import eval_regression as reg

pytestmark = pytest.mark.unit

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads a short sentence and scores it.",
    "Rain fell on the river bank all night long.",
    "She said the bread was fresh and the coffee warm.",
]


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------
def test_kl_divergence_known_distributions():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    ref = np.array([[0.0, 0.0]])
    q = np.log(np.array([[0.25, 0.75]]))
    want = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert ev.kl_divergence(ref, q)[0] == pytest.approx(want, rel=1e-12)
    # logits, not probabilities: a constant shift changes nothing; identical -> 0
    assert ev.kl_divergence(ref + 7.0, q - 3.0)[0] == pytest.approx(want, rel=1e-12)
    assert ev.kl_divergence(q, q)[0] == pytest.approx(0.0, abs=1e-15)
    # p = (0.8, 0.1, 0.1), q uniform: KL = ln 3 - H(p)
    p = np.array([0.8, 0.1, 0.1])
    rows = ev.kl_divergence(np.log(np.stack([p, p])), np.zeros((2, 3)))
    want2 = math.log(3) + float(np.sum(p * np.log(p)))
    np.testing.assert_allclose(rows, [want2, want2], rtol=1e-12)
    # direction: KL(p || q) != KL(q || p)
    assert ev.kl_divergence(q, ref)[0] != pytest.approx(want, rel=1e-3)


def test_ranking_agreement_known_pairs():
    ref = [1.0, 2.0, 3.0, 3.0]
    other = [1.0, 3.0, 2.0, 5.0]
    # pairs with distinct reference values: (0,1) (0,2) (0,3) (1,2) (1,3); (2,3) is a tie.
    # only (1,2) is ordered the other way -> 4/5
    agree, n = ev.ranking_agreement(ref, other)
    assert n == 5 and agree == pytest.approx(0.8)
    # a tie in `other` is a disagreement
    agree, n = ev.ranking_agreement([0.0, 1.0], [2.0, 2.0])
    assert (agree, n) == (0.0, 1)
    # no pairs at all
    assert ev.ranking_agreement([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == (None, 0)
    # all pairs of distinct values: n(n-1)/2
    r = np.arange(10.0)
    assert ev.ranking_agreement(r, r * 3 + 1) == (1.0, 45)
    assert ev.ranking_agreement(r, -r) == (0.0, 45)


def test_spearman_hand_values():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = 1..5, b = 1,2,3.5,5,3.5 (tie averaged):
    # centred -2..2 and -2,-1,.5,2,.5: Pearson = 8 / sqrt(10 * 9.5)
    assert ev.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(10 * 9.5))
    assert ev.spearman([1, 1, 1], [1, 2, 3]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50).round(1)
    assert ev.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, rel=1e-12)


def test_signal_errors_hand_values():
    ref = np.array([0.0, 2.0, 4.0, 2.0])  # population std: sqrt(2)
    other = ref + np.array([0.1, -0.3, 0.0, 0.2])
    m = ev.signal_errors(ref, other)
    s = math.sqrt(2.0)
    assert m["mean_abs"] == pytest.approx(0.15)
    assert m["max_abs"] == pytest.approx(0.3)
    assert m["mean_abs_rel"] == pytest.approx(0.15 / s)
    assert m["max_abs_rel"] == pytest.approx(0.3 / s)
    # ranks 1, 2.5, 4, 2.5 vs 1, 2, 4, 3: Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert m["spearman"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    m = ev.signal_errors(ref, other, std=0.5)
    assert m["max_abs_rel"] == pytest.approx(0.6)
    assert ev.signal_errors([1.0, 1.0], [1.0, 2.0])["mean_abs_rel"] is None


def test_parse_types_and_prompts(tmp_path):
    assert ev.parse_types("F16, q8_0,q8_0,,q4_k_m") == ["f16", "q8_0", "q4_k_m"]
    assert ev.parse_types(ev.DEFAULT_TYPES) == list(ev.DEFAULT_TYPES)
    for bad in ("q9_9", "", "iq2_xxs"):
        with pytest.raises(ev.EvalError):
            ev.parse_types(bad)
    p = tmp_path / "p.txt"
    p.write_text("# comment\n\nfirst text\n  second text  \n", encoding="utf-8")
    assert ev.load_prompts(p) == ["first text", "second text"]
    p.write_text("only one\n", encoding="utf-8")
    with pytest.raises(ev.EvalError, match="at least 2"):
        ev.load_prompts(p)
    default = ev.load_prompts()
    assert 40 <= len(default) <= 60


def _fake_report(mean=0.001, mx=0.005, rank=1.0, kld=1e-4):
    sizes = {"file_bytes": 2**20, "base_bytes": 100, "base_params": 100, "base_bpw": 8.0,
             "otter_bytes": 50, "otter_params": 50, "otter_bpw": 8.0, "total_bpw": 8.0}
    t = {"sizes": sizes,
         "signals": {"s": {"mean_abs_rel": mean, "max_abs_rel": mx, "spearman": 0.9999,
                           "rank_agreement": rank, "n_pairs": 10}},
         "worst": {"mean_abs_rel": mean, "max_abs_rel": mx, "spearman": 0.9999, "rank_agreement": rank},
         "logits": {"kld_mean": kld, "kld_p99": 3 * kld, "top1": 0.99}}
    return {"reference": {"is_otter": False}, "types": {"q8_0": t}}


def test_compare_with_baseline_and_targets():
    base = _fake_report()
    assert reg.compare_with_baseline(base, base) == []
    rank_slack = reg.REGRESSION_TOLERANCES["rank_agreement"][1]
    worse = _fake_report(mean=0.003, rank=1.0 - 2 * rank_slack, kld=1e-3)
    fails = reg.compare_with_baseline(worse, base)
    assert any("mean_abs_rel" in f for f in fails)
    assert any("rank_agreement" in f for f in fails)
    assert any("kld_mean" in f for f in fails)
    # within tolerance: 20% worse mean error, half the slack less agreement
    assert reg.compare_with_baseline(_fake_report(mean=0.0012, rank=1.0 - rank_slack / 2), base) == []
    # sizes must match exactly
    other = _fake_report()
    other["types"]["q8_0"]["sizes"]["otter_bytes"] = 51
    assert any("otter_bytes" in f for f in reg.compare_with_baseline(other, base))
    missing = {"reference": {}, "types": {}}
    assert any("missing" in f for f in reg.compare_with_baseline(missing, base))
    # absolute targets
    assert reg.check_targets(base, {"q8_0": reg.TARGETS["q8_0"]}) == []
    fails = reg.check_targets(_fake_report(mx=0.02, kld=2e-3), {"q8_0": reg.TARGETS["q8_0"]})
    assert len(fails) == 2 and "max_abs_rel" in fails[0] and "kld_mean" in fails[1]
    assert reg.check_targets(base) == ["q4_k_m: not evaluated (targets: "
                                      f"{reg.TARGETS['q4_k_m']})"]


# ---------------------------------------------------------------------------
# end to end on the tiny fixtures (patched runtime)
# ---------------------------------------------------------------------------
def test_gguf_sizes(gguf_models):
    sizes = ev.gguf_sizes(gguf_models.otter("reward1"))
    assert sizes["base_bpw"] == 32.0 and sizes["otter_bpw"] == 32.0
    assert sizes["base_bytes"] == sizes["base_params"] * 4
    assert sizes["file_bytes"] > sizes["base_bytes"] + sizes["otter_bytes"]
    plain = ev.gguf_sizes(gguf_models.base)
    assert plain["otter_bytes"] == 0 and plain["otter_bpw"] is None
    assert plain["base_bytes"] == sizes["base_bytes"]


@pytest.mark.runtime
def test_eval_cli_end_to_end(gguf_models, adapter_reward3_dir, tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [
        "eval", str(gguf_models.otter("reward3")), "--adapter", str(adapter_reward3_dir),
        "--base", str(tiny_llama_dir), "--types", "q8_0,q4_0", "--prompts", str(prompts),
        "--out", str(out), "-t", "1", "--kv-type", "f32", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "| q8_0 |" in res.output and "| q4_0 |" in res.output and "| f32 (MODEL.gguf) |" in res.output
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    md = (out / "eval.md").read_text(encoding="utf-8")
    assert ev.format_table(report) in md
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["signal_names"] == ["helpfulness", "harmlessness", "honesty"]
    assert report["prompts"]["n"] == 4 and set(report["types"]) == {"q8_0", "q4_0"}
    # the f32 Otter GGUF reproduces the PyTorch reference (f32 KV cache): positions line up
    ref = report["reference"]
    assert ref["is_otter"] and ref["base_type"] == "f32"
    assert ref["worst"]["max_abs_rel"] < 1e-3 and ref["worst"]["spearman"] > 0.99999
    assert ref["vs_torch_logits"]["kld_mean"] < 1e-5
    for name, m in ref["signals"].items():
        assert m["n_pairs"] == 6 and m["rank_agreement"] == 1.0
    q8, q4 = report["types"]["q8_0"], report["types"]["q4_0"]
    assert 8.4 < q8["sizes"]["otter_bpw"] < 8.6 and 4.4 < q4["sizes"]["otter_bpw"] < 4.7
    assert q8["logits"]["n_tokens"] == report["prompts"]["n_tokens"] - 4
    # q4_0 is worse than q8_0 on every error metric
    assert q4["worst"]["mean_abs_rel"] > q8["worst"]["mean_abs_rel"] > 0
    assert q4["logits"]["kld_mean"] > q8["logits"]["kld_mean"] > 0
    assert 0 < q8["logits"]["kld_p99"] and 0 < q8["logits"]["top1"] <= 1


@pytest.mark.runtime
def test_eval_plain_model_token_reward_head(gguf_models, adapter_token_reward_dir, tiny_llama_dir, tmp_path):
    report = ev.evaluate(gguf_models.base, adapter_token_reward_dir, tiny_llama_dir, types=["f16"],
                         prompts=PROMPTS[:3], threads=1, progress=False)
    assert report["signal_names"] == ["token_reward"]
    assert not report["reference"]["is_otter"] and "signals" not in report["reference"]
    f16 = report["types"]["f16"]
    assert f16["signals"]["token_reward"]["n_pairs"] == 3
    assert f16["worst"]["max_abs_rel"] < 0.05 and f16["logits"]["kld_mean"] < 1e-3
    paths = ev.write_outputs(report, tmp_path / "o")
    assert "| f16 |" in paths["md"].read_text(encoding="utf-8") and paths["png"].stat().st_size > 1000


# ---------------------------------------------------------------------------
# bad input -> exit 2
# ---------------------------------------------------------------------------
def _run(args):
    return CliRunner().invoke(main, ["eval", *map(str, args), "--no-progress"])


@pytest.mark.runtime
def test_bad_inputs_exit_2(gguf_models, adapter_reward1_dir, adapter_reward3_dir, tiny_llama_dir, tmp_path):
    model = gguf_models.otter("reward1")
    ok = ["--adapter", adapter_reward1_dir, "--base", tiny_llama_dir]
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello", encoding="utf-8")
    one = tmp_path / "one.txt"
    one.write_text("# only one prompt\njust this\n", encoding="utf-8")
    a_file = tmp_path / "afile"
    a_file.write_text("", encoding="utf-8")
    cases = [
        ([tmp_path / "missing.gguf", *ok], "does not exist"),
        ([tmp_path, *ok], "is a directory"),
        ([not_gguf, *ok], "not a GGUF file"),
        ([model, *ok, "--types", "q8_0,q9_k"], "unknown type"),
        ([model, *ok, "--prompts", tmp_path / "nope.txt"], "does not exist"),
        ([model, *ok, "--prompts", one], "at least 2"),
        ([model, *ok, "--out", a_file], "not a directory"),
        ([model, "--adapter", tmp_path, "--base", tiny_llama_dir], "otter_config.json"),
        ([model, "--adapter", adapter_reward1_dir, "--base", tmp_path], "config.json"),
        ([model, "--adapter", adapter_reward3_dir, "--base", tiny_llama_dir], "signals"),
        ([model, "--base", tiny_llama_dir], "--adapter"),
    ]
    for args, msg in cases:
        res = _run(args)
        assert res.exit_code == 2, (args, res.output, res.exception)
        assert msg in res.output, (args, res.output)


@pytest.mark.runtime
def test_quantized_model_is_refused(gguf_models, adapter_reward1_dir, tiny_llama_dir, tmp_path):
    q = tmp_path / "base-q8_0.gguf"
    quantize(gguf_models.base, q, "q8_0", threads=1)
    res = _run([q, "--adapter", adapter_reward1_dir, "--base", tiny_llama_dir])
    assert res.exit_code == 2 and "unquantized" in res.output, res.output


@pytest.mark.runtime
def test_model_of_another_base_is_refused(gguf_models, adapter_reward1_dir, tmp_path):
    """MODEL.gguf must be the --base model: same shapes but other weights -> exit 2."""
    from otter_gguf.reference import fixtures as fx

    other = fx.make_tiny_llama(tmp_path / "other-llama", seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n", encoding="utf-8")
    res = _run([gguf_models.base, "--adapter", adapter_reward1_dir, "--base", other, "--prompts", prompts,
                "--types", "q8_0", "--out", tmp_path / "o", "-t", "1"])
    assert res.exit_code == 2 and "is not the --base model" in res.output, res.output
