"""The eval's metrics, plain numpy, each tested against hand-computed values."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np


# ---------------------------------------------------------------------------
# metrics (plain numpy; tested against hand-computed values)
# ---------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits, float64 (the max subtracted first)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-row ``KL(softmax(ref) || softmax(logits))`` in nats, float64.

    ``[N, V]`` logits (not probabilities) -> ``[N]``. This is the quantity
    llama-perplexity's ``--kl-divergence`` averages (``sum_i p_i (log p_i - log
    q_i)`` with ``p`` the reference model), computed exactly here: llama-perplexity
    stores the reference log-probabilities as 16-bit integers over
    ``[max - 16, max]`` and drops the terms below ``e^-16``, which adds noise of
    order 1e-5 nats.
    """
    lp = log_softmax(ref_logits)
    lq = log_softmax(logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson correlation of average ranks);
    None when either side is constant."""
    ra, rb = _rank(np.asarray(a)), _rank(np.asarray(b))
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return None if den == 0 else float(ra @ rb) / den


def ranking_agreement(ref: Sequence[float], other: Sequence[float]) -> tuple[float | None, int]:
    """Pairwise ranking agreement of final rewards.

    Pairs: every ``i < j`` whose reference values differ (``ref[i] != ref[j]``).
    A pair agrees when ``other`` orders it the same way (strictly; a tie in
    ``other`` counts as a disagreement). Returns ``(fraction, n_pairs)``,
    fraction None without pairs.
    """
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(other, dtype=np.float64)
    if r.shape != o.shape or r.ndim != 1:
        raise ValueError(f"ranking_agreement: shapes {r.shape} and {o.shape} differ or are not 1-D")
    iu, ju = np.triu_indices(len(r), k=1)
    dr = np.sign(r[iu] - r[ju])
    do = np.sign(o[iu] - o[ju])
    keep = dr != 0
    n = int(keep.sum())
    if n == 0:
        return None, 0
    return float(np.mean(dr[keep] == do[keep])), n


def signal_errors(ref: np.ndarray, other: np.ndarray, std: float | None = None) -> dict[str, Any]:
    """Errors of one signal over all positions (1-D arrays of equal length).

    ``mean_abs_rel`` / ``max_abs_rel``: mean and max ``|other - ref|`` divided by
    ``std`` (default: the population std of ``ref``); ``spearman``: rank
    correlation of the two. Relative errors are None when std is 0.
    """
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(other, dtype=np.float64).ravel()
    if r.shape != o.shape:
        raise ValueError(f"signal_errors: {r.shape} vs {o.shape}")
    s = float(r.std()) if std is None else float(std)
    d = np.abs(o - r)
    ok = s > 0 and math.isfinite(s)
    return {
        "mean_abs": float(d.mean()),
        "max_abs": float(d.max()),
        "mean_abs_rel": float(d.mean() / s) if ok else None,
        "max_abs_rel": float(d.max() / s) if ok else None,
        "spearman": spearman(r, o),
    }


def gguf_sizes(path: str | os.PathLike) -> dict[str, Any]:
    """Sizes from the GGUF tensor infos: bytes, parameters and bits per weight
    (``bytes * 8 / n_elements``) of the base part, the Otter part (``otter*``
    tensors) and all tensors; ``file_bytes`` is the file size on disk."""
    from otter_gguf.io import gguf_read

    reader = gguf_read.open_gguf(path, "GGUF")
    acc = {"base": [0, 0], "otter": [0, 0]}
    for t in reader.tensors:
        part = "otter" if gguf_read.is_otter_tensor(t.name) else "base"
        acc[part][0] += int(t.n_bytes)
        acc[part][1] += int(t.n_elements)
    out: dict[str, Any] = {"file_bytes": os.path.getsize(path)}
    tb = tp = 0
    for part, (b, n) in acc.items():
        out[f"{part}_bytes"] = b
        out[f"{part}_params"] = n
        out[f"{part}_bpw"] = b * 8 / n if n else None
        tb += b
        tp += n
    out["total_bpw"] = tb * 8 / tp if tp else None
    return out
