"""The eval regression rules of the test suite: absolute targets per type (:data:`TARGETS`) and how much
worse than a committed baseline report a metric may get (:data:`REGRESSION_TOLERANCES`), with their
checks (:func:`compare_with_baseline`, :func:`check_targets`). Used by tests/test_regression.py,
tests/test_train_eval.py, tests/test_eval.py and tests/test_eval_isa_spread.py; the reports they check are
``otter_gguf.tools.eval.evaluate``'s.
"""

from __future__ import annotations

from typing import Any

#: absolute accuracy targets of the quantized types, enforced by the regression suite: type -> metric -> (op, bound)
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "q8_0": {"max_abs_rel": ("<=", 0.01), "rank_agreement": (">=", 0.995), "kld_mean": ("<=", 1e-3)},
    "q4_k_m": {"mean_abs_rel": ("<=", 0.05), "rank_agreement": (">=", 0.97)},
}

#: how much worse than the committed baseline a metric may get before the
#: regression suite fails: (relative slack, absolute slack); higher-is-better
#: metrics may drop by the absolute slack only. Each is at least twice the
#: spread measured between ggml's AVX2 and AVX-512 kernels (tests/baselines/isa/,
#: checked by tests/test_eval_isa_spread.py); the largest, on the SmolLM2 head:
#: rank_agreement 0.0062 (q8_0, q6_k), top1 0.012 (q4_k_m), max_abs_rel 4.8%
#: relative (q4_k_m), kld_p99 3.8% (q6_k), spearman 0.00044 (q4_k_m).
REGRESSION_TOLERANCES: dict[str, tuple[float, float]] = {
    "mean_abs_rel": (0.25, 0.001),
    "max_abs_rel": (0.25, 0.005),
    "spearman": (0.0, 0.002),
    "rank_agreement": (0.0, 0.0125),
    "kld_mean": (0.25, 1e-5),
    "kld_p99": (0.5, 5e-5),
    "top1": (0.0, 0.025),
}
_HIGHER_IS_BETTER = {"spearman", "rank_agreement", "top1"}


def _metrics_of(r: dict[str, Any]) -> dict[str, float | None]:
    w, lg = r["worst"], r["logits"]
    return {**{k: w.get(k) for k in ("mean_abs_rel", "max_abs_rel", "spearman", "rank_agreement")},
            **{k: lg.get(k) for k in ("kld_mean", "kld_p99", "top1")}}


def compare_with_baseline(report: dict[str, Any], baseline: dict[str, Any],
                          tolerances: dict[str, tuple[float, float]] = REGRESSION_TOLERANCES) -> list[str]:
    """Regressions of ``report`` against ``baseline`` (both eval reports), one
    line each; empty when every metric is within tolerance. Sizes (bytes, bpw)
    must match exactly: they only depend on the types."""
    fails: list[str] = []
    bref, rref = baseline.get("reference") or {}, report.get("reference") or {}
    if bref.get("worst"):
        cur, base = rref.get("worst") or {}, bref["worst"]
        for key in ("mean_abs_rel", "max_abs_rel", "spearman", "rank_agreement"):
            fails += _check_metric("MODEL.gguf", key, cur.get(key), base.get(key), tolerances)
    for t, b in baseline["types"].items():
        r = report["types"].get(t)
        if r is None:
            fails.append(f"{t}: missing from the report (the baseline has it)")
            continue
        for key in ("base_bytes", "otter_bytes"):
            if r["sizes"][key] != b["sizes"][key]:
                fails.append(f"{t}: {key} {r['sizes'][key]} != baseline {b['sizes'][key]} "
                             f"(the type's layout changed; regenerate the baseline if intended)")
        cur, base = _metrics_of(r), _metrics_of(b)
        for key in tolerances:
            fails += _check_metric(t, key, cur.get(key), base.get(key), tolerances)
    return fails


def _check_metric(t: str, key: str, cv, bv, tolerances) -> list[str]:
    if bv is None or key not in tolerances:
        return []
    if cv is None:
        return [f"{t}: {key} is n/a (baseline {bv:.6g})"]
    rel, ab = tolerances[key]
    if key in _HIGHER_IS_BETTER:
        bound = bv - ab
        if cv < bound:
            return [f"{t}: {key} {cv:.6g} < {bound:.6g} (baseline {bv:.6g} - {ab:g})"]
    else:
        bound = bv * (1 + rel) + ab
        if cv > bound:
            return [f"{t}: {key} {cv:.6g} > {bound:.6g} (baseline {bv:.6g} * {1 + rel:g} + {ab:g})"]
    return []


def check_targets(report: dict[str, Any], targets: dict[str, dict[str, tuple[str, float]]] = TARGETS) -> list[str]:
    """Absolute targets (:data:`TARGETS`) the report misses, one line each."""
    fails: list[str] = []
    for t, spec in targets.items():
        r = report["types"].get(t)
        if r is None:
            fails.append(f"{t}: not evaluated (targets: {spec})")
            continue
        m = _metrics_of(r)
        for key, (op, bound) in spec.items():
            v = m.get(key)
            ok = v is not None and (v <= bound if op == "<=" else v >= bound)
            if not ok:
                fails.append(f"{t}: {key} = {('n/a' if v is None else format(v, '.6g'))}, target {op} {bound:g}")
    return fails
