"""Otter vs base under an offload: decode (and prefill) tokens/s with the same -ngl / --rpc, next to the CPU.

For each model, side by side in one process, each configuration run ``--repeats`` times in turn (ABAB...,
medians reported): the base GGUF and the Otter GGUF on the CPU, then both with the offload. Greedy decode of
``--n-decode`` tokens after a ``--n-prompt`` token prompt (one llama_decode per token, the side stream on).
The figure that carries over between machines is the Otter/base decode ratio under the same offload: over
RPC on loopback or on llvmpipe absolute speed means nothing (issue 21); on a real GPU the tokens/s too.

    python benchmarks/bench_backends.py --rpc-local 2 -ngl all [--models smollm2,1b] [--json OUT]
    python benchmarks/bench_backends.py -ngl all          # a GPU build (make parity-cuda runs this)

``--rpc-local N`` starts N ``ggml-rpc-server`` processes on 127.0.0.1 (the runtime's own) and splits over
them; ``--rpc HOST:PORT,...`` uses running servers. Models: ``smollm2`` (SmolLM2-135M-Instruct Q4_1 from PyPI
with its demo head at q8_0), ``1b`` (``otter-gguf bench``'s random 1B llama at q4_k_m with its d2=256 head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path


def _models(name: str, cache: Path):
    """(base GGUF, Otter GGUF)."""
    if name == "smollm2":
        from otter_gguf.demo import smollm2 as demo
        from otter_gguf_converter import convert

        base = demo.model_path(quiet=True)
        otter = cache / "backends-smollm2" / "otter-q8_0.gguf"
        if not otter.exists():
            otter.parent.mkdir(parents=True, exist_ok=True)
            convert(demo.ADAPTER_DIR, base, otter, outtype="q8_0", progress=False)
        return base, otter
    from otter_gguf.tools.bench import prepare_random

    ms = prepare_random(name, "q4_k_m", cache, token_head=False, reward_model=False)
    return ms.base, ms.otter


def _run(path: Path, n_prompt: int, n_decode: int, threads: int, offload: dict) -> dict:
    """Prefill and greedy decode tokens/s of one model load."""
    import numpy as np

    from otter_gguf.runtime.session import Model

    m = Model(path, **offload)
    try:
        c = m.context(n_ctx=n_prompt + n_decode + 8, n_batch=max(n_prompt, 8), n_threads=threads)
        try:
            toks = [1] + [int(t) for t in np.random.RandomState(0).randint(100, min(m.n_vocab, 30000), n_prompt - 1)]
            t0 = time.perf_counter()
            c.prefill(toks)
            t1 = time.perf_counter()
            tok, pos = int(np.argmax(c.logits_ith(-1))), len(toks)
            for _ in range(n_decode):
                c.decode([tok], pos0=pos)
                if m.has_otter:
                    assert c.signals_ith(-1) is not None
                tok, pos = int(np.argmax(c.logits_ith(-1))), pos + 1
            t2 = time.perf_counter()
            return {"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_decode / (t2 - t1)}
        finally:
            c.close()
    finally:
        m.close()


def bench_model(name: str, cache: Path, offload: dict, repeats: int, n_prompt: int, n_decode: int,
                threads: int) -> dict:
    base, otter = _models(name, cache)
    configs = {"base": (base, {}), "otter": (otter, {}), "base+offload": (base, offload),
               "otter+offload": (otter, offload)}
    runs = {k: [] for k in configs}
    for r in range(repeats):
        for k, (path, off) in configs.items():
            runs[k].append(_run(path, n_prompt, n_decode, threads, off))
            print(f"[backends] {name} rep {r + 1}/{repeats} {k}: decode {runs[k][-1]['decode_tps']:.2f} tok/s, "
                  f"prefill {runs[k][-1]['prefill_tps']:.1f} tok/s", file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("decode_tps", "prefill_tps")} for k, v in runs.items()}
    return {"model": name, "configs": med, "runs": runs,
            "ratio_cpu": med["otter"]["decode_tps"] / med["base"]["decode_tps"],
            "ratio_offload": med["otter+offload"]["decode_tps"] / med["base+offload"]["decode_tps"],
            "prefill_ratio_offload": med["otter+offload"]["prefill_tps"] / med["base+offload"]["prefill_tps"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2", help="comma list: smollm2, 1b")
    ap.add_argument("-ngl", "--n-gpu-layers", default="all", help="layers to offload (a number or all)")
    ap.add_argument("-ts", "--tensor-split", default=None, help="proportions per device, e.g. 1,1")
    ap.add_argument("--rpc", default=None, help="running RPC servers HOST:PORT,...")
    ap.add_argument("--rpc-local", type=int, default=0, help="start this many local RPC servers and split over them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=64)
    ap.add_argument("--n-decode", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from otter_gguf.cli.offload import parse_tensor_split
    from otter_gguf.runtime.backends import LocalRpcServers, devices
    from otter_gguf.tools.bench import DEFAULT_CACHE

    cache = a.cache_dir or DEFAULT_CACHE
    offload = {"n_gpu_layers": -1 if a.n_gpu_layers == "all" else int(a.n_gpu_layers)}
    ts = parse_tensor_split(a.tensor_split)
    if ts:
        offload["tensor_split"] = ts
    with contextlib.ExitStack() as stack:
        if a.rpc_local:
            offload["rpc_servers"] = stack.enter_context(LocalRpcServers(a.rpc_local, threads=a.threads)).spec
        elif a.rpc:
            offload["rpc_servers"] = a.rpc
        report = {"offload": offload, "devices": [d.__dict__ for d in devices()], "threads": a.threads,
                  "n_prompt": a.n_prompt, "n_decode": a.n_decode, "repeats": a.repeats, "models": []}
        for name in [m.strip() for m in a.models.split(",") if m.strip()]:
            report["models"].append(bench_model(name, cache, offload, a.repeats, a.n_prompt, a.n_decode, a.threads))
    for m in report["models"]:
        c = m["configs"]
        print(f"{m['model']}: decode tok/s base {c['base']['decode_tps']:.2f}  otter {c['otter']['decode_tps']:.2f}  "
              f"(x{m['ratio_cpu']:.3f}) | offload base {c['base+offload']['decode_tps']:.2f}  otter "
              f"{c['otter+offload']['decode_tps']:.2f} (x{m['ratio_offload']:.3f}); prefill x{m['prefill_ratio_offload']:.3f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
