"""What `otter-gguf bench` measures: the configurations, the model shapes, the cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence

from otter_gguf.io.cache import cache_dir


CONFIGS = ("a", "a0", "b", "c", "d_rm", "d_tok", "d_scalar")
CONFIG_LABELS = {
    "a": "(a) base alone (Otter GGUF, side stream off)",
    "a0": "(a0) plain base GGUF",
    "b": "(b) Otter: tokens + rewards, one pass",
    "c": "(c) base + separate reward model",
    "d_rm": "(d) ARGS k: base + RM scores k candidates (batched)",
    "d_tok": "(d) Otter ARGS, token_reward head (one pass)",
    "d_scalar": "(d) Otter ARGS, scalar head (k candidates batched)",
}

SHAPES: Dict[str, dict] = {
    # d, L, h, h_kv, f, V (hd = d / h) and the Otter side stream
    # 1b: the model of the committed results (benchmarks/results) and of benchmarks/bench_runtime.py
    "1b": dict(d=2048, L=16, h=32, h_kv=8, f=8192, V=32000, ctx_train=4096, model_name="bench-1b-random",
               d2=256, h2=4, h2_kv=1, f2=1024),
    "tiny": dict(d=256, L=2, h=4, h_kv=2, f=512, V=1024, ctx_train=2048,
                 d2=32, h2=1, h2_kv=1, f2=128),
    # Qwen3 0.6B's shape (random weights, tied LM head); side d2 = d/8 as for 1b, one side head of hd=128
    "qwen3-0.6b": dict(arch="qwen3", d=1024, L=28, h=16, h_kv=8, hd=128, f=3072, V=151936, ctx_train=40960,
                       tied=True, model_name="bench-qwen3-0.6b-random", d2=128, h2=1, h2_kv=1, f2=512),
}
#: real bases (fetched, not generated): name -> (the function returning the GGUF, its type, the side shape)
REAL_MODELS: Dict[str, dict] = {
    # Gemma 3 270M Q4_K_M (PyPI): d=640, hd=256; d2 = 128 (d/8 = 80 would leave rows of 720, which fit no block
    # of q4_k / q5_0 / q8_0 and would stay f16; 640 + 128 = 768 fits q4_k)
    "gemma3-270m": dict(arch="gemma3", qtype="q4_k_m", d2=128, h2=1, h2_kv=1, f2=512, base_model="gemma-3-270m"),
}
MODELS = (*SHAPES, *REAL_MODELS, "demo")
#: the configurations that need the separate reward model (llama bases only)
RM_CONFIGS = ("c", "d_rm")


def model_arch(name: str) -> str:
    """The base architecture of the bench model ``name``."""
    return (SHAPES.get(name) or REAL_MODELS.get(name) or {}).get("arch") or "llama"
DEFAULT_CACHE = Path(os.environ.get("OTTER_BENCH_CACHE") or cache_dir() / "bench")


class BenchError(ValueError):
    """Bad benchmark input (an unknown model, type, configuration or section)."""


def check_models(models: Sequence[str], types: Sequence[str], configs: Sequence[str]) -> None:
    """BenchError for a model that is not one of ``MODELS``, a reward-model configuration on a base without
    one, or a real model at a type other than its file's."""
    for name in models:
        if name not in MODELS:
            raise BenchError(f"--models: unknown model {name!r}; expected one of {', '.join(MODELS)}")
        if model_arch(name) != "llama" and set(RM_CONFIGS) & set(configs):
            raise BenchError(f"--configs {','.join(c for c in configs if c in RM_CONFIGS)}: {name} "
                             f"({model_arch(name)}) has no separate reward model (llama.cpp's llama-embed graph is "
                             f"llama's); use {', '.join(c for c in CONFIGS if c not in RM_CONFIGS)}")
        want = REAL_MODELS.get(name, {}).get("qtype")
        if want and any(t != want for t in types):
            raise BenchError(f"--types: {name} is the {want} file from PyPI; expected --types {want}")
