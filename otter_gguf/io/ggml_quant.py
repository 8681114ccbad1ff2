"""ggml's own quantizer, called through ctypes from the runtime's libggml-base.

No quantization is written by hand here: every quantized type is produced by
``ggml_quantize_chunk`` of the libggml-base that ships with the runtime
(``site-packages/llama_cpp/lib``; ``LLAMA_CPP_LIB_PATH`` overrides the
directory exactly as it does for llama-cpp-python). F16 and BF16 are plain
float conversions and use numpy / gguf-py instead, so f32/f16/bf16 output
does not need the runtime at all.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from otter_gguf.io.errors import InputError

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_initialised: set[int] = set()


def _lib_file_names(base: str) -> list[str]:
    if sys.platform == "darwin":
        return [f"lib{base}.dylib", f"lib{base}.so"]
    if sys.platform == "win32":
        return [f"{base}.dll", f"lib{base}.dll"]
    return [f"lib{base}.so"]


def ggml_lib_dirs() -> list[pathlib.Path]:
    """Directories searched for libggml-base, in order."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return [pathlib.Path(override)]
    dirs = []
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs.append(pathlib.Path(loc) / "lib")
    return dirs


def load_ggml_base() -> ctypes.CDLL:
    """Load (once) libggml-base and declare the few functions used here."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for d in ggml_lib_dirs():
            for name in _lib_file_names("ggml-base"):
                p = d / name
                tried.append(str(p))
                if p.exists():
                    lib = ctypes.CDLL(str(p))
                    break
            else:
                continue
            break
        else:
            raise InputError(
                "quantized output needs ggml's quantizer from the runtime's libggml-base, "
                f"which was not found (looked for {', '.join(tried) or 'llama_cpp/lib: llama_cpp is not installed'}). "
                "Install the runtime with `otter-gguf build-runtime`, point LLAMA_CPP_LIB_PATH at a directory "
                "holding libggml-base, or use --outtype f32/f16/bf16."
            )
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        _lib = lib
        return lib


def row_nbytes(qtype: QT, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements (gguf-py's table, equal to ggml_row_size)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} does not fit {qtype.name} blocks of {block}")
    return n_per_row // block * size


def fits(qtype: QT, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[qtype][0] == 0


def encode(arr: np.ndarray, qtype: QT, threads: int | None = None) -> np.ndarray:
    """Encode a float32 array (last axis = ggml ne0) as ``qtype``.

    Returns an array whose ``.nbytes`` is the ggml size of the tensor: float32 /
    float16 arrays for F32 / F16, uint8 byte rows for everything else.
    """
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == QT.F32:
        return arr
    if qtype == QT.F16:
        return arr.astype(np.float16)
    if qtype == QT.BF16:
        from gguf import quants

        return quants.quantize(arr, QT.BF16)
    lib = load_ggml_base()
    n_per_row = arr.shape[-1]
    nrows = arr.size // n_per_row if n_per_row else 0
    rsize = row_nbytes(qtype, n_per_row)
    if int(lib.ggml_row_size(int(qtype), n_per_row)) != rsize:
        raise RuntimeError(f"gguf-py and libggml disagree on the row size of {qtype.name}")
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise InputError(f"{qtype.name} needs an importance matrix, which otter-gguf does not support")
    with _lock:
        if int(qtype) not in _initialised:
            lib.ggml_quantize_init(int(qtype))
            _initialised.add(int(qtype))
    out = np.empty((nrows, rsize), dtype=np.uint8)
    src = arr.reshape(nrows, n_per_row)
    src_p = src.ctypes.data
    dst_p = out.ctypes.data

    def work(r0: int, r1: int) -> int:
        # start is an element index; ggml writes at dst + (start / n_per_row) * row_size
        return int(lib.ggml_quantize_chunk(int(qtype), src_p, dst_p, r0 * n_per_row, r1 - r0, n_per_row, None))

    threads = threads or min(os.cpu_count() or 1, 8)
    # ctypes releases the GIL during the call, so row chunks run in parallel.
    min_rows = max(1, (1 << 20) // max(n_per_row, 1))  # ~1M elements per chunk at least
    n_chunks = max(1, min(threads, nrows // min_rows))
    if n_chunks == 1:
        written = work(0, nrows)
    else:
        bounds = np.linspace(0, nrows, n_chunks + 1).astype(int)
        with ThreadPoolExecutor(n_chunks) as ex:
            written = sum(ex.map(work, bounds[:-1], bounds[1:]))
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out.reshape(arr.shape[:-1] + (rsize,))
