"""``run_bench``: the checked options, the models prepared and the sections run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from otter_gguf.tools.bench.config import (
    CONFIGS, DEFAULT_CACHE, REAL_MODELS, RM_CONFIGS, SHAPES, check_models, model_arch,
)
from otter_gguf.tools.bench.models import log, demo_available, prepare_demo, prepare_random, prepare_real
from otter_gguf.tools.bench.report import machine_meta
from otter_gguf.tools.bench.sections import bench_ctx, bench_d2, bench_main, bench_profile
from otter_gguf.tools.bench.stats import load_average


def run_bench(*, quick: bool = False, models: Sequence[str] = ("1b",), types: Sequence[str] = ("q4_k_m",),
              repeats: int = 3, threads: int = 2, cache_dir: Path = DEFAULT_CACHE, sections: Sequence[str] = ("main",),
              configs: Sequence[str] = CONFIGS, n_prompt: int = 128, n_decode: int = 32, top_k: int = 10,
              ctx_lengths: Sequence[int] = (256, 512, 1024, 2048, 4096), ctx_decode: int = 16,
              d2_values: Optional[Sequence[int]] = None, sweep_type: Optional[str] = None,
              sweep_repeats: Optional[int] = None, offload: Optional[Dict[str, Any]] = None) -> dict:
    """The benchmark report; ``offload``: OtterLlama's offload arguments (n_gpu_layers, split_mode, main_gpu,
    tensor_split, rpc_servers) for every model of every worker, the same for Otter and base."""
    from otter_gguf.tools.bench import worker

    worker.OFFLOAD.clear()
    worker.OFFLOAD.update(offload or {})
    cache_dir = Path(cache_dir)
    check_models(models, types, configs)
    report: Dict[str, Any] = {"meta": machine_meta(threads), "main": [], "ctx": [], "d2": [], "profile": []}
    report["meta"]["options"] = dict(quick=quick, models=list(models), types=list(types), repeats=repeats,
                                     sections=list(sections), configs=list(configs), n_prompt=n_prompt,
                                     n_decode=n_decode, top_k=top_k, ctx_lengths=list(ctx_lengths),
                                     ctx_decode=ctx_decode, d2_values=list(d2_values or []),
                                     offload=dict(offload or {}))
    sweep_type = sweep_type or types[0]
    sweep_repeats = sweep_repeats or repeats
    for name in models:
        has_rm = model_arch(name) == "llama"
        for qt in types:
            want_sweep = name in SHAPES and "d2" in sections and qt == sweep_type and has_rm
            if name in REAL_MODELS:
                ms = prepare_real(name, qt, cache_dir, token_head="d_tok" in configs)
            elif name == "demo":
                if not demo_available():
                    log("[bench] the demo model (otter_gguf/demo/base, adapter) is not there: skipped")
                    report.setdefault("skipped", []).append("demo: model not present")
                    break
                ms = prepare_demo(qt, cache_dir)
            else:
                d = SHAPES[name]["d"]
                sweep = list(d2_values) if d2_values else [d // 16, d // 8, d // 4, d // 2]
                ms = prepare_random(name, qt, cache_dir, sweep if want_sweep else (), token_head="d_tok" in configs,
                                    reward_model=bool(set(RM_CONFIGS) & set(configs)) or want_sweep)
            if "main" in sections:
                report["main"].append(bench_main(ms, configs, repeats=repeats, threads=threads, n_prompt=n_prompt,
                                                 n_decode=n_decode, top_k=top_k))
            if "ctx" in sections and qt == sweep_type and name != "demo":
                report["ctx"].append(bench_ctx(ms, [c for c in ("a", "b", "c") if c in configs], ctx_lengths,
                                               repeats=sweep_repeats, threads=threads, n_decode=ctx_decode))
            if "profile" in sections and qt == sweep_type:
                report["profile"].append(bench_profile(ms, [c for c in ("a", "b", "d_tok") if c in configs],
                                                       threads=threads, n_prompt=n_prompt, n_decode=n_decode))
            if want_sweep:
                report["d2"].append(bench_d2(ms, repeats=sweep_repeats, threads=threads, n_prompt=n_prompt,
                                             n_decode=n_decode))
    report["meta"]["load_after"] = load_average()
    return report
