"""llama.cpp's quantizer (:func:`quantize`: ``llama_model_quantize``, the code and mixes of
``llama-quantize``), with the type names of :data:`LLAMA_FTYPES`.

Wraps libllama on purpose; ``llama_cpp`` is imported inside the functions only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
from pathlib import Path

from otter_gguf.io.errors import InputError
from otter_gguf.io.llama_log import llama_logs

__all__ = ["LLAMA_FTYPES", "llama_ftype", "quantize"]

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
        raise InputError(f"{what} needs llama.cpp from the runtime (llama_cpp), which is not importable "
                           f"({e}); install it with `otter-gguf build-runtime`") from None
    return llama_cpp


def llama_ftype(ftype: str | int) -> tuple[str, int]:
    """(name, ``llama_ftype`` value) of a type name of :data:`LLAMA_FTYPES` (any case) or a raw value."""
    if isinstance(ftype, int):
        return f"ftype {ftype}", ftype
    name = str(ftype).strip().lower()
    if name not in LLAMA_FTYPES:
        raise InputError(f"unknown llama.cpp output type {ftype!r}; expected one of: {', '.join(LLAMA_FTYPES)}")
    llama_cpp = _import_llama_cpp(f"quantizing to {name}")
    return name, int(getattr(llama_cpp, LLAMA_FTYPES[name]))


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str | int, *, threads: int | None = None,
             log_level: int | None = logging.DEBUG) -> Path:
    """``llama_model_quantize(src -> dst)``: the code of ``llama-quantize SRC DST TYPE``, its mixes.

    ``ftype``: a name of :data:`LLAMA_FTYPES` or a raw ``llama_ftype`` value;
    ``threads``: default all CPUs. The output is written to a temporary file
    next to ``dst`` and renamed when complete: on failure no file is left and
    :class:`InputError` names the type and shows llama.cpp's last warnings
    and errors. llama.cpp's log goes through :func:`llama_logs` (``log_level``).
    """
    src, dst = Path(src), Path(dst)
    name, value = llama_ftype(ftype)
    llama_cpp = _import_llama_cpp(f"quantizing to {name}")
    if not src.is_file():
        raise InputError(f"cannot quantize {src} to {name}: no such file")
    out_dir = dst.parent if str(dst.parent) else Path(".")
    if not out_dir.is_dir():
        raise InputError(f"cannot quantize {src} to {name}: output directory {out_dir} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = value
    params.nthread = threads or os.cpu_count() or 1
    tmp = _partial(out_dir / dst.name)
    try:
        with llama_logs(level=logging.WARNING, log_level=log_level) as kept:
            ret = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if ret != 0 or not tmp.is_file():
            log = "\n".join(kept[-20:]) or "(llama.cpp logged no warning or error)"
            raise InputError(f"llama_model_quantize({src} -> {name}) failed with code {ret}:\n{log}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
