"""The report: Markdown tables of a bench run, its machine metadata, and a form without this machine's paths."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from otter_gguf.tools.bench.config import CONFIG_LABELS
from otter_gguf.tools.bench.stats import load_average


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def _f(s: Optional[dict], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"


def _pct(s: Optional[dict]) -> str:
    return _f(s, "{:.1f}%", 100.0)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(report: dict) -> str:
    L: List[str] = []
    m = report["meta"]
    L.append(f"## otter-gguf bench ({m['date']}, {m['threads']} threads, load before/after: "
             f"{m['load_before']} / {m.get('load_after', '?')})")
    L.append("")
    L.append("Values: median (min–max) over the repeats. Extra = ms/token over (a) within the same repeat.")
    for run in report.get("main", []):
        b, sp, ti = run["bytes"], run["space"], run["time"]
        L.append("")
        L.append(f"### {run['model']} {run['type']} (d={run['d']}, d2={run['side']['d2']}, h2={run['side']['h2']}, "
                 f"h2_kv={run['side']['h2_kv']}, f2={run['side']['f2']})")
        L.append("")
        L.append("| configuration | decode tok/s | prefill tok/s | extra ms/token over (a) | peak RSS MiB | file bytes |")
        L.append("|---|---|---|---|---|---|")
        rm_files = b["base_file"] + b["rm_file"] if "rm_file" in b else None
        files = {"a": b["otter_file"], "a0": b["base_file"], "b": b["otter_file"], "c": rm_files, "d_rm": rm_files,
                 "d_tok": b.get("otter_token_file"), "d_scalar": b["otter_file"]}
        for c, st in run["configs"].items():
            extra = ti.get(f"extra_ms_{c}")
            L.append(f"| {CONFIG_LABELS[c]} | {_f(st['decode_tok_s'])} | {_f(st['prefill_tok_s'], '{:.1f}')} | "
                     f"{'—' if c == 'a' else _f(extra)} | {_f(st.get('peak_rss_mib'), '{:.0f}')} | "
                     f"{_mib(files[c]) if files.get(c) else 'n/a'} |")
        L.append("")
        L.append("| saving | value | target | met |")
        L.append("|---|---|---|---|")
        tg = run["targets"]

        def tline(label, key, val):
            t = tg.get(key)
            if t is None:
                L.append(f"| {label} | {val} | — | — |")
                return
            tgt = f"{t['target']:.2f} tok/s" if key.startswith("decode") else f"{100 * t['target']:.0f}%"
            by = f"{100 * t['by']:+.1f}%" if key.startswith("decode") else f"{100 * t['by']:+.1f} pt"
            L.append(f"| {label} | {val} | {tgt} | {'yes' if t['met'] else 'NO'} ({by}) |")

        tline("decode (b) vs bound 0.95·(a)/(1+Otter/base bytes)", "decode_b",
              f"{run['configs']['b']['decode_tok_s']['median']:.2f} tok/s; Otter/base bytes "
              f"{100 * sp['otter_over_base']:.1f}%")
        if "d_tok" in run["configs"]:
            tline("decode (d_tok) vs the same bound (token_reward file)", "decode_d_tok",
                  f"{run['configs']['d_tok']['decode_tok_s']['median']:.2f} tok/s; Otter/base bytes "
                  f"{100 * sp['otter_token_over_base']:.1f}%")
        if "c" in run["configs"]:
            tline("extra-time saving (b) vs (c), decode", "saving_b_vs_c", _pct(ti.get("saving_b_vs_c")))
            L.append(f"| extra-time saving (b) vs (c), prefill | {_pct(ti.get('saving_prefill_b_vs_c'))} | — | — |")
        if "d_tok" in run["configs"]:
            tline("extra-time saving Otter ARGS token_reward vs (d)", "saving_dtok_vs_drm",
                  _pct(ti.get("saving_dtok_vs_drm")))
        if "d_scalar" in run["configs"]:
            tline("extra-time saving Otter ARGS scalar vs (d)", "saving_dscalar_vs_drm",
                  _pct(ti.get("saving_dscalar_vs_drm")))
        if sp["space_saving"] is not None:
            tline(f"extra-space saving, scalar head: {_mib(sp['extra_bytes_otter'])} vs RM "
                  f"{_mib(sp['extra_bytes_rm'])}", "space_saving", f"{100 * sp['space_saving']:.1f}%")
        if sp.get("space_saving_token") is not None:
            L.append(f"| extra-space saving, token_reward head: {_mib(sp['extra_bytes_otter_token'])} vs RM "
                     f"{_mib(sp['extra_bytes_rm'])} | {100 * sp['space_saving_token']:.1f}% | — | — |")
    for cx in report.get("ctx", []):
        L.append("")
        L.append(f"### decode tok/s against context length ({cx['model']} {cx['type']}, {cx['n_decode']} tokens "
                 f"decoded at each depth)")
        L.append("")
        cfgs = cx["configs"]
        L.append("| context | " + " | ".join(f"decode {c}" for c in cfgs) + " | (b)/(a) | saving (b) vs (c) | "
                 + " | ".join(f"prefill {c}" for c in cfgs) + " |")
        L.append("|---" * (1 + 2 * len(cfgs) + 2) + "|")
        for row in cx["rows"]:
            L.append(f"| {row['depth']} | " + " | ".join(_f(row[f'decode_tok_s_{c}']) for c in cfgs) + " | "
                     f"{_f(row.get('ratio_b_over_a'), '{:.3f}')} | {_pct(row.get('saving_b_vs_c'))} | "
                     + " | ".join(_f(row[f'prefill_tok_s_{c}'], '{:.1f}') for c in cfgs) + " |")
    for dx in report.get("d2", []):
        L.append("")
        L.append(f"### against d2 ({dx['model']} {dx['type']}, d={dx['d']}; (c) decodes at "
                 f"{_f(dx['decode_tok_s_c'])} tok/s)")
        L.append("")
        L.append("| d2 | h2/h2_kv/f2 | Otter bytes | Otter/base | decode (a) | decode (b) | (b)/(a) | decode bound | "
                 "time saving vs (c) | space saving |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in dx["rows"]:
            sp = row["space"]
            L.append(f"| {row['d2']} (d/{dx['d'] // row['d2']}) | {row['h2']}/{row['h2_kv']}/{row['f2']} | "
                     f"{_mib(sp['extra_bytes_otter'])} | {100 * sp['otter_over_base']:.1f}% | "
                     f"{_f(row['decode_tok_s_a'])} | {_f(row['decode_tok_s_b'])} | {_f(row['ratio_b_over_a'], '{:.3f}')} | "
                     f"{row['decode_target_b']:.2f} {'met' if row['decode_target_met'] else 'MISSED'} | "
                     f"{_pct(row['saving_b_vs_c'])} | {100 * sp['space_saving']:.1f}% |")
    for px in report.get("profile", []):
        L.append("")
        L.append(f"### graph node timing per decoded token ({px['model']} {px['type']}, cb_eval, "
                 f"{px['n_decode']} tokens; every node computed on its own, so the sums exceed the unprofiled time)")
        for c, p in px["configs"].items():
            L.append("")
            L.append(f"{CONFIG_LABELS[c]}: main {p['ms_per_token']['main']:.2f} ms/token "
                     f"({p['weight_mib_per_token']['main']:.1f} MiB of weights), side "
                     f"{p['ms_per_token']['side']:.2f} ms/token ({p['weight_mib_per_token']['side']:.1f} MiB)")
            L.append("")
            L.append("| group | ms/token | nodes/token | weights MiB/token | GB/s |")
            L.append("|---|---|---|---|---|")
            for k, g in list(p["groups"].items())[:24]:
                gbs = f"{g['gb_s']:.1f}" if g["gb_s"] else ""
                L.append(f"| {k} | {g['ms_per_token']:.3f} | {g['nodes_per_token']:.0f} | "
                         f"{g['weight_mib_per_token']:.2f} | {gbs} |")
    return "\n".join(L) + "\n"


def portable(text: str) -> str:
    """A report without this machine's paths: the interpreter's prefix as
    ``$PREFIX`` and the home directory as ``~``."""
    for path, name in ((sys.prefix, "$PREFIX"), (str(Path.home()), "~")):
        text = text.replace(json.dumps(path)[1:-1], name)
    return text


def machine_meta(threads: int) -> dict:
    import llama_cpp

    try:
        from otter_gguf.runtime import capi as _lib

        series = _lib.series()
    except Exception as e:  # pragma: no cover - unpatched runtime
        series = f"unavailable ({e})"
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # pragma: no cover
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads, "cpu": cpu, "n_cpu": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "runtime_series": series,
            "libllama": getattr(llama_cpp.llama_cpp._lib, "_name", "?"), "git": commit,
            "load_before": load_average()}
