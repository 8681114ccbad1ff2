"""Helpers shared by the tests: plain functions and classes, no fixtures.

Import them as ``from helpers import ...`` (tests/ is on sys.path); the
shared fixtures live in tests/conftest.py.

``Models`` converts the conftest checkpoints to GGUF once per process (the
``gguf_models`` fixture): ``base`` is the tiny llama as a plain f32 GGUF with
a chat template added (so ``create_chat_completion`` uses the model's own
template), ``otter(kind)`` is that base plus the ``reward1`` / ``reward3`` /
``token_reward`` adapter, ``sidecars`` the token_reward and reward1 heads as adapter GGUFs beside it.

``Model`` / ``Context`` are the package's C-API harness (otter_gguf.runtime.session) with the rt
fixture's signature and an f32 KV cache (tests/test_runtime*.py).

``require_otter_runtime()`` is the one runtime check (the ``otter_runtime``
fixture): a runtime test FAILS, never skips, when llama_cpp is missing or the
library it loaded is not the patched runtime of patches/ (run ``make runtime``).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pytest

from otter_gguf.runtime import session

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_built: Dict[str, Path] = {}

#: `make test-portable`: the runtime under test is the portable (x86-64-v3) build, loaded through
#: LLAMA_CPP_LIB_PATH; what a test builds or installs to compare with it uses the portable plan too
PORTABLE = os.environ.get("OTTER_TEST_PORTABLE") == "1"

# small, fast, deterministic settings shared by the tests
LLAMA_KW = dict(n_ctx=256, n_batch=64, n_threads=1, n_threads_batch=1, verbose=False)


class Models:
    def __init__(self, request, root: Path):
        self._request = request
        self._root = root

    @property
    def base(self) -> Path:
        if "base" not in _built:
            from otter_gguf_converter import convert_hf_base

            src = Path(self._request.getfixturevalue("tiny_llama_dir"))
            hf = self._root / "tiny-llama-chat"
            if hf.exists():
                shutil.rmtree(hf)
            shutil.copytree(src, hf)
            cfg_path = hf / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg["chat_template"] = CHAT_TEMPLATE
            cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            out = self._root / "base.gguf"
            if out.exists():
                out.unlink()
            _built["base"] = convert_hf_base(hf, out, "f32")
        return _built["base"]

    @property
    def lora(self) -> Path:
        """A tiny PEFT LoRA (v_proj, down_proj) for the base, converted with
        llama.cpp's convert_lora_to_gguf.py."""
        if "lora" not in _built:
            import subprocess
            import sys

            import torch
            from safetensors.torch import save_file

            from otter_gguf.io.llama_source import pinned_llama_cpp_source

            hf = Path(self._request.getfixturevalue("tiny_llama_dir"))
            d = self._root / "lora"
            d.mkdir(exist_ok=True)
            g = torch.Generator().manual_seed(0)
            t = {}
            for layer in range(4):
                for mod, (o, i) in {"self_attn.v_proj": (128, 256), "mlp.down_proj": (256, 768)}.items():
                    p = f"base_model.model.model.layers.{layer}.{mod}"
                    t[p + ".lora_A.weight"] = torch.randn(4, i, generator=g) * 0.2
                    t[p + ".lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.2
            save_file(t, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(json.dumps(
                {"lora_alpha": 8, "r": 4, "peft_type": "LORA", "base_model_name_or_path": "tiny-llama",
                 "target_modules": ["v_proj", "down_proj"]}), encoding="utf-8")
            out = self._root / "lora.gguf"
            script = pinned_llama_cpp_source() / "convert_lora_to_gguf.py"
            res = subprocess.run([sys.executable, str(script), "--base", str(hf), "--outfile", str(out), str(d)],
                                 capture_output=True, text=True)
            assert res.returncode == 0 and out.is_file(), res.stderr[-2000:]
            _built["lora"] = out
        return _built["lora"]

    @property
    def sidecars(self) -> tuple:
        """(token_reward head "tr", reward1 head "harmless"): adapter GGUFs beside ``base``."""
        if "sidecars" not in _built:
            from otter_gguf_converter import convert

            tr = convert(self._request.getfixturevalue("adapter_token_reward_dir"), self.base, self._root / "tr.gguf",
                         sidecar=True, name="tr", force=True, progress=False)
            h1 = convert(self._request.getfixturevalue("adapter_reward1_dir"), self.base, self._root / "harmless.gguf",
                         sidecar=True, name="harmless", force=True, progress=False)
            _built["sidecars"] = (tr, h1)
        return _built["sidecars"]

    def otter(self, kind: str) -> Path:
        fixture = {"reward1": "adapter_reward1_dir", "reward3": "adapter_reward3_dir",
                   "token_reward": "adapter_token_reward_dir"}[kind]
        if kind not in _built:
            from otter_gguf_converter import convert

            adapter = self._request.getfixturevalue(fixture)
            out = self._root / f"otter-{kind}.gguf"
            _built[kind] = convert(adapter, self.base, out, outtype="f32", force=True, progress=False)
        return _built[kind]


def otter_runtime_problem(lib, want: str, dev_ok: bool = False) -> Optional[str]:
    """Why ``lib`` (the loaded libllama, or any object with its attributes) is
    not the patched runtime of the series ``want`` ("otter-gguf/<hash>"), or None.

    ``dev_ok``: also accept a dev build's marker ("otter-gguf/dev", a build made
    by hand from ``make llama-src``; used through LLAMA_CPP_LIB_PATH).
    """
    from otter_gguf.runtime import capi
    from otter_gguf.runtime.build import SERIES_PREFIX

    name = getattr(lib, "_name", None) or repr(lib)
    missing = [n for n in capi.NAMES if not hasattr(lib, n)]
    if missing:
        return f"the loaded llama.cpp library {name} lacks the Otter API (missing {', '.join(missing)})"
    fn = lib.llama_otter_series
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    got = (fn() or b"").decode(errors="replace")
    if got == want or (dev_ok and got == SERIES_PREFIX + "dev"):
        return None
    return f"the loaded llama.cpp library {name} carries the patch series {got!r}, patches/ is {want!r}"


def require_otter_runtime():
    """The runtime check of every runtime test: ``llama_cpp.llama_cpp`` of the
    patched runtime, or ``pytest.fail`` saying to run ``make runtime``."""
    from otter_gguf.runtime.build import SERIES_PREFIX, series_id

    fix = "run `make runtime` (or point LLAMA_CPP_LIB_PATH at a patched build)"
    try:
        from llama_cpp import llama_cpp as ll
    except ImportError as e:
        pytest.fail(f"llama-cpp-python is not importable ({e}): {fix}", pytrace=False)
    problem = otter_runtime_problem(ll._lib, SERIES_PREFIX + series_id(),
                                    dev_ok=bool(os.environ.get("LLAMA_CPP_LIB_PATH")))
    if problem:
        pytest.fail(f"{problem}: {fix}", pytrace=False)
    if PORTABLE:  # `make test-portable` must not test the native build
        info = getattr(ll, "llama_print_system_info", lambda: b"")().decode()
        if "AVX512 = 1" in info or "AMX" in info:
            pytest.fail(f"OTTER_TEST_PORTABLE=1 but the loaded runtime is not the portable build ({info.strip()}); "
                        "point LLAMA_CPP_LIB_PATH at its llama_cpp/lib (make test-portable)", pytrace=False)
    return ll


def keep_eval_report(report: dict, baseline: Path) -> None:
    """What the eval regression tests do with their report besides checking it:
    ``OTTER_UPDATE_BASELINE=1`` writes it over ``baseline``; ``OTTER_EVAL_REPORT=DIR``
    keeps a copy as ``DIR/<baseline's name>`` (the reports of one ISA, for
    tests/baselines/isa_spread/: CONTRIBUTING.md, "Tests that hold on any x86-64-v3 CPU")."""
    text = json.dumps(report, indent=2) + "\n"
    if os.environ.get("OTTER_UPDATE_BASELINE") == "1":
        baseline.parent.mkdir(parents=True, exist_ok=True)
        baseline.write_text(text, encoding="utf-8")
    if os.environ.get("OTTER_EVAL_REPORT"):
        out = Path(os.environ["OTTER_EVAL_REPORT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / baseline.name).write_text(text, encoding="utf-8")


def pristine_lib_dir() -> Path:
    """libllama built from the pristine pinned source with the runtime's own
    ISA flags (cached next to the runtime wheels); the directory of its .so files."""
    import hashlib
    import subprocess

    from otter_gguf.io.cache import cache_dir
    from otter_gguf.io.llama_source import LLAMA_CPP_PYTHON_VERSION, pinned_llama_cpp_source
    from otter_gguf.runtime import build as rb

    args = [a for a in rb.default_cmake_args(portable=PORTABLE) if a.startswith("-DGGML_")]
    key = hashlib.sha256(" ".join([LLAMA_CPP_PYTHON_VERSION, *args]).encode()).hexdigest()[:16]
    build = cache_dir() / "pristine" / key
    lib = build / "bin"
    if not (lib / "libllama.so").is_file() and not (lib / "libllama.dylib").is_file():
        src = pinned_llama_cpp_source()
        cfg = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
               "-DBUILD_SHARED_LIBS=ON", *rb._BASE_CMAKE_ARGS, *args]
        subprocess.run(cfg, check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2),
                        "--target", "llama"], check=True, capture_output=True)
    return lib


# ---------------------------------------------------------------------------
# rewriting a GGUF with changes (malformed-file tests)
# ---------------------------------------------------------------------------
_SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}


def rewrite(src: Path, dst: Path, *, kv: dict | None = None, drop_kv=(), drop_tensors=(), tensors: dict | None = None):
    """Copy the f32 GGUF src to dst with changes. kv: key -> (value, GGUFValueType[, sub_type]);
    tensors: name -> numpy array (numpy order), replacing the tensor of that name or added after the others."""
    import gguf

    kv = kv or {}
    tensors = tensors or {}
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name in _SKIP_KEYS or name in drop_kv or name in kv:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        val = f.contents()
        if vtype == gguf.GGUFValueType.ARRAY and sub is None:
            sub = gguf.GGUFValueType.STRING
        w.add_key_value(name, val, vtype, sub_type=sub)
    for key, spec in kv.items():
        w.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = tensors.get(t.name)
        if data is None:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            data = np.array(t.data, dtype=np.float32)
        w.add_tensor(t.name, data)
    have = {t.name for t in r.tensors}
    for name in [n for n in tensors if n not in have]:  # a tensor the file lacks: added at the end
        w.add_tensor(name, tensors[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---------------------------------------------------------------------------
# the patched runtime through llama-cpp-python's low-level bindings plus the
# Otter C API (otter_gguf.runtime.capi): tests/test_runtime*.py
# ---------------------------------------------------------------------------
class Model(session.Model):
    """:class:`otter_gguf.runtime.session.Model` with the rt fixture's ``(ll, lib, path)``: ``ll`` is
    llama_cpp.llama_cpp, ``lib`` the Otter API (capi.load()); contexts get an f32 KV cache by default."""

    def __init__(self, ll, lib, path: Path):
        super().__init__(path)
        self.ll, self.lib = ll, lib

    def context(self, **kw) -> "Context":
        return Context(self, **kw)


class Context(session.Context):
    """:class:`otter_gguf.runtime.session.Context` with an f32 KV cache by default (bit-exact comparisons)."""

    def __init__(self, model: Model, *, kv_f32=True, **kw):
        super().__init__(model, kv_f32=kv_f32, **kw)
        self.ll, self.lib = model.ll, model.lib


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _q_rows(path) -> np.ndarray:
    from gguf import GGUFReader

    from otter_gguf.format.constants import OtterTensor, gguf_name

    t = next(t for t in GGUFReader(path).tensors if t.name == gguf_name(OtterTensor.ATTN_Q, 1))
    return np.array(t.data, dtype=np.float32)


def sidecar_mutations() -> Dict[str, Callable]:
    """Malformed variants of the tiny f32 Otter adapter GGUF: name -> (path -> ``rewrite`` kwargs).
    The Python reader and the runtime refuse each one (with their own messages)."""
    from gguf import GGUFValueType as V

    from otter_gguf.format.constants import Keys, OtterTensor as T, SidecarKeys, gguf_name

    return {
        "general_type": lambda s: dict(kv={SidecarKeys.GENERAL_TYPE: ("model", V.STRING)}),
        "lora": lambda s: dict(kv={SidecarKeys.ADAPTER_TYPE: ("lora", V.STRING)}),
        "missing_key": lambda s: dict(drop_kv={Keys.FEED_FORWARD_LENGTH}),
        "no_version": lambda s: dict(drop_kv={Keys.VERSION}),
        "key_type": lambda s: dict(kv={Keys.EMBEDDING_LENGTH: (256, V.INT32)}),
        "hash_type": lambda s: dict(kv={Keys.Base.VOCAB_HASH: (5, V.UINT32)}),
        "n_out_absurd": lambda s: dict(kv={Keys.Head.OUTPUT_SIZE: (1 << 30, V.UINT32)}),
        "d2_zero": lambda s: dict(kv={Keys.EMBEDDING_LENGTH: (0, V.UINT32)}),
        "n_out_mismatch": lambda s: dict(kv={Keys.Head.OUTPUT_SIZE: (4, V.UINT32)}),
        "gqa": lambda s: dict(kv={Keys.Attention.HEAD_COUNT_KV: (3, V.UINT32)}),
        "head_kind": lambda s: dict(kv={Keys.Head.KIND: ("policy", V.STRING)}),
        "version": lambda s: dict(kv={Keys.VERSION: (99, V.UINT32)}),
        "arch_mismatch": lambda s: dict(kv={Keys.Base.ARCHITECTURE: ("qwen2", V.STRING)}),
        "shape": lambda s: dict(tensors={gguf_name(T.ATTN_Q, 1): _q_rows(s)[:-1]}),
        "missing_tensor": lambda s: dict(drop_tensors={gguf_name(T.FFN_UP, 2)}),
        "norm_f16": lambda s: dict(tensors={gguf_name(T.ATTN_NORM, 0): np.ones(256, dtype=np.float16)}),
        "matrix_int": lambda s: dict(tensors={gguf_name(T.ATTN_OUT, 2): np.zeros((256, 512), dtype=np.int32)}),
        "unknown_key": lambda s: dict(kv={"otter.extra": (1, V.UINT32)}),
    }


# ---------------------------------------------------------------------------
# a cheap deterministic signal source (no runtime support needed)
# ---------------------------------------------------------------------------
def fake_signals(history: Sequence[int]) -> np.ndarray:
    """Two signals that depend on the whole history (order included)."""
    h = np.asarray(history, dtype=np.float64)
    w = np.arange(1, len(h) + 1, dtype=np.float64)
    a = np.sin(0.013 * float(np.dot(h, w)))
    b = np.cos(0.37 * float(h[-1]) + 0.11 * len(h))
    return np.array([a, b], dtype=np.float32)


def fake_source_factory(fn: Callable[[Sequence[int]], np.ndarray] = fake_signals,
                        names=("alpha", "beta")):
    from otter_gguf.runtime.llama import SignalSource

    class FakeSignalSource(SignalSource):
        has_otter = True
        head_kind = "reward"

        def __init__(self):
            self.n_out = len(names)
            self.signal_names = list(names)
            self.rows_read = 0

        def read_row(self, i, history):
            self.rows_read += 1
            return fn(list(history()))

    return lambda llm: FakeSignalSource()


# --- the PyTorch reference, loaded once per process (tests/test_reference.py, tests/test_gguf_base.py, and others)
_REFERENCE_CACHE: dict = {}


def rand_tokens(*shape, seed=0, vocab=512):
    """Seeded random token ids (a torch.long tensor of ``shape``)."""
    import torch

    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def cached_base(path, dtype=None):
    """``load_base(path, dtype)`` (float32 by default), once per process."""
    import torch

    from otter_gguf.reference.model import load_base

    dtype = dtype or torch.float32
    key = ("base", str(path), dtype)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = load_base(path, dtype)
    return _REFERENCE_CACHE[key]


def cached_otter(base_dir, adapter_dir, dtype=None):
    """The reference OtterModel of base + adapter, once per process."""
    import torch

    from otter_gguf.format.adapter import load_adapter
    from otter_gguf.reference.model import OtterModel

    dtype = dtype or torch.float32
    key = ("otter", str(base_dir), str(adapter_dir), dtype)
    if key not in _REFERENCE_CACHE:
        cfg, t = load_adapter(adapter_dir, dtype)
        _REFERENCE_CACHE[key] = OtterModel(cached_base(base_dir, dtype), cfg, t)
    return _REFERENCE_CACHE[key]


# --- an independent oracle of the side stream: docs/OTTER.md §4's wide form (tests/test_reference*.py, qwen3, gemma3)
def wide_forward(base, config, ot, tokens):
    """docs/OTTER.md §4's wide form with §7's variants (llama, qwen2, qwen3, gemma3), written independently of
    otter_gguf.reference.model (but for the RoPE frequencies of scaled RoPE, taken from the base config): one
    transformer of width d+d2, h+h2 heads and f+f2 FFN units, base weights zero-padded, every RMS statistic
    of the residual width (pre-norms and sandwich norms) from the first d dims only, per-head Q/K norms
    (side heads with their own weights), the embedding scale sqrt(d), gemma3's 1 + w norms, its attention
    scale, per-layer window and RoPE base, tanh-GELU. Plain per-head loops, RoPE in closed form. tokens: [T]."""
    import math

    import torch

    from otter_gguf.format.constants import BIAS, hf_name
    from otter_gguf.format.constants import OtterTensor as OT

    dt = base.dtype
    W = base.weights
    raw = base.config.raw
    arch = config.base_architecture
    gemma = arch == "gemma3"
    d, d2, hd = config.hidden_size, config.otter_hidden_size, config.head_dim
    h, hkv = config.num_attention_heads, config.num_key_value_heads
    h2, h2kv = config.otter_num_attention_heads, config.otter_num_key_value_heads
    f = config.intermediate_size
    eps = raw["rms_norm_eps"]
    D = d + d2
    T = tokens.shape[0]
    B = "model.layers.{}."
    S = "otter.layers.{}."

    def z(*s):
        return torch.zeros(*s, dtype=dt)

    def widen_in(wb, ws, rows_b):
        out = z(rows_b + ws.shape[0], D)
        out[:rows_b, :d] = wb
        out[rows_b:, :] = ws
        return out

    def widen_bias(bb, bs, nb, ns):
        return torch.cat([bb if bb is not None else z(nb), bs if bs is not None else z(ns)])

    def widen_out(wb, ws, cols_b):
        out = z(D, ws.shape[1])
        out[:d, :cols_b] = wb
        out[d:, :] = ws
        return out

    def gw(w):  # the applied weight: HF Gemma3RMSNorm is x * (1 + w)
        return 1 + w if gemma else w

    def norm(zz, g):  # statistic from the first d dims only
        r = torch.sqrt((zz[:, :d] ** 2).mean(-1, keepdim=True) + eps)
        return zz / r * gw(g)

    def head_norm(x, g):  # one head [T, hd]; no per-head norm (llama, qwen2): None
        return x if g is None else x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * gw(g)

    types = raw.get("layer_types") or ["full_attention"] * config.num_hidden_layers
    window = raw.get("sliding_window")
    scale = raw["query_pre_attn_scalar"] ** -0.5 if gemma else 1 / math.sqrt(hd)

    def rope_of(inv):
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        cos, sin = torch.cos(ang).to(dt), torch.sin(ang).to(dt)

        def rope(x):
            a, b = x[:, : hd // 2], x[:, hd // 2:]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        return rope

    ropes = {"full_attention": rope_of(base.config.rope_inv_freq(torch.float64)),
             "sliding_attention": rope_of(1.0 / raw.get("rope_local_base_freq", 1.0)
                                          ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))}

    def kv_of(i):
        return i // (h // hkv) if i < h else hkv + (i - h) // (h2 // h2kv)

    def act(x):
        if gemma:
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        return x * torch.sigmoid(x)

    emb = torch.cat([W["model.embed_tokens.weight"][tokens], ot[hf_name(OT.TOKEN_EMBD)][tokens]], dim=-1)
    zz = emb * torch.tensor(math.sqrt(d), dtype=dt) if gemma else emb
    qpos = torch.arange(T)[:, None]
    kpos = torch.arange(T)[None, :]
    for l in range(config.num_hidden_layers):
        p, q = B.format(l), S.format(l)
        mask = kpos > qpos
        if types[l] == "sliding_attention":
            mask = mask | (qpos - kpos >= window)
        rope = ropes[types[l]]
        zn = norm(zz, torch.cat([W[p + "input_layernorm.weight"], ot[q + "input_layernorm.weight"]]))
        proj = {}
        for x, nb, ns in (("q", h * hd, h2 * hd), ("k", hkv * hd, h2kv * hd), ("v", hkv * hd, h2kv * hd)):
            proj[x] = zn @ widen_in(W[p + f"self_attn.{x}_proj.weight"], ot[q + f"self_attn.{x}_proj.weight"], nb).T \
                + widen_bias(W.get(p + f"self_attn.{x}_proj.bias"), ot.get(q + f"self_attn.{x}_proj.bias"), nb, ns)
        heads = []
        for i in range(h + h2):
            j = kv_of(i)
            src_q, src_k = (p, p) if i < h else (q, q)
            if j < hkv:
                src_k = p
            qi = head_norm(proj["q"][:, i * hd:(i + 1) * hd], (W if i < h else ot).get(src_q + "self_attn.q_norm.weight"))
            kj = head_norm(proj["k"][:, j * hd:(j + 1) * hd], (W if j < hkv else ot).get(src_k + "self_attn.k_norm.weight"))
            sc = (rope(qi) @ rope(kj).T) * scale
            sc = sc.masked_fill(mask, float("-inf"))
            heads.append(torch.softmax(sc, dim=-1) @ proj["v"][:, j * hd:(j + 1) * hd])
        A = torch.cat(heads, dim=-1)
        o = A @ widen_out(W[p + "self_attn.o_proj.weight"], ot[q + "self_attn.o_proj.weight"], h * hd).T
        if gemma:
            o = norm(o, torch.cat([W[p + "post_attention_layernorm.weight"], ot[q + "post_attention_layernorm.weight"]]))
            pre_ffn = "pre_feedforward_layernorm.weight"
        else:
            pre_ffn = "post_attention_layernorm.weight"
        zz = zz + o
        zn = norm(zz, torch.cat([W[p + pre_ffn], ot[q + pre_ffn]]))
        G = zn @ widen_in(W[p + "mlp.gate_proj.weight"], ot[q + "mlp.gate_proj.weight"], f).T
        U = zn @ widen_in(W[p + "mlp.up_proj.weight"], ot[q + "mlp.up_proj.weight"], f).T
        o = (act(G) * U) @ widen_out(W[p + "mlp.down_proj.weight"], ot[q + "mlp.down_proj.weight"], f).T
        if gemma:
            o = norm(o, torch.cat([W[p + "post_feedforward_layernorm.weight"],
                                   ot[q + "post_feedforward_layernorm.weight"]]))
        zz = zz + o
    zn = norm(zz, torch.cat([W["model.norm.weight"], ot[hf_name(OT.OUTPUT_NORM)]]))
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    logits = zn @ torch.cat([lm, z(lm.shape[0], d2)], dim=1).T
    signals = zn @ ot[hf_name(OT.HEAD)].T
    if hf_name(OT.HEAD, suffix=BIAS) in ot:
        signals = signals + ot[hf_name(OT.HEAD, suffix=BIAS)]
    return logits, signals


# ---------------------------------------------------------------------------
# otter-gguf serve on the tiny models (tests/test_serve*.py)
# ---------------------------------------------------------------------------
# the Python API's sampling defaults differ from the server request's (repeat_penalty 1.0 vs 1.1)
SERVE_SAME = dict(temperature=0, extra_body={"repeat_penalty": 1.0})
# signals of the same tokens from differently shaped decodes (batch, prefix reuse) round differently:
# the tolerance of tests/test_api.py
SERVE_TOL = dict(rtol=1e-3, atol=2e-3)


def serve_tiny(path, **kw):
    """(ServeConfig, started BackgroundServer) of ``otter-gguf serve`` on ``path`` (a small pool by default)."""
    from otter_gguf.server import ServeConfig, create_app
    from otter_gguf.server.background import BackgroundServer

    cfg = ServeConfig(model=str(path), **{**dict(parallel=4, ctx_size=256, n_batch=64, threads=1), **kw})
    return cfg, BackgroundServer(create_app(cfg)).start()


def openai_client(s, key="unused"):
    """The official openai client on a BackgroundServer."""
    import openai

    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=60)


def http_request(s, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) of one raw HTTP request."""
    conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def concat_blocks(blocks):
    """The otter blocks of a stream joined (token lists concatenated)."""
    keys = ("tokens", "token_texts", "text_offset", "signals", "rewards", "token_rewards")
    out = {k: [] for k in keys if blocks and blocks[0].get(k) is not None}
    for b in blocks:
        for k in out:
            out[k] += b[k]
    return out


#: the largest |completion reward - score() reward| on SmolLM2 Q4_1 + the demo head at q8_0 that the tests
#: allow (measured 0.049 on the 2-core AMD EPYC by tests/test_batch_shapes.py; room for other kernels)
REAL_REWARD_TOL = 0.1
