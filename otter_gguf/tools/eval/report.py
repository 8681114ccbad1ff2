"""The eval's outputs: the Markdown table, the plot, the files of a run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------
def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


_HEAD = ("| type | file MiB | base bpw | Otter bpw | mean \\|Δ\\|/σ | max \\|Δ\\|/σ | Spearman "
         "| rank agree | KLD mean | KLD p99 | top-1 |")


def _row(name: str, sizes: dict, worst: dict | None, logits: dict | None) -> str:
    w = worst or {}
    lg = logits or {}
    ra = w.get("rank_agreement")
    t1 = lg.get("top1")
    return (f"| {name} | {sizes['file_bytes'] / 2**20:.2f} | {_f(sizes['base_bpw'], '.2f')} "
            f"| {_f(sizes['otter_bpw'], '.2f')} | {_f(w.get('mean_abs_rel'), '.4%')} "
            f"| {_f(w.get('max_abs_rel'), '.3%')} | {_f(w.get('spearman'), '.5f')} "
            f"| {_f(None if ra is None else 100 * ra, '.2f')}{'' if ra is None else '%'} "
            f"| {_f(lg.get('kld_mean'), '.2e')} | {_f(lg.get('kld_p99'), '.2e')} "
            f"| {_f(None if t1 is None else 100 * t1, '.2f')}{'' if t1 is None else '%'} |")


def format_table(report: dict[str, Any]) -> str:
    """The markdown table of a report (one row per type; signal columns are the
    worst over the head's signals)."""
    lines = [_HEAD, "|" + "---|" * 11]
    ref = report["reference"]
    if ref.get("is_otter"):
        lines.append(_row(f"{ref['base_type']} (MODEL.gguf)", ref["sizes"], ref.get("worst"),
                          {"kld_mean": 0.0, "kld_p99": 0.0, "top1": 1.0}))
    for t, r in report["types"].items():
        lines.append(_row(t, r["sizes"], r["worst"], r["logits"]))
        if r.get("intrinsic"):
            lines.append(_row(f"{t} intrinsic", r["sizes"], r["intrinsic"]["worst"], r["intrinsic"]["logits"]))
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    p = report["prompts"]
    names = ", ".join(report["signal_names"])
    std = ", ".join(f"{k} {v:.4g}" for k, v in report["signal_std"].items())
    ref = report["reference"]
    vt = ref["vs_torch_logits"]
    n_pairs = {k: m["n_pairs"] for k, m in next(iter(report["types"].values()))["signals"].items()} \
        if report["types"] else {}
    out = [
        "# Otter quantization eval",
        "",
        f"- model (logits reference): `{report['model']}` ({ref['base_type']} base"
        f"{', Otter head' if ref['is_otter'] else ', plain'})",
        f"- adapter: `{report['adapter']}`; base (PyTorch f32 reference): `{report['base']}`",
        f"- prompts: {p['n']} texts, {p['n_tokens']} tokens (`{p['source']}`, sha256 {p['sha256'][:12]})",
        f"- signals: {names} (σ over all reference positions: {std}); ranking pairs: "
        + ", ".join(f"{k} {v}" for k, v in n_pairs.items()),
        f"- MODEL.gguf vs PyTorch main logits: KLD mean {vt['kld_mean']:.2e}, top-1 {100 * vt['top1']:.2f}%",
        f"- runtime: llama-cpp-python {report['runtime']['llama_cpp_python']} ({report['runtime']['series']}), "
        f"KV cache {report['settings']['kv_cache']}, {report['settings']['threads']} thread(s)",
        "",
        "Signal columns: |Δ| = |signal(type) - signal(PyTorch f32)| over every position, σ the "
        "reference std, worst over the signals; rank agree = agreement on the order of final rewards "
        "over all text pairs with distinct reference rewards. KLD = KL(p_MODEL || p_type) of the main "
        "next-token distributions (nats), top-1 = same argmax. Rows \"T intrinsic\": the PyTorch "
        "reference run on T's GGUF's own dequantized weights (signals vs PyTorch f32, KLD vs PyTorch f32 "
        "logits): what the weight rounding costs; the T row minus it is what the runtime adds "
        "(runtime added, mean |Δ|/σ: "
        + ", ".join(f"{t} {_f(None if r.get('runtime_added') is None else 100 * r['runtime_added'], '+.1f')}%"
                    for t, r in report["types"].items()) + ").",
        "",
        format_table(report),
        "",
    ]
    return "\n".join(out)


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG: signal error (mean and max |Δ|/σ) and main-logit KLD vs bits per
    weight (all tensors of each file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(t, r["sizes"]["total_bpw"], r["worst"], r["logits"]) for t, r in report["types"].items()]
    rows.sort(key=lambda x: x[1])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r[1] for r in rows]

    def series(ax, vals, label, marker):
        pts = [(xi, v) for xi, v in zip(x, vals) if v is not None and v > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)

    series(ax1, [r[2]["mean_abs_rel"] for r in rows], "mean |Δ| / σ", "o")
    series(ax1, [r[2]["max_abs_rel"] for r in rows], "max |Δ| / σ", "s")
    series(ax2, [r[3]["kld_mean"] for r in rows], "KLD mean", "o")
    series(ax2, [r[3]["kld_p99"] for r in rows], "KLD p99", "s")
    for ax, key in ((ax1, "max_abs_rel"), (ax2, "kld_p99")):
        for t, xi, w, lg in rows:
            v = (w if ax is ax1 else lg).get(key)
            if v is not None and v > 0:
                ax.annotate(t, (xi, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (whole file)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_ylabel("signal error vs PyTorch f32 (units of σ)")
    ax1.set_title("Otter signal error vs bits per weight")
    ax2.set_ylabel("KL(p_MODEL || p_type), nats")
    ax2.set_title("main-logit KLD vs bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and ``eval.png`` into ``out_dir``
    (the PNG needs matplotlib; without it a warning, and no ``"png"`` key)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md", "png": out / "eval.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(_markdown(report), encoding="utf-8")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("otter-gguf eval: matplotlib is not installed, no eval.png (pip install matplotlib)",
              file=sys.stderr)
        del paths["png"]
        return paths
    plot(report, paths["png"])
    return paths
