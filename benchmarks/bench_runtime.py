"""Runtime benchmark: base vs Otter side stream on vs off (docs/RUNTIME.md).

A 1B-shaped random llama (d=2048, 16 layers, 32/8 heads, f=8192, V=32000)
at q4_k_m with an Otter adapter d2=256, h2=4, h2_kv=1, f2=1024 (reward, n_out=1),
2 threads. Reports prefill and decode tok/s for

  base      the base GGUF alone
  side-on   the Otter GGUF, side stream on (signals every decode)
  side-off  the Otter GGUF, llama_set_otter(ctx, false)
  sidecar   the base GGUF + the same head as an Otter adapter GGUF (otter-gguf split of the Otter GGUF)
  two-heads the base GGUF + two adapter GGUFs (the head twice, under two names)

and the peak RSS of each run (one subprocess per configuration), and checks
decode(side-on) >= 0.95 * decode(base) / (1 + otter_bytes/base_bytes).

    LLAMA_CPP_LIB_PATH=/path/to/patched/bin python benchmarks/bench_runtime.py [--work DIR] [--model tiny]

The models are those of ``otter-gguf bench`` (otter_gguf.tools.bench.SHAPES):
the base GGUF is written with gguf-py by
otter_gguf.io.random_base.write_random_base (random weights, a
SentencePiece-style vocabulary), the adapter by
otter_gguf.tools.bench.write_random_adapter; the adapter is converted at f16
with otter_gguf_converter.convert and both files are quantized by llama.cpp's
quantizer (otter_gguf.io.llama_quantize.quantize). ``--model tiny`` is the
seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from otter_gguf.io.llama_log import llama_logs
from otter_gguf.io.llama_quantize import quantize
from otter_gguf.io.random_base import write_random_base
from otter_gguf.tools.bench import SHAPES, write_random_adapter
from otter_gguf_converter import convert

QTYPE = "q4_k_m"


def prepare_heads(work: Path, otter_q: Path) -> tuple[Path, Path]:
    """Two adapter GGUFs of the Otter GGUF's head (split; the second a copy under another name)."""
    from otter_gguf_converter.sidecar import split

    heads = work / f"head-{QTYPE}.gguf", work / f"head2-{QTYPE}.gguf"
    if not all(h.exists() for h in heads):
        split(otter_q, work / "split-base.gguf", heads[0], name="head", force=True, progress=False)
        split(otter_q, work / "split-base.gguf", heads[1], name="head2", force=True, progress=False)
        (work / "split-base.gguf").unlink()
    return heads


def prepare(work: Path, model: str = "1b", threads: int = 2) -> tuple[Path, Path]:
    """(base, Otter) GGUFs at QTYPE in ``work`` (made once)."""
    base_q = work / f"base-{QTYPE}.gguf"
    otter_q = work / f"otter-{QTYPE}.gguf"
    if base_q.exists() and otter_q.exists():
        return base_q, otter_q
    shape = dict(SHAPES[model], name=model)
    base16 = work / "base-f16.gguf"
    if not base16.exists():
        print(f"writing random {model} base (f16) ...", flush=True)
        write_random_base(base16, shape, seed=0)
    adapter = work / "adapter"
    if not (adapter / "otter_config.json").exists():
        print("writing adapter ...", flush=True)
        write_random_adapter(adapter, shape, {k: shape[k] for k in ("d2", "h2", "h2_kv", "f2")}, "reward")
    otter16 = work / "otter-f16.gguf"
    if not otter16.exists():
        print("converting adapter ...", flush=True)
        convert(adapter, base16, otter16, outtype="f16", force=True, progress=False)
    print(f"quantizing to {QTYPE} ...", flush=True)
    quantize(base16, base_q, QTYPE, threads=threads)
    quantize(otter16, otter_q, QTYPE, threads=threads)
    return base_q, otter_q


def run_one(model_path: str, mode: str, n_prefill: int, n_decode: int, threads: int, heads=()) -> dict:
    with llama_logs(level=logging.ERROR, log_level=logging.ERROR):  # llama.cpp's errors only
        return _run_one(model_path, mode, n_prefill, n_decode, threads, heads)


def _run_one(model_path: str, mode: str, n_prefill: int, n_decode: int, threads: int, heads=()) -> dict:
    from otter_gguf.runtime.session import Model

    model = Model(model_path)
    adapters = [model.load_adapter(h) for h in heads]
    own = [model.own_adapter] if model.own_adapter else []
    ctx = model.context(n_ctx=max(1024, n_prefill + n_decode + 16), n_batch=max(512, n_prefill),
                        n_threads=threads, heads=own + adapters if adapters else None)
    if mode == "side-off":
        ctx.set_otter(False)
    rng = np.random.default_rng(0)
    toks = [int(x) for x in rng.integers(300, model.n_vocab, size=n_prefill + n_decode)]

    # warm-up
    ctx.decode(toks[:8], 0, logits="last")
    ctx.clear()

    t0 = time.perf_counter()
    c0 = time.process_time()
    ctx.decode(toks[:n_prefill], 0, logits="last")
    ctx.logits_ith(-1)
    t_prefill = time.perf_counter() - t0
    c_prefill = time.process_time() - c0

    got_signal = None
    t0 = time.perf_counter()
    c0 = time.process_time()
    for i in range(n_decode):
        ctx.decode([toks[n_prefill + i]], n_prefill + i, logits="last")
        ctx.logits_ith(-1)
        if mode != "base" and mode != "side-off":
            sig = ctx.signals_ith(-1)
            got_signal = None if sig is None else float(sig[0])
    t_decode = time.perf_counter() - t0
    c_decode = time.process_time() - c0

    model.close()
    if mode != "base" and mode != "side-off":
        assert got_signal is not None, "no signals with the side stream on"
    return {
        "mode": mode,
        "prefill_tok_s": n_prefill / t_prefill,
        "decode_tok_s": n_decode / t_decode,
        # CPU time per token: robust against other load on the machine with --threads 1
        "prefill_cpu_ms": 1000.0 * c_prefill / n_prefill,
        "decode_cpu_ms": 1000.0 * c_decode / n_decode,
        "max_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak over fork+exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "otter-bench",
                    help="where the models are made (a folder per --model)")
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b",
                    help="the random model's shape (tiny: a smoke run of seconds)")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (the median is reported)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--head", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.prefill, a.decode, a.threads, a.head)))
        return

    from otter_gguf.tools.eval import gguf_sizes

    work = a.work / a.model
    work.mkdir(parents=True, exist_ok=True)
    base_q, otter_q = prepare(work, a.model, a.threads)
    head1, head2 = prepare_heads(work, otter_q)
    sizes = gguf_sizes(otter_q)
    base_bytes, otter_bytes = sizes["base_bytes"], sizes["otter_bytes"]
    ratio = otter_bytes / base_bytes

    # round-robin over the configurations so that a change in machine load hits all of them;
    # the median of the runs is reported
    runs: dict[str, list[dict]] = {"base": [], "side-on": [], "side-off": [], "sidecar": [], "two-heads": []}
    paths = {"base": base_q, "side-on": otter_q, "side-off": otter_q, "sidecar": base_q, "two-heads": base_q}
    heads = {"sidecar": [head1], "two-heads": [head1, head2]}
    for _ in range(a.repeat):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(paths[mode]), mode, "--prefill", str(a.prefill),
                 "--decode", str(a.decode), "--threads", str(a.threads),
                 *[x for h in heads.get(mode, []) for x in ("--head", str(h))]],
                check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {
        mode: {k: float(np.median([r[k] for r in rs])) for k in rs[0]
            if k != "mode"}
        for mode, rs in runs.items()
    }
    load1 = os.getloadavg()[0]

    print(f"\n{a.model} {QTYPE}, {a.threads} threads, prefill {a.prefill} tokens, decode {a.decode} tokens, "
          f"median of {a.repeat} runs, load average {load1:.1f} on {os.cpu_count()} CPUs")
    print(f"tensor bytes: base {base_bytes / 2**20:.1f} MiB, otter {otter_bytes / 2**20:.1f} MiB "
          f"(otter/base = {ratio:.3f})")
    print(f"{'mode':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill CPU ms/tok':>19} "
          f"{'decode CPU ms/tok':>18} {'max RSS MiB':>12}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} {r['prefill_cpu_ms']:>19.1f} "
              f"{r['decode_cpu_ms']:>18.1f} {r['max_rss_mib']:>12.0f}")
    target = 0.95 * results["base"]["decode_tok_s"] / (1 + ratio)
    ok = results["side-on"]["decode_tok_s"] >= target
    print(f"target decode (side-on) >= 0.95 * base / (1 + otter/base) = {target:.2f} tok/s: "
          f"{'PASS' if ok else 'FAIL'}")
    off = results["side-off"]["decode_tok_s"] / results["base"]["decode_tok_s"]
    print(f"side-off / base decode = {off:.3f}")
    on, sc, two = results["side-on"], results["sidecar"], results["two-heads"]
    print(f"sidecar / one-file: decode {sc['decode_tok_s'] / on['decode_tok_s']:.3f}, prefill "
          f"{sc['prefill_tok_s'] / on['prefill_tok_s']:.3f}, max RSS {sc['max_rss_mib'] / on['max_rss_mib']:.3f} "
          f"(target RSS <= 1.05)")
    target2 = 0.95 * results["base"]["decode_tok_s"] / (1 + 2 * ratio)
    print(f"two heads: decode {two['decode_tok_s']:.2f} tok/s, target 0.95 * base / (1 + 2 * otter/base) = "
          f"{target2:.2f}: {'PASS' if two['decode_tok_s'] >= target2 else 'FAIL'}")
    cpu_on = results["base"]["decode_cpu_ms"] / results["side-on"]["decode_cpu_ms"]
    print(f"by CPU time: side-on decode speed / base = {cpu_on:.3f} "
          f"(target {0.95 / (1 + ratio):.3f}; meaningful with --threads 1)")
    print(json.dumps({"ratio": ratio, "target_decode": target, "pass": ok, **results}))


if __name__ == "__main__":
    main()
