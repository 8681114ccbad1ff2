"""Serving benchmark: otter-gguf serve vs llama-cpp-python's server vs llama.cpp's llama-server.

Aggregate decode throughput, time to first token (TTFT) and inter-token latency (ITL) at 1, 2,
4, 8 concurrent streams, each server in its own process, one after the other, same threads:

  otter           ``otter-gguf serve`` on the Otter GGUF (1B-shaped q4_k_m, d2=256 reward head),
                  ``-np`` = streams, every token's signal computed and returned
  llama-cpp-py    ``python -m llama_cpp.server`` (llama-cpp-python's own server) on the base GGUF
  llama-server    llama.cpp's ``llama-server`` built from the same pinned source (see --llama-server),
                  ``-np`` = streams, on the base GGUF

Each stream is one streamed ``/v1/completions`` request (its own prompt of ~--prompt-words words,
``max_tokens`` = --n-decode, temperature 0, end-of-generation suppressed with ``logit_bias`` /
``ignore_eos`` so every stream decodes exactly --n-decode tokens), all started together.

  aggregate decode tok/s = streams x (n_decode - 1) / (last token of any stream - first first token)
  TTFT                   = request sent -> first text chunk (median and max over the streams)
  ITL p50 / p95          = gaps between consecutive chunks, all streams

Targets (issue 12): with 8 streams, otter >= 2 x llama-cpp-py, and otter >= 0.8 x llama-server x
base_bytes / (base_bytes + otter_bytes).

    python benchmarks/bench_serve.py --model 1b --threads 2 --json benchmarks/results/serve-1b.json
    python benchmarks/bench_serve.py --model tiny          # smoke run (seconds)

Models: ``otter_gguf.tools.bench.prepare_random`` (cached under ~/.cache/otter-gguf/bench). Build
llama-server once (several minutes on 2 cores)::

    SRC=$(python -c "from otter_gguf.io.llama_source import pinned_llama_cpp_source as s; print(s())")
    cmake -S $SRC -B build/llama-server-bld -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_WEBUI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF <the runtime's ISA flags>
    cmake --build build/llama-server-bld -j2 --target llama-server
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_SERVER = ROOT / "build" / "llama-server-bld" / "bin" / "llama-server"
WORDS = ("river stone light paper window garden music silver morning winter letter forest "
         "market question table orange evening ocean mountain story").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(kind: str, model: Path, port: int, streams: int, ctx: int, threads: int, llama_server: Path) -> List[str]:
    if kind == "otter":
        exe = Path(sys.executable).with_name("otter-gguf")
        return [str(exe), "serve", str(model), "--port", str(port), "-np", str(streams), "-c", str(ctx),
                "-t", str(threads), "-b", "512", "--max-tokens-limit", str(ctx)]
    if kind == "llama-cpp-py":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
                "--host", "127.0.0.1", "--n_ctx", str(ctx), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--n_batch", "512", "--verbose", "False",
                # its default interrupts a running stream when the next request arrives
                "--interrupt_requests", "False"]
    if kind == "llama-server":
        return [str(llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(streams), "-c", str(ctx * streams), "-t", str(threads), "-tb", str(threads),
                "-b", "512", "-fa", "off", "--no-warmup"]
    raise ValueError(kind)


class Running:
    """A server subprocess on a free port, ready when /health (or /v1/models) answers."""

    def __init__(self, cmd: List[str], port: int, log: Path):
        self.port = port
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        t_end = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({self.proc.returncode}); see {log}")
            if time.monotonic() > t_end:
                self.stop()
                raise RuntimeError(f"{cmd[0]} did not start; see {log}")
            for path in ("/health", "/v1/models"):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    c.request("GET", path)
                    if c.getresponse().status == 200:
                        c.close()
                        return
                    c.close()
                except OSError:
                    pass
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def stream_once(port: int, prompt: str, n_decode: int, eos: int, out: dict) -> None:
    """One streamed completion; fills ``out`` with send / chunk times and the token count."""
    body = {"prompt": prompt, "max_tokens": n_decode, "temperature": 0, "stream": True,
            "logit_bias": {str(eos): -100.0}, "ignore_eos": True, "repeat_penalty": 1.0}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    out["sent"] = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, tokens = [], 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ch = json.loads(data)
        choice = (ch.get("choices") or [{}])[0]
        o = choice.get("otter")
        n = len(o["tokens"]) if o else (1 if choice.get("text") else 0)
        if n:
            times.append(time.perf_counter())
            tokens += n
        if choice.get("finish_reason"):
            break
    c.close()
    out["times"], out["tokens"] = times, tokens


def run_streams(port: int, streams: int, n_decode: int, prompt_words: int, eos: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, size=prompt_words)) for _ in range(streams)]
    outs: List[dict] = [{} for _ in range(streams)]
    ths = [threading.Thread(target=stream_once, args=(port, p, n_decode, eos, o)) for p, o in zip(prompts, outs)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    if any("times" not in o or not o["times"] for o in outs):
        raise RuntimeError("a stream produced no tokens")
    first = min(o["times"][0] for o in outs)
    last = max(o["times"][-1] for o in outs)
    ttft = [o["times"][0] - o["sent"] for o in outs]
    itl = np.concatenate([np.diff(o["times"]) for o in outs if len(o["times"]) > 1])
    tokens = [o["tokens"] for o in outs]
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "aggregate_decode_tok_s": sum(t - 1 for t in tokens) / (last - first),
        "e2e_tok_s": sum(tokens) / (last - min(o["sent"] for o in outs)),
        "ttft_p50_s": float(np.median(ttft)), "ttft_max_s": float(np.max(ttft)),
        "itl_p50_ms": 1000 * float(np.percentile(itl, 50)), "itl_p95_ms": 1000 * float(np.percentile(itl, 95)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("1b", "tiny"), default="1b")
    ap.add_argument("--qtype", default="q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--n-decode", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512, help="context per stream (prompt + completion)")
    ap.add_argument("--servers", default="otter,llama-cpp-py,llama-server")
    ap.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER)
    ap.add_argument("--logs", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench-serve-logs")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from otter_gguf.tools.bench import DEFAULT_CACHE, prepare_random

    ms = prepare_random(a.model, a.qtype, DEFAULT_CACHE)
    sizes = ms.bytes()
    base_bytes, otter_bytes = sizes["base_file"], sizes["otter_tensors"]
    eos = _eos(ms.base)
    servers = [s for s in a.servers.split(",") if s]
    if "llama-server" in servers and not a.llama_server.is_file():
        print(f"llama-server not found at {a.llama_server}: skipped (build it, see --help)", file=sys.stderr)
        servers.remove("llama-server")
    streams = [int(x) for x in a.streams.split(",")]
    ctx = a.ctx
    a.logs.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict[int, dict]] = {s: {} for s in servers}
    for n in streams:
        for kind in servers:
            model = ms.otter if kind == "otter" else ms.base
            # llama-cpp-python's server serves one request at a time: its context needs one sequence
            port = _free_port()
            srv = Running(_command(kind, model, port, n, ctx, a.threads, a.llama_server), port,
                          a.logs / f"{kind}-{n}.log")
            try:
                run_streams(port, 1, 4, a.prompt_words, eos, seed=99)  # warm-up
                cpu0 = _cpu_s(srv.proc.pid)
                res = run_streams(port, n, a.n_decode, a.prompt_words, eos, seed=n)
                # CPU seconds of the server per generated token (prefill included): less sensitive to
                # other load on a shared machine than wall-clock rates
                res["server_cpu_ms_per_token"] = 1000 * (_cpu_s(srv.proc.pid) - cpu0) / sum(res["tokens_per_stream"])
            finally:
                srv.stop()
            results[kind][n] = res
            print(f"{kind:13s} streams={n}: {res['aggregate_decode_tok_s']:7.2f} tok/s aggregate, "
                  f"TTFT p50 {res['ttft_p50_s']:.2f} s, ITL p50 {res['itl_p50_ms']:.0f} ms "
                  f"p95 {res['itl_p95_ms']:.0f} ms, {res['server_cpu_ms_per_token']:.0f} CPU ms/token, "
                  f"load {os.getloadavg()[0]:.1f}, tokens {res['tokens_per_stream']}", flush=True)

    report = {"model": a.model, "qtype": a.qtype, "threads": a.threads, "n_decode": a.n_decode,
              "prompt_words": a.prompt_words, "ctx_per_stream": ctx, "base_bytes": base_bytes,
              "otter_bytes": otter_bytes, "load_average": os.getloadavg(),
              "results": {k: {str(n): r for n, r in v.items()} for k, v in results.items()}}
    print(table(report))
    report["targets"] = targets(report)
    for line in report["targets"]["lines"]:
        print(line)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _eos(path: Path) -> int:
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields.get("tokenizer.ggml.eos_token_id")
    return int(f.parts[f.data[0]][0]) if f is not None else 2


def table(report: dict) -> str:
    res = report["results"]
    rows = ["| server | streams | aggregate decode tok/s | e2e tok/s | TTFT p50 / max s | ITL p50 / p95 ms "
            "| server CPU ms/token |", "|---|---|---|---|---|---|---|"]
    for kind, by_n in res.items():
        for n, r in by_n.items():
            rows.append(f"| {kind} | {n} | {r['aggregate_decode_tok_s']:.2f} | {r['e2e_tok_s']:.2f} | "
                        f"{r['ttft_p50_s']:.2f} / {r['ttft_max_s']:.2f} | {r['itl_p50_ms']:.0f} / {r['itl_p95_ms']:.0f} | "
                        f"{r.get('server_cpu_ms_per_token', float('nan')):.0f} |")
    return "\n".join(rows)


def targets(report: dict) -> dict:
    res = report["results"]
    out: dict = {"lines": []}
    n = str(max(int(k) for k in res.get("otter", {"0": None})))
    if "otter" not in res:
        return out
    o = res["otter"][n]["aggregate_decode_tok_s"]
    if "llama-cpp-py" in res and n in res["llama-cpp-py"]:
        lp = res["llama-cpp-py"][n]["aggregate_decode_tok_s"]
        out["vs_llama_cpp_py"] = o / lp
        out["lines"].append(f"{n} streams: otter / llama-cpp-py = {o / lp:.2f} (target >= 2): "
                            f"{'met' if o >= 2 * lp else 'MISSED'}")
    if "llama-server" in res and n in res["llama-server"]:
        ls = res["llama-server"][n]["aggregate_decode_tok_s"]
        share = report["base_bytes"] / (report["base_bytes"] + report["otter_bytes"])
        need = 0.8 * ls * share
        out["vs_llama_server"] = o / ls
        out["llama_server_target_tok_s"] = need
        out["lines"].append(f"{n} streams: otter / llama-server = {o / ls:.2f} (target >= 0.8 x "
                            f"{share:.3f} = {0.8 * share:.3f}): {'met' if o >= need else 'MISSED'}")
    return out


if __name__ == "__main__":
    main()
