"""Converting an HF base model to GGUF with llama.cpp's own tools.

The conversion is llama.cpp's ``convert_hf_to_gguf.py`` from the pinned
llama.cpp source (run as a subprocess with this interpreter, with the pinned
``gguf-py`` it puts on its own path), nothing re-implemented. Types it cannot
write directly are produced afterwards by llama.cpp's quantizer
(``llama_cpp.llama_model_quantize``), exactly as ``llama-quantize`` would.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from otter_gguf_converter.errors import ConvertError

#: HF ``architectures[0]`` -> the llama.cpp architecture it converts to
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

#: types convert_hf_to_gguf.py writes itself
DIRECT_BASE_TYPES = ("f32", "f16", "bf16", "q8_0")

#: types made by llama_model_quantize afterwards (value: LLAMA_FTYPE_* name);
#: like llama-quantize, q3_k / q4_k / q5_k are aliases of the _m mixes.
QUANTIZED_BASE_TYPES = {
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

BASE_OUTTYPES = DIRECT_BASE_TYPES + tuple(QUANTIZED_BASE_TYPES)


def parse_base_outtype(name: str) -> str:
    n = name.strip().lower()
    if n not in BASE_OUTTYPES:
        raise ConvertError(f"unknown base output type {name!r}; expected one of: {', '.join(BASE_OUTTYPES)}")
    return n


def llama_cpp_source() -> Path:
    """The pinned llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)."""
    from otter_gguf.runtime.build import pinned_llama_cpp_source

    src = Path(pinned_llama_cpp_source())
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{src} has no convert_hf_to_gguf.py; the pinned llama.cpp source is incomplete")
    return src


def hf_architecture(hf_dir: Path) -> str:
    """Check an HF model directory and return the llama.cpp architecture it converts to."""
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"HF base {hf_dir}: config.json not found (expected an HF model directory or a GGUF file)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"HF base {cfg_path}: not valid JSON: {e}") from None
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_HF_ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_HF_ARCHITECTURES.items())
        raise ConvertError(
            f"HF base {hf_dir}: architecture {arch or cfg.get('model_type')!r} is not supported; "
            f"supported base architectures: {supported}"
        )
    return SUPPORTED_HF_ARCHITECTURES[arch]


def hf_hparams(hf_dir: Path) -> dict:
    """The base fingerprint as far as config.json tells it (vocab excluded: the
    GGUF's token list is authoritative), for a quick check before converting."""
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch = hf_architecture(hf_dir)
    out = {"base_architecture": arch}
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if isinstance(cfg.get(k), int):
            out[k] = cfg[k]
    if "num_attention_heads" in out:
        out["num_key_value_heads"] = cfg.get("num_key_value_heads") or out["num_attention_heads"]
        if "hidden_size" in out:
            out["head_dim"] = cfg.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
    return out


def _run_convert_hf_to_gguf(hf_dir: Path, out: Path, outtype: str) -> None:
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # use the pinned gguf-py next to the script
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not out.is_file():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {res.returncode}) on {hf_dir}:\n{tail}")


def _quantize(src: Path, dst: Path, outtype: str) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise ConvertError(
            f"--base-outtype {outtype} needs llama.cpp's quantizer from the runtime (llama_cpp), which is not "
            f"importable ({e}); install it with `otter-gguf build-runtime` or use --base-outtype "
            f"{'/'.join(DIRECT_BASE_TYPES)}"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_BASE_TYPES[outtype])
    params.nthread = os.cpu_count() or 1
    # llama.cpp logs every tensor at INFO level: keep its warnings and errors
    # (ggml_log_level: 3 WARN, 4 ERROR) for stderr / the error message only.
    kept: list[str] = []

    @llama_cpp.llama_log_callback
    def _log(level, text, user_data):  # pragma: no cover - called from C
        if level in (3, 4):
            kept.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    try:
        ret = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        _restore_llama_log(llama_cpp)
    if ret != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize({src} -> {outtype}) failed with code {ret}:\n" + "".join(kept[-20:]))
    if kept:
        sys.stderr.write("".join(kept))


def _restore_llama_log(llama_cpp) -> None:
    try:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except Exception:  # pragma: no cover - older/newer llama_cpp layouts
        llama_cpp.llama_log_set(None, ctypes.c_void_p(0))


def convert_hf_base(hf_dir, out_gguf, outtype: str = "f32") -> Path:
    """Convert an HF model directory to a GGUF file with llama.cpp's own tools.

    ``outtype``: f32, f16, bf16, q8_0 (written by convert_hf_to_gguf.py) or a
    llama-quantize type (q4_0 ... q6_k, q4_k_m, ...; converted to 16-bit by
    convert_hf_to_gguf.py first). The output is written to a temporary file in
    the target directory and renamed at the end.
    """
    hf_dir = Path(hf_dir)
    out = Path(out_gguf)
    outtype = parse_base_outtype(outtype)
    if not hf_dir.is_dir():
        raise ConvertError(f"HF base {hf_dir}: not a directory")
    hf_architecture(hf_dir)
    out_dir = out.parent if str(out.parent) else Path(".")
    if not out_dir.is_dir():
        raise ConvertError(f"output directory {out_dir} does not exist")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir))
    try:
        if outtype in DIRECT_BASE_TYPES:
            tmp = work / "base.gguf"
            _run_convert_hf_to_gguf(hf_dir, tmp, outtype)
        else:
            mid = work / "base-16.gguf"
            _run_convert_hf_to_gguf(hf_dir, mid, "auto")
            tmp = work / "base-q.gguf"
            _quantize(mid, tmp, outtype)
            mid.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
