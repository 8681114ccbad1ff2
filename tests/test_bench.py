"""`otter-gguf bench`: the savings arithmetic, and a smoke run on a tiny model (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from otter_gguf.tools import bench

pytestmark = pytest.mark.runtime


@pytest.mark.unit
def test_saving_is_the_papers_definition():
    assert bench.saving(1.0, 10.0) == pytest.approx(0.9)
    assert bench.saving(0.0, 5.0) == 1.0
    assert bench.saving(2.0, 0.0) is None
    assert bench.saving(None, 1.0) is None


@pytest.mark.unit
def test_space_savings_arithmetic():
    b = {"base_file": 1000, "otter_file": 1100, "rm_file": 900, "rm_head": 100, "otter_token_file": 1300}
    s = bench.space_savings(b)
    assert s["extra_bytes_otter"] == 100
    assert s["extra_bytes_rm"] == 1000
    assert s["space_saving"] == pytest.approx(0.9)
    assert s["otter_over_base"] == pytest.approx(0.1)
    assert s["extra_bytes_otter_token"] == 300
    assert s["space_saving_token"] == pytest.approx(0.7)


def _w(decode_ms, prefill_ms):
    return {"decode_ms": decode_ms, "prefill_ms": prefill_ms}


@pytest.mark.unit
def test_time_savings_per_repeat_then_median():
    # ms/token: a 100, b 110, c 200 -> extra b 10, c 100 -> saving 0.9 (repeat 1); a 100, b 120, c 180 -> 0.75
    per = {"a": [_w(100, 10), _w(100, 10)], "b": [_w(110, 11), _w(120, 11)], "c": [_w(200, 20), _w(180, 20)],
           "d_rm": [_w(400, 20), _w(500, 20)], "d_tok": [_w(120, 10), _w(110, 10)]}
    t = bench.time_savings(per)
    assert t["extra_ms_b"]["values"] == pytest.approx([10.0, 20.0])
    assert t["saving_b_vs_c"]["values"] == pytest.approx([0.9, 0.75])
    assert t["saving_b_vs_c"]["median"] == pytest.approx(0.825)
    assert t["saving_b_vs_c"]["min"] == pytest.approx(0.75) and t["saving_b_vs_c"]["max"] == pytest.approx(0.9)
    assert t["saving_prefill_b_vs_c"]["values"] == pytest.approx([0.9, 0.9])
    assert t["saving_dtok_vs_drm"]["values"] == pytest.approx([1 - 20 / 300, 1 - 10 / 400])
    assert t["ratio_b_over_a"]["values"] == pytest.approx([100 / 110, 100 / 120])


@pytest.mark.unit
def test_session_record_uses_medians():
    r = bench.session_record({"steps": [0.1, 0.3, 0.2, 5.0], "prefill": [(10, 1.0), (10, 2.0), (5, 10.0)]})
    assert r["decode_ms"] == pytest.approx(250.0)
    assert r["prefill_ms"] == pytest.approx(200.0)
    assert r["n_decode"] == 4 and r["n_prompt"] == 25


N_PROMPT, N_DECODE = 12, 3


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = d / "r.json"
    from otter_gguf.cli.bench import bench_command

    res = CliRunner().invoke(bench_command, [
        "--quick", "-t", "1", "--cache-dir", str(d / "cache"), "--json", str(out), "--d2", "16,32",
        "--ctx-lengths", "24,48", "--n-prompt", str(N_PROMPT), "--n-decode", str(N_DECODE)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = out.read_text()
    assert str(Path.home()) not in text and sys.prefix not in text, "machine paths in the report"
    return json.loads(text), res.output


def test_quick_report_structure(quick_report):
    rep, text = quick_report
    assert set(rep) >= {"meta", "main", "ctx", "d2"}
    assert rep["meta"]["threads"] == 1 and rep["meta"]["load_before"]
    (run,) = rep["main"]
    assert run["model"] == "tiny" and run["type"] == "q8_0"
    assert set(run["configs"]) == set(bench.CONFIGS)
    for c, st in run["configs"].items():
        for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_mib"):
            assert st[k]["n"] == 1 and st[k]["median"] > 0, (c, k)
        assert len(run["per_repeat"][c]) == 1 and len(run["rss_runs"][c]) == 1
    assert {"decode_b", "saving_b_vs_c", "saving_dtok_vs_drm", "saving_dscalar_vs_drm",
            "space_saving"} <= set(run["targets"])
    for line in ("| (a) base alone", "| (c) base + separate reward model", "extra-space saving",
                 "against context length", "against d2"):
        assert line in text
    (cx,) = rep["ctx"]
    assert [r["depth"] for r in cx["rows"]] == [24, 48]
    (dx,) = rep["d2"]
    assert [r["d2"] for r in dx["rows"]] == [16, 32]


def test_quick_report_token_counts_are_the_requested_ones(quick_report):
    rep, _ = quick_report
    run = rep["main"][0]
    opts = rep["meta"]["options"]
    assert (opts["n_prompt"], opts["n_decode"]) == (N_PROMPT, N_DECODE)
    assert opts["ctx_lengths"] == [24, 48] and opts["d2_values"] == [16, 32]
    for c in bench.CONFIGS:
        (rec,) = run["per_repeat"][c]
        assert (rec["n_prompt"], rec["n_decode"]) == (N_PROMPT, N_DECODE), c
        (rss,) = run["rss_runs"][c]
        assert (rss["n_prompt"], rss["n_decode"], len(rss["tokens"])) == (N_PROMPT, N_DECODE, N_DECODE), c
        assert (rss["spec"]["n_prompt"], rss["spec"]["n_decode"]) == (N_PROMPT, N_DECODE), c


def test_quick_report_bytes_are_the_files(quick_report):
    """The byte counts are the files' sizes and, for the Otter part, the sum of
    the otter_* tensors' bytes read with gguf-py; the RM head is [d] f32."""
    rep, _ = quick_report
    run = rep["main"][0]
    spec, b = run["rss_runs"]["c"][0]["spec"], run["bytes"]
    for key, f in (("base_file", "base"), ("otter_file", "otter"), ("rm_file", "rm"),
                   ("otter_token_file", "otter_token")):
        assert b[key] == os.path.getsize(spec[f]), key
    for key, f in (("otter_tensors", "otter"), ("otter_token_tensors", "otter_token")):
        assert b[key] == sum(int(t.n_bytes) for t in GGUFReader(spec[f]).tensors if "otter_" in t.name), key
    d = GGUFReader(spec["base"]).fields["llama.embedding_length"].contents()
    assert run["d"] == d and b["rm_head"] == 4 * d


def test_quick_report_ratios_and_savings_from_its_numbers(quick_report):
    rep, _ = quick_report
    run = rep["main"][0]
    per, b, sp = run["per_repeat"], run["bytes"], run["space"]
    for c, st in run["configs"].items():
        assert st["decode_tok_s"]["median"] == pytest.approx(1000 / st["decode_ms_per_tok"]["median"]), c
    assert run["time"]["ratio_b_over_a"]["median"] == pytest.approx(per["a"][0]["decode_ms"] / per["b"][0]["decode_ms"])
    extra_otter, extra_rm = b["otter_file"] - b["base_file"], b["rm_file"] + b["rm_head"]
    assert (sp["extra_bytes_otter"], sp["extra_bytes_rm"]) == (extra_otter, extra_rm)
    assert sp["space_saving"] == pytest.approx(1 - extra_otter / extra_rm)
    assert sp["otter_over_base"] == pytest.approx(extra_otter / b["base_file"])
    assert sp["extra_bytes_otter_token"] == b["otter_token_file"] - b["base_file"]
    assert sp["space_saving_token"] == pytest.approx(1 - sp["extra_bytes_otter_token"] / extra_rm)
    for row in rep["d2"][0]["rows"]:
        assert row["ratio_b_over_a"]["median"] == pytest.approx(
            row["decode_tok_s_b"]["median"] / row["decode_tok_s_a"]["median"]), row["d2"]


def test_quick_report_savings_arithmetic(quick_report):
    rep, _ = quick_report
    run = rep["main"][0]
    per, t, b, sp = run["per_repeat"], run["time"], run["bytes"], run["space"]
    a = per["a"][0]["decode_ms"]
    extra = {c: per[c][0]["decode_ms"] - a for c in per}
    for c in per:
        assert t[f"extra_ms_{c}"]["median"] == pytest.approx(extra[c])
    assert t["saving_b_vs_c"]["median"] == pytest.approx(1 - extra["b"] / extra["c"])
    assert t["saving_dtok_vs_drm"]["median"] == pytest.approx(1 - extra["d_tok"] / extra["d_rm"])
    assert t["saving_dscalar_vs_drm"]["median"] == pytest.approx(1 - extra["d_scalar"] / extra["d_rm"])
    # bytes: the files on disk; the RM is the base minus its LM head plus a [d] f32 score head
    assert b["rm_head"] == run["d"] * 4
    assert 0 < b["rm_file"] < b["base_file"] < b["otter_file"] < b["otter_token_file"]
    assert b["otter_tensors"] <= b["otter_file"] - b["base_file"]
    assert sp["space_saving"] == pytest.approx(
        1 - (b["otter_file"] - b["base_file"]) / (b["rm_file"] + b["rm_head"]))
    tg = run["targets"]["decode_b"]
    assert tg["target"] == pytest.approx(
        0.95 * run["configs"]["a"]["decode_tok_s"]["median"] / (1 + sp["otter_over_base"]))
    assert tg["met"] == (tg["value"] >= tg["target"])
    for row in rep["d2"][0]["rows"]:
        s = row["space"]
        assert s["space_saving"] == pytest.approx(1 - s["extra_bytes_otter"] / s["extra_bytes_rm"])
        assert math.isfinite(row["ratio_b_over_a"]["median"])


def test_reward_model_file_has_no_lm_head(quick_report, tmp_path_factory):
    from otter_gguf_converter import inspect_gguf

    rep, _ = quick_report
    run = rep["main"][0]
    for c in ("b", "c", "d_rm", "d_tok", "d_scalar"):
        assert run["rewards"][c] and all(math.isfinite(x) for x in run["rewards"][c]), c
    # the greedy tokens of (a), (a0), (b) and (c) are the same: the main logits are the base's
    toks = {c: run["rss_runs"][c][0]["tokens"] for c in ("a", "a0", "b", "c")}
    assert toks["a"] == toks["a0"] == toks["b"] == toks["c"]
    spec = run["rss_runs"]["c"][0]["spec"]
    info = inspect_gguf(spec["rm"])
    assert info["base"]["architecture"] == "llama-embed"
    # the RM file is the base's tensors, bytes unchanged, minus the LM head; its
    # [d] f32 score head is not a tensor of the file (run["bytes"]["rm_head"])
    base = {t.name: t for t in GGUFReader(spec["base"]).tensors}
    rm = {t.name: t for t in GGUFReader(spec["rm"]).tensors}
    assert "output.weight" in base and "output.weight" not in rm
    assert list(rm) == [n for n in base if n != "output.weight"]
    for n, t in rm.items():
        assert (t.tensor_type, list(t.shape)) == (base[n].tensor_type, list(base[n].shape)), n
        assert bytes(t.data) == bytes(base[n].data), n
    n_vocab = len(GGUFReader(spec["base"]).fields["tokenizer.ggml.tokens"].data)
    assert list(base["output.weight"].shape) == list(rm["token_embd.weight"].shape) == [run["d"], n_vocab]
    assert not [n for n in rm if "otter" in n or n.startswith(("cls", "score"))]


# ---------------------------------------------------------------- the qwen3 / gemma3 bench models
@pytest.mark.unit
def test_issue14_bench_models_and_their_side_shapes():
    q = bench.SHAPES["qwen3-0.6b"]
    assert (q["arch"], q["d"], q["L"], q["h"], q["h_kv"], q["hd"], q["f"], q["V"]) == \
        ("qwen3", 1024, 28, 16, 8, 128, 3072, 151936)
    g = bench.REAL_MODELS["gemma3-270m"]
    assert {"qwen3-0.6b", "gemma3-270m"} <= set(bench.MODELS)
    assert bench.model_arch("qwen3-0.6b") == "qwen3" and bench.model_arch("gemma3-270m") == "gemma3"
    assert bench.model_arch("1b") == "llama"
    # d2 = d/8 rounded up to a multiple of 128 (qwen3: d/8 = 128 as for 1b; Gemma 3 270M: d=640, f=2048,
    # hd=256, d/8 = 80 -> 128): every side row (d + d2, f + f2) fits a quant block (no f16 fallback)
    for d, f, hd, s in ((q["d"], q["f"], q["hd"], q), (640, 2048, 256, g)):
        assert s["d2"] == -(-d // 8 // 128) * 128 and s["f2"] == 4 * s["d2"]
        assert (d + s["d2"]) % 32 == 0 and (f + s["f2"]) % 256 == 0
        assert s["h2"] == -(-s["d2"] // hd) and s["h2_kv"] == 1
    assert (640 + g["d2"]) % 256 == 0  # gemma3: every side row fits q4_k's blocks


@pytest.mark.unit
def test_issue14_bench_refuses_what_it_cannot_run():
    from otter_gguf.cli.bench import bench_command

    for args, msg in ((["--models", "qwen3-0.6b", "--configs", "a,b,c"], "has no separate reward model"),
                      (["--models", "gemma3-270m", "--configs", "a,d_rm"], "has no separate reward model"),
                      (["--models", "gemma3-270m", "--types", "q8_0", "--configs", "a,b"], "expected --types q4_k_m"),
                      (["--models", "qwen3-7b"], "unknown model 'qwen3-7b'")):
        res = CliRunner().invoke(bench_command, args + ["--sections", "main"])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)


TINY_QWEN3 = dict(name="tq3", arch="qwen3", d=64, L=2, h=4, h_kv=2, hd=32, f=128, V=300, tied=True,
                  d2=32, h2=1, h2_kv=1, f2=64)


@pytest.mark.unit
def test_issue14_random_qwen3_base_and_adapter_convert(tmp_path):
    """The random qwen3 base (q/k norms, tied LM head, key length) and its random adapter convert (f16)."""
    from otter_gguf.format.adapter import load_adapter
    from otter_gguf.io.random_base import write_random_base
    from otter_gguf_converter import convert, inspect_gguf

    s = TINY_QWEN3
    base = write_random_base(tmp_path / "base.gguf", s)
    r = GGUFReader(base)
    names = {t.name: list(t.shape) for t in r.tensors}
    assert names["blk.1.attn_q_norm.weight"] == names["blk.1.attn_k_norm.weight"] == [32]
    assert names["blk.0.attn_q.weight"] == [64, 4 * 32] and "output.weight" not in names
    assert int(r.fields["qwen3.attention.key_length"].parts[-1][0]) == 32
    side = {k: s[k] for k in ("d2", "h2", "h2_kv", "f2")}
    ad = bench.write_random_adapter(tmp_path / "ad", s, side, "reward")
    cfg, t = load_adapter(ad)
    assert cfg.base_architecture == "qwen3" and cfg.head_dim == 32
    assert set(t) == set(cfg.required_tensor_shapes())
    out = convert(ad, base, tmp_path / "otter.gguf", outtype="f16", progress=False)
    info = inspect_gguf(out)
    assert info["base"]["architecture"] == "qwen3"
    on = {x["name"] for x in info["otter"]["tensors"]}
    assert {"blk.0.otter_attn_q_norm.weight", "blk.1.otter_attn_k_norm.weight"} <= on, sorted(on)


@pytest.mark.unit
def test_issue14_random_gemma3_adapter_norms_are_stored_as_w(tmp_path):
    """gemma3 applies its norms as 1 + w: the random adapter's norms are 0 (ones as applied), with post norms."""
    from otter_gguf.format.adapter import load_adapter

    s = dict(TINY_QWEN3, arch="gemma3", base_model="g", tied=None)
    ad = bench.write_random_adapter(tmp_path / "ad", s, {k: s[k] for k in ("d2", "h2", "h2_kv", "f2")}, "reward")
    cfg, t = load_adapter(ad)
    assert cfg.base_architecture == "gemma3" and cfg.base_model == "g"
    assert set(t) == set(cfg.required_tensor_shapes())
    norms = [n for n, v in t.items() if v.ndim == 1]
    assert any("post" in n for n in norms) and any("q_norm" in n for n in norms)
    assert all(float(t[n].abs().max()) == 0.0 for n in norms)
    assert max(float(v.std()) for v in t.values() if v.ndim == 2) == pytest.approx(0.02, rel=0.2)
