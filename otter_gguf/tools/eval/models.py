"""Running the models of the eval: the PyTorch reference, the GGUFs on the runtime, and their metrics."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from otter_gguf.format.constants import HeadKind
from otter_gguf.tools.eval.metrics import kl_divergence, ranking_agreement, signal_errors


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
def _llama(path: Path, n_ctx: int, threads: int, kv_type: str = "f16", offload: dict | None = None):
    from otter_gguf.io.llama_log import llama_logs
    from otter_gguf.runtime.llama import OtterLlama

    with llama_logs(level=logging.WARNING, log_level=None) as kept:  # kept for the error message only
        try:
            llm = OtterLlama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                             n_threads=threads, n_threads_batch=threads, verbose=False,
                             type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], **(offload or {}))
        except ValueError as e:
            raise RuntimeError(f"cannot load {path}: {e}\n" + "\n".join(kept[-10:])) from None
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.close()


def _run_gguf(path: Path, token_lists, n_ctx: int, threads: int, tick, *, signals: bool,
              kv_type: str = "f16", offload: dict | None = None):
    """(logits per prompt [T, V], signals per prompt [T, n_out] or None).

    One decode per prompt with ``logits_all=True``: the main logits of every
    position (``Llama.scores``) and the Otter signals OtterLlama records for
    every output row (``OtterLlama.signals``) come from the same pass.
    """
    logits, sigs = [], []
    with _llama(path, n_ctx, threads, kv_type, offload) as llm:
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
