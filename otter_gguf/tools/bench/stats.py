"""Statistics and savings: medians over repeats, ratios taken within one repeat."""

from __future__ import annotations

import os
import statistics
from typing import Dict, List, Optional, Sequence

import numpy as np


# ---------------------------------------------------------------------------
# statistics and savings
# ---------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "values": v}


def saving(extra_otter: float, extra_baseline: float) -> Optional[float]:
    """The paper's saving: ``1 - extra(Otter) / extra(baseline)``."""
    if extra_baseline is None or extra_otter is None or extra_baseline == 0:
        return None
    return 1.0 - extra_otter / extra_baseline


def space_savings(b: dict) -> dict:
    """Extra bytes over the base and the extra-space savings against a separate reward model (none where
    there is no reward model: ``b`` without ``rm_file``)."""
    extra_rm = b["rm_file"] + b["rm_head"] if "rm_file" in b else None
    out = {"extra_bytes_otter": b["otter_file"] - b["base_file"], "extra_bytes_rm": extra_rm}
    out["space_saving"] = saving(out["extra_bytes_otter"], extra_rm)
    out["otter_over_base"] = out["extra_bytes_otter"] / b["base_file"]
    if "otter_token_file" in b:
        out["extra_bytes_otter_token"] = b["otter_token_file"] - b["base_file"]
        out["space_saving_token"] = saving(out["extra_bytes_otter_token"], extra_rm)
        out["otter_token_over_base"] = out["extra_bytes_otter_token"] / b["base_file"]
    return out


def time_savings(per_repeat: Dict[str, List[dict]]) -> dict:
    """Per repeat: ms/token of every configuration, the extra over (a), the savings; then median and
    spread over the repeats. ``per_repeat[config][r]`` holds ``decode_ms`` (median ms per decode step)
    and ``prefill_ms`` (median ms per prompt token) of configuration ``config`` in repeat ``r``."""
    reps = min(len(v) for v in per_repeat.values())

    def ms(cfg, r, what="decode"):
        x = per_repeat.get(cfg)
        if not x or r >= len(x):
            return None
        return x[r][f"{what}_ms"]

    rows: Dict[str, List[Optional[float]]] = {}
    for r in range(reps):
        a = ms("a", r)
        a_pre = ms("a", r, "prefill")
        vals = {}
        for cfg in per_repeat:
            m = ms(cfg, r)
            vals[f"extra_ms_{cfg}"] = None if m is None else m - a
            p = ms(cfg, r, "prefill")
            vals[f"extra_prefill_ms_{cfg}"] = None if p is None else p - a_pre
        vals["saving_b_vs_c"] = saving(vals.get("extra_ms_b"), vals.get("extra_ms_c"))
        vals["saving_prefill_b_vs_c"] = saving(vals.get("extra_prefill_ms_b"), vals.get("extra_prefill_ms_c"))
        vals["saving_dtok_vs_drm"] = saving(vals.get("extra_ms_d_tok"), vals.get("extra_ms_d_rm"))
        vals["saving_dscalar_vs_drm"] = saving(vals.get("extra_ms_d_scalar"), vals.get("extra_ms_d_rm"))
        vals["ratio_b_over_a"] = (a / ms("b", r)) if ms("b", r) else None
        for k, v in vals.items():
            rows.setdefault(k, []).append(v)
    return {k: summarize(v) for k, v in rows.items()}


def session_record(row: dict) -> dict:
    """ms per decode step and per prompt token (medians over the steps / chunks) of one session row."""
    steps = row["steps"]
    pre = [t / n for n, t in row["prefill"] if n]
    return {"decode_ms": 1000.0 * statistics.median(steps) if steps else None,
            "decode_ms_mean": 1000.0 * statistics.fmean(steps) if steps else None,
            "prefill_ms": 1000.0 * statistics.median(pre) if pre else None,
            "n_decode": len(steps), "n_prompt": sum(n for n, _ in row["prefill"])}


def config_stats(recs: List[dict], rss: Sequence[dict] = ()) -> dict:
    dec = [1000.0 / w["decode_ms"] for w in recs]
    pre = [1000.0 / w["prefill_ms"] for w in recs if w.get("prefill_ms")]
    out = {"decode_tok_s": summarize(dec), "prefill_tok_s": summarize(pre),
           "decode_ms_per_tok": summarize([w["decode_ms"] for w in recs])}
    if rss:
        out["peak_rss_mib"] = summarize([w["peak_rss_kib"] / 1024 for w in rss])
        out["rss_after_import_mib"] = summarize([w["rss_after_import_kib"] / 1024 for w in rss])
    return out


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"
