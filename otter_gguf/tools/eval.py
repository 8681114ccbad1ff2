"""Quantization eval: Otter signal error and main-logit KLD per output type.

``otter-gguf eval MODEL.gguf --adapter DIR --base HF_DIR`` (docs/EVAL.md).

For every type T of ``--types``:

1. the base part of MODEL.gguf (an unquantized f32/f16/bf16 GGUF, plain or
   Otter) is quantized to T by llama.cpp's own quantizer
   (``llama_model_quantize``, the code of ``llama-quantize``, its mixes);
2. the adapter is converted onto that base with ``otter-gguf convert``'s
   code (``convert(adapter, base_T.gguf, out, outtype=T)``): Otter tensors at T;
3. the result runs on the patched runtime (:class:`~otter_gguf.runtime.llama.OtterLlama`)
   over the prompt set: signals from :meth:`OtterLlama.score` (all-positions
   mode), main logits from ``eval`` with ``logits_all=True``.

Signals are compared with the float32 PyTorch reference
(:func:`otter_gguf.reference.model.load_otter`), main logits with MODEL.gguf run by
the same runtime (llama-perplexity's ``--kl-divergence`` setting: the f32
GGUF is the reference distribution). Every model sees the same token ids
(tokenized once by MODEL.gguf's tokenizer, BOS added).

The metric functions (:func:`kl_divergence`, :func:`ranking_agreement`,
:func:`spearman`, :func:`signal_errors`, :func:`gguf_sizes`) are plain numpy
and documented one by one; :func:`compare_with_baseline` and
:func:`check_targets` back the regression suite (tests/test_regression.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from otter_gguf.format.constants import KEY_PREFIX, HeadKind, Keys

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_TYPES",
    "EvalError",
    "REGRESSION_TOLERANCES",
    "TARGETS",
    "check_targets",
    "compare_with_baseline",
    "evaluate",
    "format_table",
    "gguf_sizes",
    "kl_divergence",
    "load_prompts",
    "plot",
    "ranking_agreement",
    "runtime_added",
    "signal_errors",
    "spearman",
    "write_outputs",
]

EVAL_FORMAT_VERSION = 1
DEFAULT_TYPES: tuple[str, ...] = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "eval_prompts.txt"

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


#: MODEL.gguf vs PyTorch (--base) main-logit KLD above which they are not the same model
MAX_REFERENCE_KLD = 1e-2


class EvalError(ValueError):
    """Bad input to the eval (unreadable prompts, wrong MODEL.gguf, unknown type, ...)."""


# ---------------------------------------------------------------------------
# metrics (plain numpy; tested against hand-computed values)
# ---------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
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
    lp = _log_softmax(ref_logits)
    lq = _log_softmax(logits)
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


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """One text per line; blank lines and ``#`` comment lines are skipped."""
    p = Path(path) if path is not None else DEFAULT_PROMPTS
    if not p.is_file():
        raise EvalError(f"prompt file {p} does not exist" if not p.exists() else f"prompt file {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"prompt file {p} is not UTF-8 text: {e}") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if len(prompts) < 2:
        raise EvalError(f"prompt file {p} has {len(prompts)} prompt(s); the eval needs at least 2 "
                        f"(one text per line, '#' starts a comment line)")
    return prompts


def parse_types(types: str | Sequence[str]) -> list[str]:
    """``"f16,q8_0"`` or a list -> validated, de-duplicated type names."""
    from otter_gguf.io.llama_quantize import LLAMA_FTYPES
    from otter_gguf_converter.qtypes import OUTTYPES

    items = types.split(",") if isinstance(types, str) else list(types)
    known = [t for t in OUTTYPES if t in LLAMA_FTYPES]
    out: list[str] = []
    for raw in items:
        t = str(raw).strip().lower()
        if not t:
            continue
        if t not in known:
            raise EvalError(f"unknown type {raw!r} in --types; expected a comma-separated list of: {', '.join(known)}")
        if t not in out:
            out.append(t)
    if not out:
        raise EvalError("--types is empty; give at least one type, e.g. --types q8_0,q4_k_m")
    return out


def _write_base_part(src: Path, dst: Path) -> None:
    """The base part of an Otter GGUF (drop the otter* tensors and otter.* keys;
    docs/FORMAT.md: that is the base file's content)."""
    from otter_gguf.io import gguf_read
    from otter_gguf.io.gguf_write import base_tensors, copy_kvs, write_gguf

    reader = gguf_read.open_gguf(src, "MODEL.gguf")
    info = gguf_read.base_info(reader, str(src))
    write_gguf(dst, info.architecture, int(reader.alignment),
               [copy_kvs(reader, lambda k: not k.startswith(KEY_PREFIX))], base_tensors(reader))


@dataclass
class _ModelInfo:
    path: Path
    is_otter: bool
    base_type: str
    signal_names: list[str]
    head_kind: str | None
    n_ctx_train: int | None
    hparams: dict


_UNQUANTIZED = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def _inspect_model(path: Path) -> _ModelInfo:
    from otter_gguf.io import gguf_read

    reader = gguf_read.open_gguf(path, "MODEL.gguf")
    info = gguf_read.base_info(reader, str(path))
    mats = [t for t in reader.tensors if not gguf_read.is_otter_tensor(t.name) and len(t.shape) >= 2]
    kinds = sorted({t.tensor_type.name for t in mats})
    bad = [k for k in kinds if k not in _UNQUANTIZED]
    if bad or not kinds:
        raise EvalError(
            f"MODEL.gguf {path}: its base matrices are {'/'.join(kinds) or 'missing'}; the eval needs an "
            f"unquantized (f32, f16 or bf16) GGUF as the logits reference and the source of the quantized bases "
            f"(e.g. `otter-gguf convert ADAPTER --base HF_DIR --base-outtype f32 -o MODEL.gguf`)")
    base_type = _UNQUANTIZED[kinds[0]] if len(kinds) == 1 else "/".join(_UNQUANTIZED[k] for k in kinds)
    is_otter = any(gguf_read.is_otter_tensor(t.name) for t in reader.tensors)
    names = gguf_read.field_value(reader, Keys.Head.SIGNAL_NAMES) if is_otter else None
    kind = gguf_read.field_value(reader, Keys.Head.KIND) if is_otter else None
    ctx = gguf_read.field_value(reader, f"{info.architecture}.context_length")
    return _ModelInfo(path, is_otter, base_type, list(names or []), kind, int(ctx) if ctx else None,
                      info.hparams())


# ---------------------------------------------------------------------------
# running models
# ---------------------------------------------------------------------------
def _torch_run(load, token_lists, tick, threads: int | None = None) -> tuple[list, list, Any]:
    """(signals, logits) per prompt of the PyTorch model ``load()`` returns, and its config."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = load()
        sigs, logits = [], []
        with torch.inference_mode():
            for toks in token_lists:
                out = model(torch.tensor(toks, dtype=torch.long))
                sigs.append(out.signals.float().numpy().copy())
                logits.append(out.logits.float().numpy().copy())
                tick()
    finally:
        torch.set_num_threads(old)
    return sigs, logits, model.config


def _torch_reference(base_dir: Path, adapter_dir: Path, token_lists, tick,
                     threads: int | None = None) -> tuple[list, list, Any]:
    """The float32 reference: the adapter on ``base_dir`` (an HF directory, or a base GGUF
    whose dequantized weights are the reference: a model that exists only as a GGUF)."""
    import torch

    def load():
        if base_dir.is_file():
            from otter_gguf.format.adapter import load_adapter
            from otter_gguf.reference.gguf_base import load_base_gguf
            from otter_gguf.reference.model import OtterModel

            return OtterModel(load_base_gguf(base_dir), *load_adapter(adapter_dir, torch.float32))
        from otter_gguf.reference.model import load_otter

        return load_otter(base_dir, adapter_dir, dtype=torch.float32)

    return _torch_run(load, token_lists, tick, threads)


def _torch_intrinsic(otter_gguf: Path, config, token_lists, tick, threads: int | None = None):
    """The same PyTorch reference on an Otter GGUF's own dequantized weights (base and Otter
    tensors as rounded to the file's types): what the weight rounding alone costs."""
    def load():
        from otter_gguf.reference.gguf_base import load_otter_gguf

        return load_otter_gguf(otter_gguf, config)

    return _torch_run(load, token_lists, tick, threads)[:2]


#: --kv-type -> ggml_type id of the KV cache (llama.cpp's default is f16)
KV_TYPES = {"f16": 1, "f32": 0, "bf16": 30}


@contextlib.contextmanager
def _llama(path: Path, n_ctx: int, threads: int, kv_type: str = "f16"):
    from otter_gguf.io.llama_log import llama_logs
    from otter_gguf.runtime.llama import OtterLlama

    with llama_logs(level=logging.WARNING, log_level=None) as kept:  # kept for the error message only
        try:
            llm = OtterLlama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                             n_threads=threads, n_threads_batch=threads, verbose=False,
                             type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
        except ValueError as e:
            raise RuntimeError(f"cannot load {path}: {e}\n" + "\n".join(kept[-10:])) from None
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.close()


def _run_gguf(path: Path, token_lists, n_ctx: int, threads: int, tick, *, signals: bool,
              kv_type: str = "f16"):
    """(logits per prompt [T, V], signals per prompt [T, n_out] or None).

    One decode per prompt with ``logits_all=True``: the main logits of every
    position (``Llama.scores``) and the Otter signals OtterLlama records for
    every output row (``OtterLlama.signals``) come from the same pass.
    """
    logits, sigs = [], []
    with _llama(path, n_ctx, threads, kv_type) as llm:
        if signals and not llm.has_otter:
            raise RuntimeError(f"{path.name}: the runtime loaded it without an Otter head")
        for toks in token_lists:
            llm.reset()
            llm.eval(toks)
            logits.append(np.array(llm.scores[: len(toks)], dtype=np.float32))
            if signals:
                s = np.array(llm.signals[: len(toks)], dtype=np.float32)
                if not np.isfinite(s).all():
                    raise RuntimeError(f"{path.name}: non-finite Otter signals")
                sigs.append(s)
            tick()
    return logits, (sigs if signals else None)


def _tokenize(path: Path, prompts: Sequence[str], threads: int) -> list[list[int]]:
    from llama_cpp import Llama

    from otter_gguf.io.llama_log import llama_logs

    with llama_logs(log_level=None):
        llm = Llama(str(path), vocab_only=True, verbose=False, n_threads=threads)
    try:
        return [llm.tokenize(p.encode("utf-8"), add_bos=True, special=False) for p in prompts]
    finally:
        with contextlib.suppress(Exception):
            llm.close()


def _signal_columns(sigs: Sequence[np.ndarray], token_lists, head_kind: str,
                    names: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """Per prompt, the evaluated signal matrix [positions, n_signals].

    reward heads: every position, every named signal. token_reward heads: the
    realised token reward ``signals[j-1, tokens[j]]`` for j >= 1 (one column).
    """
    if head_kind == HeadKind.TOKEN_REWARD:
        out = []
        for s, toks in zip(sigs, token_lists):
            idx = np.asarray(toks[1:], dtype=np.int64)
            out.append(s[np.arange(len(idx)), idx][:, None].astype(np.float64))
        return [HeadKind.TOKEN_REWARD.value], out
    return list(names), [np.asarray(s, dtype=np.float64) for s in sigs]


def _signal_metrics(ref_cols: list[np.ndarray], cols: list[np.ndarray], names: list[str],
                    stds: dict[str, float]) -> dict[str, dict[str, Any]]:
    out = {}
    for k, name in enumerate(names):
        r = np.concatenate([c[:, k] for c in ref_cols])
        o = np.concatenate([c[:, k] for c in cols])
        m = signal_errors(r, o, stds[name])
        agree, n = ranking_agreement([c[-1, k] for c in ref_cols], [c[-1, k] for c in cols])
        m["rank_agreement"] = agree
        m["n_pairs"] = n
        out[name] = m
    return out


def _worst(per_signal: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def pick(key, fn):
        vals = [m[key] for m in per_signal.values() if m.get(key) is not None]
        return fn(vals) if vals else None

    return {
        "mean_abs_rel": pick("mean_abs_rel", max),
        "max_abs_rel": pick("max_abs_rel", max),
        "spearman": pick("spearman", min),
        "rank_agreement": pick("rank_agreement", min),
    }


def _logit_metrics(ref_logits: list[np.ndarray], logits: list[np.ndarray]) -> dict[str, Any]:
    """KLD and top-1 agreement over the positions that predict a token of the
    text (0 .. T-2 of each prompt), as llama-perplexity scores a text."""
    klds, same = [], []
    for r, q in zip(ref_logits, logits):
        r, q = r[:-1], q[:-1]
        klds.append(kl_divergence(r, q))
        same.append(np.argmax(r, axis=-1) == np.argmax(q, axis=-1))
    k = np.concatenate(klds)
    s = np.concatenate(same)
    return {
        "kld_mean": float(k.mean()),
        "kld_p99": float(np.percentile(k, 99)),
        "kld_median": float(np.median(k)),
        "kld_max": float(k.max()),
        "top1": float(s.mean()),
        "n_tokens": int(k.size),
    }


# ---------------------------------------------------------------------------
# the eval
# ---------------------------------------------------------------------------
def _progress(total: int, enabled: bool):
    if not enabled:
        class _Null:
            def update(self, n=1): pass
            def set_description_str(self, s): pass
            def close(self): pass
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True, leave=False)


def evaluate(
    model_gguf: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    *,
    types: str | Sequence[str] = DEFAULT_TYPES,
    prompts: str | os.PathLike | Sequence[str] | None = None,
    threads: int | None = None,
    keep_dir: str | os.PathLike | None = None,
    kv_type: str = "f16",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the eval and return the report (the JSON document, docs/EVAL.md).

    ``prompts``: a file path, a list of texts, or None for the default set.
    ``keep_dir``: keep the per-type GGUFs there (default: a temporary directory,
    removed at the end). ``kv_type``: KV cache type of every runtime model
    (f16, llama.cpp's default; f32 isolates the weight quantization). Raises :class:`EvalError` (and the converter's /
    adapter's own ``ValueError`` subclasses) for bad input.
    """
    from otter_gguf.runtime.llama import otter_runtime_available

    t_start = time.time()
    model_gguf = Path(model_gguf)
    adapter_dir = Path(adapter_dir)
    base_dir = Path(base_dir)
    type_list = parse_types(types)
    if kv_type not in KV_TYPES:
        raise EvalError(f"unknown KV cache type {kv_type!r}; expected one of: {', '.join(KV_TYPES)}")
    if isinstance(prompts, (list, tuple)):
        texts = [str(p).strip() for p in prompts if str(p).strip()]
        if len(texts) < 2:
            raise EvalError(f"{len(texts)} prompt(s) given; the eval needs at least 2")
        prompt_src = "<list>"
    else:
        texts = load_prompts(prompts)
        prompt_src = str(Path(prompts) if prompts is not None else DEFAULT_PROMPTS)
    if not model_gguf.exists():
        raise EvalError(f"MODEL.gguf {model_gguf} does not exist")
    if model_gguf.is_dir():
        raise EvalError(f"MODEL.gguf {model_gguf} is a directory; expected the f32 (or f16) GGUF file")
    if not (adapter_dir / "otter_config.json").is_file():
        raise EvalError(f"--adapter {adapter_dir}: no otter_config.json there (expected an Otter adapter directory)")
    if not (base_dir / "config.json").is_file() and not (base_dir.is_file() and _is_gguf(base_dir)):
        raise EvalError(f"--base {base_dir}: no config.json there (expected the HF base model directory, "
                        f"or a base GGUF; the PyTorch reference runs on it)")
    threads = int(threads or max(1, (os.cpu_count() or 2) // 2))
    from otter_gguf.format.adapter import open_adapter

    adapter = open_adapter(adapter_dir)  # AdapterError on a bad adapter
    acfg = adapter.config
    minfo = _inspect_model(model_gguf)
    try:
        from otter_gguf.format.adapter import check_against_base

        check_against_base(acfg, minfo.hparams)
    except ValueError as e:
        raise EvalError(f"the adapter does not fit MODEL.gguf {model_gguf}: {e}") from None
    if minfo.is_otter and minfo.head_kind == acfg.head_kind and acfg.head_kind == HeadKind.REWARD \
            and list(minfo.signal_names) != list(acfg.signal_names):
        raise EvalError(f"MODEL.gguf {model_gguf} carries an Otter head with signals {minfo.signal_names}, "
                        f"the adapter has {list(acfg.signal_names)}; pass the GGUF made from this adapter "
                        f"(or its plain base GGUF)")
    if not otter_runtime_available():
        raise EvalError("the loaded llama.cpp runtime has no Otter API; install the patched runtime "
                        "(`otter-gguf build-runtime`) to run the eval")

    own_tmp = keep_dir is None
    work = Path(tempfile.mkdtemp(prefix="otter-eval-")) if own_tmp else Path(keep_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        token_lists = _tokenize(model_gguf, texts, threads)
        short = [i + 1 for i, t in enumerate(token_lists) if len(t) < 2]
        if short:
            raise EvalError(f"prompt(s) {short[:5]} tokenize to fewer than 2 tokens; each needs at least one "
                            f"token after BOS")
        n_ctx = max(len(t) for t in token_lists)
        if minfo.n_ctx_train and n_ctx > minfo.n_ctx_train:
            raise EvalError(f"the longest prompt has {n_ctx} tokens, more than the model's context "
                            f"length {minfo.n_ctx_train}")
        n_ctx = max(8, n_ctx)
        n_p = len(token_lists)
        bar = _progress(n_p * (2 + 2 * len(type_list)) + len(type_list), progress)

        def tick(n=1):
            bar.update(n)

        try:
            bar.set_description_str("PyTorch f32 reference")
            ref_sig, torch_logits, cfg = _torch_reference(base_dir, adapter_dir, token_lists, tick, threads)
            names, ref_cols = _signal_columns(ref_sig, token_lists, cfg.head_kind, cfg.signal_names)
            stds = {}
            for k, name in enumerate(names):
                allv = np.concatenate([c[:, k] for c in ref_cols])
                stds[name] = float(allv.std())

            bar.set_description_str(f"{model_gguf.name} (reference)")
            ref_logits, model_sig = _run_gguf(model_gguf, token_lists, n_ctx, threads, tick,
                                              signals=minfo.is_otter, kv_type=kv_type)
            reference: dict[str, Any] = {
                "gguf": str(model_gguf),
                "base_type": minfo.base_type,
                "is_otter": minfo.is_otter,
                "sizes": gguf_sizes(model_gguf),
                "vs_torch_logits": _logit_metrics(torch_logits, ref_logits),
            }
            vt = reference["vs_torch_logits"]
            if vt["kld_mean"] > MAX_REFERENCE_KLD:
                raise EvalError(
                    f"MODEL.gguf {model_gguf} is not the --base model: its main logits differ from the PyTorch "
                    f"reference on {base_dir} (KLD mean {vt['kld_mean']:.3g} nats, top-1 agreement "
                    f"{100 * vt['top1']:.1f}%); pass the GGUF converted from --base")
            if model_sig is not None:
                _, cols = _signal_columns(model_sig, token_lists, cfg.head_kind, cfg.signal_names)
                per = _signal_metrics(ref_cols, cols, names, stds)
                reference["signals"] = per
                reference["worst"] = _worst(per)

            if minfo.is_otter:
                base_src = work / "base-reference.gguf"
                _write_base_part(model_gguf, base_src)
            else:
                base_src = model_gguf

            results: dict[str, Any] = {}
            for t in type_list:
                bar.set_description_str(f"{t}: quantize + convert")
                base_t = work / f"base-{t}.gguf"
                otter_t = work / f"otter-{t}.gguf"
                for p in (base_t, otter_t):
                    if p.exists():
                        p.unlink()
                from otter_gguf.io.llama_quantize import quantize
                from otter_gguf_converter import convert

                quantize(base_src, base_t, t, threads=threads, log_level=None)

                with contextlib.redirect_stdout(sys.stderr):
                    convert(adapter_dir, base_t, otter_t, outtype=t, force=True, progress=False)
                if own_tmp:
                    base_t.unlink()
                tick()
                bar.set_description_str(f"{t}: run")
                logits, sig = _run_gguf(otter_t, token_lists, n_ctx, threads, tick, signals=True,
                                        kv_type=kv_type)
                _, cols = _signal_columns(sig, token_lists, cfg.head_kind, cfg.signal_names)
                per = _signal_metrics(ref_cols, cols, names, stds)
                bar.set_description_str(f"{t}: PyTorch on its weights")
                i_sig, i_logits = _torch_intrinsic(otter_t, cfg, token_lists, tick, threads)
                _, i_cols = _signal_columns(i_sig, token_lists, cfg.head_kind, cfg.signal_names)
                i_per = _signal_metrics(ref_cols, i_cols, names, stds)
                results[t] = {
                    "sizes": gguf_sizes(otter_t),
                    "signals": per,
                    "worst": _worst(per),
                    "logits": _logit_metrics(ref_logits, logits),
                    "intrinsic": {"signals": i_per, "worst": _worst(i_per),
                                  "logits": _logit_metrics(torch_logits, i_logits)},
                }
                results[t]["runtime_added"] = runtime_added(results[t])
                if own_tmp:
                    otter_t.unlink()
        finally:
            bar.close()
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
        elif (work / "base-reference.gguf").exists():
            (work / "base-reference.gguf").unlink()

    import llama_cpp

    h = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return {
        "otter_eval_version": EVAL_FORMAT_VERSION,
        "model": str(model_gguf),
        "adapter": str(adapter_dir),
        "base": str(base_dir),
        "head_kind": cfg.head_kind,
        "signal_names": names,
        "signal_std": stds,
        "prompts": {"source": prompt_src, "n": n_p, "n_tokens": int(sum(len(t) for t in token_lists)),
                    "sha256": h},
        "settings": {"threads": threads, "kv_cache": kv_type, "kld_reference": "MODEL.gguf",
                     "signal_reference": "PyTorch float32"},
        "runtime": {"llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "series": _series()},
        "reference": reference,
        "types": results,
        "seconds": round(time.time() - t_start, 1),
    }


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def runtime_added(result: dict[str, Any]) -> float | None:
    """What the runtime adds on top of the weight rounding, for one type's result: the
    runtime's mean signal error over the intrinsic one (the PyTorch reference on that
    GGUF's own dequantized weights), minus 1 (0.1 = the runtime adds 10%)."""
    rt = (result.get("worst") or {}).get("mean_abs_rel")
    intr = ((result.get("intrinsic") or {}).get("worst") or {}).get("mean_abs_rel")
    if rt is None or not intr:
        return None
    return rt / intr - 1.0


def _series() -> str | None:
    try:
        from otter_gguf.runtime import capi as _lib

        return _lib.series()
    except Exception:  # noqa: BLE001 - informational only
        return None


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


# ---------------------------------------------------------------------------
# regression support
# ---------------------------------------------------------------------------
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
                fails.append(f"{t}: {key} = {_f(v, '.6g')}, target {op} {bound:g}")
    return fails
