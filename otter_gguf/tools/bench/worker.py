"""The worker: one configuration (or one session of several) in its own process, so that its peak RSS
is its own; ``python -m otter_gguf.tools.bench.worker SPEC``."""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from otter_gguf.tools.bench.stats import load_average


# ---------------------------------------------------------------------------
# the worker: one configuration in one process
# ---------------------------------------------------------------------------
_MODELS: Dict[str, Any] = {}
#: the offload arguments of every model (`otter-gguf bench -ngl/--rpc`): run_bench sets them in the parent,
#: run_in_subprocess passes them in the spec, the worker process takes them back from it
OFFLOAD: Dict[str, Any] = {}


def _engine(path: str, *, n_ctx: int, n_batch: int, n_seq: int, threads: int, embeddings: bool = False,
            otter: Optional[bool] = None, cb_eval: Any = None):
    """A context (:class:`otter_gguf.runtime.session.Context`) on the model of ``path``: one model per
    file and process, shared by the contexts of the configurations. ``otter``: run the model's own head
    (True) or pause it (False); None: a model without one."""
    from otter_gguf.runtime.session import Model

    if path not in _MODELS:
        _MODELS[path] = Model(path, **OFFLOAD)
    model = _MODELS[path]
    ctx = model.context(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq, n_threads=threads, embeddings=embeddings,
                        cb_eval=cb_eval, no_perf=False)
    if otter is not None:
        if not model.has_otter:
            raise RuntimeError(f"{path} has no Otter head")
        ctx.set_otter(bool(otter))
    return ctx


def _signals(ctx, i: int = -1) -> np.ndarray:
    row = ctx.signals_ith(i)
    if row is None:
        raise RuntimeError(f"no Otter signals for batch index {i}")
    return row


class _GGMLTensor(ctypes.Structure):
    """The head of ggml.h's ``struct ggml_tensor`` (up to ``name``) of the pinned ggml."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


class _NodeProfiler:
    """Graph node timing through the scheduler's eval callback (``cb_eval``): every node is computed
    on its own (ask -> compute -> synchronize -> callback), so the time between the two callbacks of a
    node is that node's compute (plus one thread-pool launch). Nodes are attributed to the side stream
    when they are named ``otter*``, read an Otter weight or a side KV layer, or read a side node;
    matrix products are grouped by their weight."""

    def __init__(self, L, spec: dict):
        import re

        from otter_gguf.io.ggml_quant import load_ggml_base

        self.g = load_ggml_base()
        self.g.ggml_op_desc.restype = ctypes.c_char_p
        self.g.ggml_op_desc.argtypes = [ctypes.c_void_p]
        self.g.ggml_nbytes.restype = ctypes.c_size_t
        self.g.ggml_nbytes.argtypes = [ctypes.c_void_p]
        self.n_layer = int(spec.get("n_layer", 0))
        self.re_cache = re.compile(r"cache_\w*?[kv]_l(\d+)")
        self.re_blk = re.compile(r"^blk\.\d+\.")
        self.recording = False
        self.side: Dict[int, bool] = {}
        self.acc: Dict[str, List[float]] = {}   # group -> [seconds, count, weight bytes]
        self.t0 = 0.0
        self.callback = L.ggml_backend_sched_eval_callback(self._cb)

    def _leaf_side(self, t: _GGMLTensor) -> bool:
        name = t.name.decode("utf-8", "replace")
        if "otter" in name:
            return True
        m = self.re_cache.search(name)
        return bool(m and int(m.group(1)) >= self.n_layer)

    def _is_side(self, ptr: int, depth: int = 0) -> bool:
        v = self.side.get(ptr)
        if v is not None:
            return v
        t = _GGMLTensor.from_address(ptr)
        v = self._leaf_side(t)
        if not v and depth < 6:
            for sp in list(t.src) + [t.view_src]:
                if sp and self._is_side(sp, depth + 1):
                    v = True
                    break
        self.side[ptr] = v
        return v

    def _cb(self, tp, ask, user_data):
        if ask:
            self.t0 = time.perf_counter()
            return True
        dt = time.perf_counter() - self.t0
        if not self.recording:
            return True
        t = _GGMLTensor.from_address(tp)
        op = (self.g.ggml_op_desc(tp) or b"?").decode()
        side = self._is_side(tp)
        wbytes = 0
        if op in ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS") and t.src[0]:
            w = _GGMLTensor.from_address(t.src[0])
            wname = w.name.decode("utf-8", "replace")
            if wname.endswith(".weight"):
                op = f"{op} {self.re_blk.sub('', wname)[:-len('.weight')]}"
                wbytes = int(self.g.ggml_nbytes(t.src[0])) if op.startswith("MUL_MAT") else 0
        key = f"{'side' if side else 'main'}: {op}"
        a = self.acc.setdefault(key, [0.0, 0, 0])
        a[0] += dt
        a[1] += 1
        a[2] += wbytes
        return True

    def summary(self, n_tokens: int) -> dict:
        groups = {k: {"ms_per_token": 1000.0 * v[0] / n_tokens, "nodes_per_token": v[1] / n_tokens,
                      "weight_mib_per_token": v[2] / n_tokens / 2**20,
                      "gb_s": (v[2] / v[0] / 1e9) if v[0] and v[2] else None}
                  for k, v in sorted(self.acc.items(), key=lambda kv: -kv[1][0])}
        tot = {s: sum(g["ms_per_token"] for k, g in groups.items() if k.startswith(s)) for s in ("main", "side")}
        wb = {s: sum(g["weight_mib_per_token"] for k, g in groups.items() if k.startswith(s)) for s in ("main", "side")}
        return {"groups": groups, "ms_per_token": tot, "weight_mib_per_token": wb}


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    ids = np.argpartition(-x, k - 1)[:k]
    return ids[np.argsort(-x[ids], kind="stable")]


class _Runner:
    """The per-step loops of the configurations (greedy; ARGS weight 1)."""

    def __init__(self, spec: dict, cb_eval: Any = None):
        self.spec = spec
        cfg = spec["config"]
        self.cfg = cfg
        self.k = int(spec.get("top_k", 10))
        thr = int(spec["threads"])
        n_ctx = int(spec["n_ctx"])
        nb = int(spec.get("n_batch", 512))
        seqs = self.k + 1 if cfg in ("d_rm", "d_scalar") else 1
        self.main: Any
        self.rm: Optional[Any] = None
        if cfg == "a":
            self.main = _engine(spec["otter"], n_ctx=n_ctx, n_batch=nb, n_seq=1, threads=thr, cb_eval=cb_eval, otter=False)
        elif cfg == "a0":
            self.main = _engine(spec["base"], n_ctx=n_ctx, n_batch=nb, n_seq=1, threads=thr, cb_eval=cb_eval)
        elif cfg in ("b", "d_scalar"):
            self.main = _engine(spec["otter"], n_ctx=n_ctx, n_batch=nb, n_seq=seqs, threads=thr, cb_eval=cb_eval, otter=True)
        elif cfg == "d_tok":
            self.main = _engine(spec["otter_token"], n_ctx=n_ctx, n_batch=nb, n_seq=1, threads=thr, cb_eval=cb_eval, otter=True)
        elif cfg in ("c", "d_rm"):
            self.main = _engine(spec["base"], n_ctx=n_ctx, n_batch=nb, n_seq=1, threads=thr)
            self.rm = _engine(spec["rm"], n_ctx=n_ctx, n_batch=nb, n_seq=seqs, threads=thr, embeddings=True)
            self.rm_w = (np.random.default_rng(7).standard_normal(self.rm.model.n_embd) * 0.02).astype(np.float32)
        else:
            raise ValueError(f"unknown configuration {cfg!r}")
        self.n = 0            # tokens in the context (sequence 0)
        self.cur: np.ndarray  # next-token logits at position n - 1
        self.rewards: List[float] = []

    # -- phases
    def prefill(self, tokens: Sequence[int]) -> None:
        self.main.prefill(tokens, self.n)
        if self.rm is not None:
            self.rm.prefill(tokens, self.n)
            self.rewards.append(float(self.rm.hidden_ith(-1) @ self.rm_w))
        elif self.cfg in ("b", "d_scalar"):
            self.rewards.append(float(_signals(self.main)[0]))
        self.n += len(tokens)
        self.cur = self.main.logits_ith(-1)

    def step(self) -> int:
        cfg, n = self.cfg, self.n
        if cfg in ("a", "a0", "b", "c", "d_tok"):
            if cfg == "d_tok":
                row = _signals(self.main)
                ids = _top_k(self.cur, self.k)
                tok = int(ids[np.argmax(self.cur[ids] + row[ids])])
                self.rewards.append(float(row[tok]))
            else:
                tok = int(np.argmax(self.cur))
            self.main.decode([tok], n)
            if cfg == "b":
                self.rewards.append(float(_signals(self.main)[0]))
            elif cfg == "c":
                self.rm.decode([tok], n)
                self.rewards.append(float(self.rm.hidden_ith(-1) @ self.rm_w))
            self.cur = self.main.logits_ith(-1)
        else:
            from llama_cpp import llama_cpp as L

            ids = _top_k(self.cur, self.k)
            eng = self.rm if cfg == "d_rm" else self.main
            for s in range(1, len(ids) + 1):
                L.llama_memory_seq_cp(eng.mem, 0, s, -1, -1)
            eng.decode(ids.tolist(), seqs=list(range(1, len(ids) + 1)), positions=[n] * len(ids), logits="all")
            if cfg == "d_rm":
                r = np.stack([eng.hidden_ith(j) for j in range(len(ids))]) @ self.rm_w
            else:
                r = np.array([_signals(eng, j)[0] for j in range(len(ids))], dtype=np.float32)
            j = int(np.argmax(self.cur[ids] + r))
            tok = int(ids[j])
            L.llama_memory_seq_cp(eng.mem, j + 1, 0, n, n + 1)
            L.llama_memory_seq_keep(eng.mem, 0)
            self.rewards.append(float(r[j]))
            if cfg == "d_rm":
                self.main.decode([tok], n)
                self.cur = self.main.logits_ith(-1)
            else:
                self.cur = self.main.logits_ith(j)
        self.n = n + 1
        return tok

    def reset(self) -> None:
        self.main.clear()
        if self.rm is not None:
            self.rm.clear()
        self.n = 0
        self.rewards = []

    def truncate(self, n: int) -> None:
        self.main.seq_rm(-1, n)
        if self.rm is not None:
            self.rm.seq_rm(-1, n)
        self.n = n


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _peak_rss_kib() -> int:
    """This process's peak RSS: ``VmHWM`` (its own memory's high-water mark). Not ``ru_maxrss``, which Linux
    carries over exec from the forking process: a worker started by a parent that had grown (e.g. by
    converting a model) reported the parent's peak."""
    return _rss_kib("VmHWM")


def run_worker(spec: dict) -> dict:
    """Run one configuration (``spec["config"]``) and return its timings and peak RSS;
    llama.cpp's log: its errors only (to stderr, through ``logging``)."""
    from otter_gguf.io.llama_log import llama_logs

    with llama_logs(level=logging.ERROR, log_level=logging.ERROR):
        return _run_worker(spec)


def _run_worker(spec: dict) -> dict:
    import llama_cpp as L

    L.llama_backend_init()
    rss_start = _rss_kib()
    t0 = time.perf_counter()
    if spec.get("mode") == "session":
        return _run_session(L, spec)
    prof = _NodeProfiler(L, spec) if spec.get("mode") == "profile" else None
    r = _Runner(spec, cb_eval=prof.callback if prof else None)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    V = r.main.model.n_vocab
    lo = min(3, V - 1)
    mode = spec.get("mode", "main")
    res: Dict[str, Any] = {"config": spec["config"], "spec": spec, "load_s": load_s,
                           "rss_after_import_kib": rss_start}

    # warm-up (graphs, thread pool): a short prompt and two steps, then an empty cache
    r.prefill(rng.integers(lo, V, size=8).tolist())
    r.step()
    r.step()
    r.reset()

    if mode == "main":
        prompt = rng.integers(lo, V, size=int(spec["n_prompt"])).tolist()
        t0 = time.perf_counter()
        r.prefill(prompt)
        res["prefill_s"] = time.perf_counter() - t0
        res["n_prompt"] = len(prompt)
        nd = int(spec["n_decode"])
        toks = []
        t0 = time.perf_counter()
        for _ in range(nd):
            toks.append(r.step())
        res["decode_s"] = time.perf_counter() - t0
        res["n_decode"] = nd
        res["tokens"] = toks[:16]
        res["rewards"] = [round(x, 5) for x in r.rewards[:4]]
    elif mode == "profile":
        r.prefill(rng.integers(lo, V, size=int(spec["n_prompt"])).tolist())
        nd = int(spec["n_decode"])
        prof.recording = True
        t0 = time.perf_counter()
        for _ in range(nd):
            prof.side.clear()  # node addresses are only meaningful within one graph
            r.step()
        res["decode_s"] = time.perf_counter() - t0
        prof.recording = False
        res["n_decode"] = nd
        res["profile"] = prof.summary(nd)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    res["peak_rss_kib"] = _peak_rss_kib()
    res["rss_end_kib"] = _rss_kib()
    return res


def _run_session(L, spec: dict) -> dict:
    """All configurations of ``spec["runs"]`` in one process, interleaved round-robin: each prefill
    chunk and each decode step of every configuration is timed next to the same chunk / step of the
    others (the starting configuration rotates), so that a burst of load on the shared machine hits
    all of them alike. Per configuration: the list of chunk times and of step times."""
    runs = spec["runs"]  # name -> the spec fields of that configuration (config, files)
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    t0 = time.perf_counter()
    runners = {}
    for name, rs in runs.items():
        runners[name] = _Runner(dict(spec, **rs))
    load_s = time.perf_counter() - t0
    names = list(runners)
    V = min(r.main.model.n_vocab for r in runners.values())
    lo = min(3, V - 1)
    for r in runners.values():  # warm-up: graphs, thread pools
        r.prefill(rng.integers(lo, V, size=8).tolist())
        r.step()
        r.step()
        r.reset()
    chunk = int(spec.get("chunk", 64))
    nd = int(spec["n_decode"])
    depths = [int(x) for x in spec.get("depths") or [int(spec["n_prompt"])]]
    prompt = rng.integers(lo, V, size=max(depths)).tolist()
    out: Dict[str, Dict[str, Any]] = {n: {"rows": []} for n in names}
    done = 0
    rot = 0
    for depth in depths:
        pre = {n: [] for n in names}
        for i in range(done, depth, chunk):
            seg = prompt[i: min(i + chunk, depth)]
            for j in range(len(names)):
                n = names[(rot + j) % len(names)]
                t = time.perf_counter()
                runners[n].prefill(seg)
                pre[n].append((len(seg), time.perf_counter() - t))
            rot += 1
        steps = {n: [] for n in names}
        for _ in range(nd):
            for j in range(len(names)):
                n = names[(rot + j) % len(names)]
                t = time.perf_counter()
                runners[n].step()
                steps[n].append(time.perf_counter() - t)
            rot += 1
        for n in names:
            runners[n].truncate(depth)
            out[n]["rows"].append({"depth": depth, "prefill": pre[n], "steps": steps[n]})
        done = depth
    for n in names:
        out[n]["rewards"] = [round(x, 5) for x in runners[n].rewards[:4]]
    return {"mode": "session", "load_s": load_s, "configs": out,
            "peak_rss_kib": _peak_rss_kib(), "load": load_average()}


def run_in_subprocess(spec: dict, timeout: float = 3600) -> dict:
    if OFFLOAD:
        spec = dict(spec, offload=OFFLOAD)
    cmd = [sys.executable, "-m", "otter_gguf.tools.bench.worker", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench worker {spec.get('config', spec.get('mode'))} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _worker_main(argv: List[str]) -> int:
    spec = json.loads(argv[0])
    OFFLOAD.update(spec.get("offload") or {})
    res = run_worker(spec)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2:
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit("usage: python -m otter_gguf.tools.bench.worker SPEC (the command is `otter-gguf bench`)")
