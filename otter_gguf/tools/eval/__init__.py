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
and documented one by one (``metrics.py``). The package's modules: ``inputs`` (prompts, types,
MODEL.gguf), ``models`` (the PyTorch reference and the GGUF runs), ``run`` (:func:`evaluate`),
``report`` (table, plot, files). The regression rules that judge a report against a committed
baseline are the test suite's (tests/eval_regression.py)."""

from __future__ import annotations

from otter_gguf.tools.eval.inputs import DEFAULT_PROMPTS, DEFAULT_TYPES, EvalError, load_prompts, parse_types
from otter_gguf.tools.eval.metrics import (
    gguf_sizes, kl_divergence, ranking_agreement, signal_errors, spearman,
)
from otter_gguf.tools.eval.models import KV_TYPES
from otter_gguf.tools.eval.report import format_table, plot, write_outputs
from otter_gguf.tools.eval.run import EVAL_FORMAT_VERSION, MAX_REFERENCE_KLD, evaluate, runtime_added

__all__ = [
    "KV_TYPES", "parse_types", "DEFAULT_PROMPTS", "DEFAULT_TYPES", "EVAL_FORMAT_VERSION", "EvalError", "MAX_REFERENCE_KLD", "evaluate",
    "format_table", "gguf_sizes", "kl_divergence", "load_prompts", "plot", "ranking_agreement", "runtime_added",
    "signal_errors", "spearman", "write_outputs"
]
