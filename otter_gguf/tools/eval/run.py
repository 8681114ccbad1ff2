"""``evaluate``: every type of ``--types`` quantized, converted, run and compared."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from otter_gguf.format.constants import HeadKind
from otter_gguf.tools.eval.inputs import (
    DEFAULT_PROMPTS, DEFAULT_TYPES, EvalError, _inspect_model, _write_base_part, load_prompts, parse_types,
)
from otter_gguf.tools.eval.metrics import gguf_sizes
from otter_gguf.tools.eval.models import (
    KV_TYPES, _logit_metrics, _run_gguf, _signal_columns, _signal_metrics, _tokenize, _torch_intrinsic,
    _torch_reference, _worst,
)


EVAL_FORMAT_VERSION = 1


#: MODEL.gguf vs PyTorch (--base) main-logit KLD above which they are not the same model
MAX_REFERENCE_KLD = 1e-2


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
    offload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the eval and return the report (the JSON document, docs/EVAL.md).

    ``prompts``: a file path, a list of texts, or None for the default set.
    ``keep_dir``: keep the per-type GGUFs there (default: a temporary directory,
    removed at the end). ``kv_type``: KV cache type of every runtime model
    (f16, llama.cpp's default; f32 isolates the weight quantization). ``offload``: OtterLlama's offload
    arguments (n_gpu_layers, split_mode, main_gpu, tensor_split, rpc_servers) of every runtime model. Raises :class:`EvalError` (and the converter's /
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
                                              signals=minfo.is_otter, kv_type=kv_type, offload=offload)
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
                                        kv_type=kv_type, offload=offload)
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
        "settings": {"threads": threads, "kv_cache": kv_type, "offload": dict(offload or {}), "kld_reference": "MODEL.gguf",
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
