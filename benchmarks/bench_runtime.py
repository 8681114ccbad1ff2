"""Runtime benchmark: base vs Otter side stream on vs off (docs/RUNTIME.md).

A 1B-shaped random llama (d=2048, 16 layers, 32/8 heads, f=8192, V=32000)
at q4_k_m with an Otter adapter d2=256, h2=4, h2_kv=1, f2=1024 (reward, n_out=1),
2 threads. Reports prefill and decode tok/s for

  base      the base GGUF alone
  side-on   the Otter GGUF, side stream on (signals every decode)
  side-off  the Otter GGUF, llama_set_otter(ctx, false)

and the peak RSS of each run (one subprocess per configuration), and checks
decode(side-on) >= 0.95 * decode(base) / (1 + otter_bytes/base_bytes).

    LLAMA_CPP_LIB_PATH=/path/to/patched/bin python benchmarks/bench_runtime.py [--work DIR]

The base GGUF is written directly with gguf-py (random weights, a dummy
SentencePiece-style vocabulary); the adapter is written with
otter_gguf.format.adapter.save_adapter and converted with otter_gguf_converter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D, L, H, HKV, HD, F, V = 2048, 16, 32, 8, 64, 8192, 32000
D2, H2, H2KV, F2 = 256, 4, 1, 1024
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


def write_base_f16(path: Path, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)

    def rnd(*shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("bench-1b-random")
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(V)
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(V - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (V - 259)
    w.add_token_list(toks)
    w.add_token_scores([0.0] * V)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    w.add_tensor("token_embd.weight", rnd(V, D, std=0.02))
    w.add_tensor("output_norm.weight", np.ones(D, dtype=np.float32))
    w.add_tensor("output.weight", rnd(V, D, std=0.02))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(D, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rnd(H * HD, D, std=0.02))
        w.add_tensor(p + "attn_k.weight", rnd(HKV * HD, D, std=0.02))
        w.add_tensor(p + "attn_v.weight", rnd(HKV * HD, D, std=0.02))
        w.add_tensor(p + "attn_output.weight", rnd(D, H * HD, std=0.02))
        w.add_tensor(p + "ffn_norm.weight", np.ones(D, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rnd(F, D, std=0.02))
        w.add_tensor(p + "ffn_up.weight", rnd(F, D, std=0.02))
        w.add_tensor(p + "ffn_down.weight", rnd(D, F, std=0.02))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_adapter(out: Path, seed: int = 1) -> Path:
    from otter_gguf.format.adapter import save_adapter
    from otter_gguf.format.config import OtterConfig

    cfg = OtterConfig(
        base_model="bench-1b-random", base_architecture="llama",
        hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=HKV,
        head_dim=HD, intermediate_size=F, vocab_size=V,
        otter_hidden_size=D2, otter_num_attention_heads=H2, otter_num_key_value_heads=H2KV,
        otter_intermediate_size=F2, head_output_size=1, head_kind="reward", signal_names=["reward"],
    )
    rng = np.random.default_rng(seed)

    def rnd(*shape, std=0.02):
        return rng.standard_normal(shape, dtype=np.float32) * std

    t = {"otter.embed_tokens.weight": rnd(V, D2), "otter.norm.weight": np.ones(D2, np.float32),
         "otter.head.weight": rnd(1, D + D2), "otter.head.bias": np.zeros(1, np.float32)}
    for i in range(L):
        p = f"otter.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(D2, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(D2, np.float32)
        t[p + "self_attn.q_proj.weight"] = rnd(H2 * HD, D + D2)
        t[p + "self_attn.k_proj.weight"] = rnd(H2KV * HD, D + D2)
        t[p + "self_attn.v_proj.weight"] = rnd(H2KV * HD, D + D2)
        t[p + "self_attn.o_proj.weight"] = rnd(D2, (H + H2) * HD)
        t[p + "mlp.gate_proj.weight"] = rnd(F2, D + D2)
        t[p + "mlp.up_proj.weight"] = rnd(F2, D + D2)
        t[p + "mlp.down_proj.weight"] = rnd(D2, F + F2)
    return save_adapter(out, cfg, t, dtype="float16")


_QUIET = None


def quiet_llama_logs() -> None:
    import ctypes

    from llama_cpp import llama_cpp as ll

    global _QUIET

    @ll.llama_log_callback
    def _cb(level, text, ud):
        pass

    _QUIET = _cb
    ll.llama_log_set(_cb, ctypes.c_void_p())


def quantize(src: Path, dst: Path, ftype: int) -> None:
    from llama_cpp import llama_cpp as ll

    quiet_llama_logs()

    p = ll.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def prepare(work: Path) -> tuple[Path, Path]:
    base_q = work / "base-q4_k_m.gguf"
    otter_q = work / "otter-q4_k_m.gguf"
    if base_q.exists() and otter_q.exists():
        return base_q, otter_q
    from otter_gguf_converter.convert import convert

    base16 = work / "base-f16.gguf"
    if not base16.exists():
        print("writing random 1B base (f16) ...", flush=True)
        write_base_f16(base16)
    adapter = work / "adapter"
    if not (adapter / "otter_config.json").exists():
        print("writing adapter ...", flush=True)
        write_adapter(adapter)
    otter16 = work / "otter-f16.gguf"
    if not otter16.exists():
        print("converting adapter ...", flush=True)
        convert(adapter, base16, otter16, outtype="f16", force=True, progress=False)
    print("quantizing to q4_k_m ...", flush=True)
    quantize(base16, base_q, LLAMA_FTYPE_MOSTLY_Q4_K_M)
    quantize(otter16, otter_q, LLAMA_FTYPE_MOSTLY_Q4_K_M)
    return base_q, otter_q


def tensor_bytes(path: Path) -> tuple[int, int]:
    """(base bytes, otter bytes) of a GGUF's tensor data."""
    import gguf

    r = gguf.GGUFReader(path)
    base = otter = 0
    for t in r.tensors:
        if t.name.startswith("otter_") or ".otter_" in t.name:
            otter += int(t.n_bytes)
        else:
            base += int(t.n_bytes)
    return base, otter


def run_one(model_path: str, mode: str, n_prefill: int, n_decode: int, threads: int) -> dict:
    from llama_cpp import llama_cpp as ll

    quiet_llama_logs()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from otter_gguf.runtime import capi as _lib

    lib = _lib.load()
    mp = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(model_path.encode(), mp)
    assert model, model_path
    cp = ll.llama_context_default_params()
    cp.n_ctx = max(1024, n_prefill + n_decode + 16)
    cp.n_batch = cp.n_ubatch = max(512, n_prefill)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, cp)
    assert ctx
    if mode == "side-off":
        lib.llama_set_otter(ctx, False)
    rng = np.random.default_rng(0)
    toks = [int(x) for x in rng.integers(300, V, size=n_prefill + n_decode)]

    def decode(tokens, pos0, last_only=True):
        b = ll.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (i == len(tokens) - 1 or not last_only) else 0
        b.n_tokens = len(tokens)
        rc = ll.llama_decode(ctx, b)
        ll.llama_batch_free(b)
        assert rc == 0, rc

    mem = ll.llama_get_memory(ctx)
    # warm-up
    decode(toks[:8], 0)
    ll.llama_memory_clear(mem, True)

    t0 = time.perf_counter()
    c0 = time.process_time()
    decode(toks[:n_prefill], 0)
    ll.llama_get_logits_ith(ctx, -1)
    t_prefill = time.perf_counter() - t0
    c_prefill = time.process_time() - c0

    got_signal = None
    t0 = time.perf_counter()
    c0 = time.process_time()
    for i in range(n_decode):
        decode([toks[n_prefill + i]], n_prefill + i)
        ll.llama_get_logits_ith(ctx, -1)
        if mode == "side-on":
            p = lib.llama_get_otter_signals_ith(ctx, -1)
            got_signal = float(p[0]) if p else None
    t_decode = time.perf_counter() - t0
    c_decode = time.process_time() - c0

    ll.llama_free(ctx)
    ll.llama_model_free(model)
    if mode == "side-on":
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
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "otter-bench")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (the median is reported)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.prefill, a.decode, a.threads)))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    base_q, otter_q = prepare(a.work)
    base_bytes, otter_bytes = tensor_bytes(otter_q)
    ratio = otter_bytes / base_bytes

    # round-robin over the configurations so that a change in machine load hits all of them;
    # the median of the runs is reported
    runs: dict[str, list[dict]] = {"base": [], "side-on": [], "side-off": []}
    paths = {"base": base_q, "side-on": otter_q, "side-off": otter_q}
    for _ in range(a.repeat):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(paths[mode]), mode, "--prefill", str(a.prefill),
                 "--decode", str(a.decode), "--threads", str(a.threads)],
                check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {
        mode: {k: float(np.median([r[k] for r in rs])) for k in rs[0]
            if k != "mode"}
        for mode, rs in runs.items()
    }
    load1 = os.getloadavg()[0]

    print(f"\nq4_k_m, {a.threads} threads, prefill {a.prefill} tokens, decode {a.decode} tokens, "
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
    cpu_on = results["base"]["decode_cpu_ms"] / results["side-on"]["decode_cpu_ms"]
    print(f"by CPU time: side-on decode speed / base = {cpu_on:.3f} "
          f"(target {0.95 / (1 + ratio):.3f}; meaningful with --threads 1)")
    print(json.dumps({"ratio": ratio, "target_decode": target, "pass": ok, **results}))


if __name__ == "__main__":
    main()
