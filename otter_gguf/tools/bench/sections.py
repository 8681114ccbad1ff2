"""The benchmark sections: the configurations table, context length and d2 sweeps, the graph profile."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from otter_gguf.format.constants import Keys
from otter_gguf.tools.bench.models import ModelSet, log, warm_page_cache
from otter_gguf.tools.bench.stats import config_stats, saving, session_record, space_savings, summarize, time_savings
from otter_gguf.tools.bench.worker import run_in_subprocess


# ---------------------------------------------------------------------------
# the benchmark sections
# ---------------------------------------------------------------------------
def _spec(ms: ModelSet, cfg: str, **kw) -> dict:
    s = dict(config=cfg, base=str(ms.base), otter=str(ms.otter), rm=str(ms.rm),
             otter_token=str(ms.otter_token) if ms.otter_token else None)
    s.update(kw)
    return s


def _session(runs: Dict[str, dict], *, repeats: int, label: str, **kw) -> List[dict]:
    """``repeats`` interleaved sessions (one process each) of the configurations in ``runs``."""
    out = []
    for r in range(repeats):
        w = run_in_subprocess(dict(kw, mode="session", runs=runs, seed=r))
        out.append(w)
        line = "  ".join(f"{n} {1000.0 / session_record(c['rows'][-1])['decode_ms']:.2f}"
                         for n, c in w["configs"].items())
        log(f"[bench] {label} rep {r + 1}/{repeats} (load {w['load']}) decode tok/s: {line}")
    return out


def bench_main(ms: ModelSet, configs: Sequence[str], *, repeats: int, threads: int, n_prompt: int,
               n_decode: int, top_k: int, rss_repeats: int = 1) -> dict:
    configs = [c for c in configs if not (c == "d_tok" and ms.otter_token is None)]
    warm_page_cache([p for p in (ms.base, ms.otter, ms.rm, ms.otter_token) if p])
    n_ctx = n_prompt + n_decode + 64
    # peak RSS: every configuration alone in its own process
    rss: Dict[str, List[dict]] = {c: [] for c in configs}
    for r in range(rss_repeats):
        for c in configs:
            w = run_in_subprocess(_spec(ms, c, threads=threads, n_ctx=n_ctx, n_prompt=n_prompt,
                                      n_decode=min(n_decode, 8), top_k=top_k, seed=r, mode="main"))
            rss[c].append(w)
            log(f"[bench] {ms.name} {ms.qtype} {c:9s} alone: peak RSS {w['peak_rss_kib'] / 1024:6.0f} MiB")
    # timing: all configurations interleaved in one process per repeat
    runs = {c: _spec(ms, c) for c in configs}
    sess = _session(runs, repeats=repeats, label=f"{ms.name} {ms.qtype}", threads=threads, n_ctx=n_ctx,
                    n_prompt=n_prompt, n_decode=n_decode, top_k=top_k)
    per = {c: [session_record(w["configs"][c]["rows"][0]) for w in sess] for c in configs}
    b = ms.bytes()
    out = {"model": ms.name, "type": ms.qtype, "side": ms.side, "d": ms.d, "bytes": b, "space": space_savings(b),
           "configs": {c: config_stats(per[c], rss[c]) for c in configs}, "time": time_savings(per),
           "per_repeat": per, "loads": [w["load"] for w in sess],
           "steps": {c: [w["configs"][c]["rows"][0] for w in sess] for c in configs},
           "rewards": {c: sess[0]["configs"][c]["rewards"] for c in configs},
           "rss_runs": rss}
    out["targets"] = targets(out)
    return out


def targets(run: dict) -> dict:
    """The issue's targets and how far each measured value is from its own."""
    t = {}
    cs, ti, sp = run["configs"], run["time"], run["space"]
    if "a" in cs and "b" in cs:
        a = cs["a"]["decode_tok_s"]["median"]
        bound = 0.95 * a / (1 + sp["otter_over_base"])
        got = cs["b"]["decode_tok_s"]["median"]
        t["decode_b"] = {"target": bound, "value": got, "met": got >= bound, "by": got / bound - 1,
                         "rule": "decode(b) >= 0.95 x decode(a) / (1 + Otter bytes / base bytes)"}
    if "d_tok" in cs and "a" in cs and "otter_token_over_base" in sp:
        a = cs["a"]["decode_tok_s"]["median"]
        bound = 0.95 * a / (1 + sp["otter_token_over_base"])
        got = cs["d_tok"]["decode_tok_s"]["median"]
        t["decode_d_tok"] = {"target": bound, "value": got, "met": got >= bound, "by": got / bound - 1,
                             "rule": "decode(d_tok) >= 0.95 x decode(a) / (1 + Otter bytes / base bytes)"}
    for key, goal, rule in (("saving_b_vs_c", 0.90, "extra-time saving (b) vs (c) >= 90%"),
                            ("saving_dtok_vs_drm", 0.99, "extra-time saving Otter ARGS token_reward vs (d) >= 99%"),
                            ("saving_dscalar_vs_drm", 0.99, "extra-time saving Otter ARGS scalar vs (d) >= 99%")):
        v = ti.get(key, {}).get("median")
        if v is not None:
            t[key] = {"target": goal, "value": v, "met": v >= goal, "by": v - goal, "rule": rule}
    if sp.get("space_saving") is not None:
        t["space_saving"] = {"target": 0.87, "value": sp["space_saving"], "met": sp["space_saving"] >= 0.87,
                             "by": sp["space_saving"] - 0.87, "rule": "extra-space saving vs a reward model >= 87%",
                             "d2_over_d": run["side"]["d2"] / run["d"]}
    return t


def bench_ctx(ms: ModelSet, configs: Sequence[str], depths: Sequence[int], *, repeats: int, threads: int,
              n_decode: int) -> dict:
    warm_page_cache([p for p in (ms.base, ms.otter, ms.rm) if p])
    runs = {c: _spec(ms, c) for c in configs}
    sess = _session(runs, repeats=repeats, label=f"ctx {ms.name} {ms.qtype}", threads=threads,
                    n_ctx=max(depths) + n_decode + 64, depths=list(depths), n_decode=n_decode, chunk=256,
                    n_batch=512)
    rows = []
    for i, depth in enumerate(depths):
        rec = {c: [session_record(w["configs"][c]["rows"][i]) for w in sess] for c in configs}
        row: Dict[str, Any] = {"depth": depth}
        for c in configs:
            row[f"decode_tok_s_{c}"] = summarize([1000.0 / x["decode_ms"] for x in rec[c]])
            row[f"prefill_tok_s_{c}"] = summarize([1000.0 / x["prefill_ms"] for x in rec[c]])
        if {"a", "b"} <= set(configs):
            row["ratio_b_over_a"] = summarize([x["decode_ms"] / y["decode_ms"] for x, y in zip(rec["a"], rec["b"])])
        if {"a", "b", "c"} <= set(configs):
            row["saving_b_vs_c"] = summarize([saving(y["decode_ms"] - x["decode_ms"], z["decode_ms"] - x["decode_ms"])
                                              for x, y, z in zip(rec["a"], rec["b"], rec["c"])])
        rows.append(row)
    return {"model": ms.name, "type": ms.qtype, "configs": list(configs), "n_decode": n_decode, "rows": rows,
            "loads": [w["load"] for w in sess]}


def bench_d2(ms: ModelSet, *, repeats: int, threads: int, n_prompt: int, n_decode: int) -> dict:
    from otter_gguf_converter import inspect_gguf

    d2s = sorted(ms.sweep)
    warm_page_cache([ms.base, ms.rm, *ms.sweep.values()])
    n_ctx = n_prompt + n_decode + 64
    runs = {"c": _spec(ms, "c")}
    for d2 in d2s:
        for c in ("a", "b"):
            s = _spec(ms, c)
            s["otter"] = str(ms.sweep[d2])
            runs[f"{c}_{d2}"] = s
    sess = _session(runs, repeats=repeats, label=f"d2 {ms.name} {ms.qtype}", threads=threads, n_ctx=n_ctx,
                    n_prompt=n_prompt, n_decode=n_decode)
    rec = {n: [session_record(w["configs"][n]["rows"][0]) for w in sess] for n in runs}
    b = ms.bytes()
    rows = []
    for d2 in d2s:
        f = ms.sweep[d2]
        info = inspect_gguf(f)
        by = {"base_file": b["base_file"], "otter_file": f.stat().st_size, "rm_file": b["rm_file"],
              "rm_head": b["rm_head"]}
        sp = space_savings(by)
        pa, pb, pc = rec[f"a_{d2}"], rec[f"b_{d2}"], rec["c"]
        ratio = summarize([x["decode_ms"] / y["decode_ms"] for x, y in zip(pa, pb)])
        sav = summarize([saving(y["decode_ms"] - x["decode_ms"], z["decode_ms"] - x["decode_ms"])
                         for x, y, z in zip(pa, pb, pc)])
        a_tok = summarize([1000.0 / w["decode_ms"] for w in pa])
        b_tok = summarize([1000.0 / w["decode_ms"] for w in pb])
        bound = 0.95 * a_tok["median"] / (1 + sp["otter_over_base"])
        meta = info["otter"]["metadata"]
        rows.append({"d2": d2, "h2": meta.get(Keys.Attention.HEAD_COUNT),
                     "h2_kv": meta.get(Keys.Attention.HEAD_COUNT_KV), "f2": meta.get(Keys.FEED_FORWARD_LENGTH),
                     "otter_types": sorted({t["type"] for t in info["otter"]["tensors"]}),
                     "bytes": by, "space": sp, "decode_tok_s_a": a_tok, "decode_tok_s_b": b_tok,
                     "ratio_b_over_a": ratio, "saving_b_vs_c": sav, "decode_target_b": bound,
                     "decode_target_met": b_tok["median"] >= bound})
    return {"model": ms.name, "type": ms.qtype, "d": ms.d, "rows": rows, "loads": [w["load"] for w in sess],
            "decode_tok_s_c": summarize([1000.0 / w["decode_ms"] for w in rec["c"]])}


def bench_profile(ms: ModelSet, configs: Sequence[str], *, threads: int, n_prompt: int, n_decode: int) -> dict:
    """Graph node timing of one decode per token (one run per configuration)."""
    from otter_gguf_converter import inspect_gguf

    n_layer = inspect_gguf(ms.base)["base"]["block_count"]
    out = {"model": ms.name, "type": ms.qtype, "n_decode": n_decode, "configs": {}}
    for c in configs:
        if c == "d_tok" and ms.otter_token is None:
            continue
        w = run_in_subprocess(_spec(ms, c, threads=threads, n_ctx=n_prompt + n_decode + 64, n_prompt=n_prompt,
                                  n_decode=n_decode, top_k=10, seed=0, mode="profile", n_layer=n_layer))
        out["configs"][c] = {"decode_tok_s_profiled": w["n_decode"] / w["decode_s"], **w["profile"]}
        p = w["profile"]
        log(f"[bench] profile {ms.name} {ms.qtype} {c}: main {p['ms_per_token']['main']:.2f} ms/token, "
             f"side {p['ms_per_token']['side']:.2f} ms/token")
    return out
