"""Converting an HF base model to GGUF with llama.cpp's own tools.

The conversion is llama.cpp's ``convert_hf_to_gguf.py`` from the pinned
llama.cpp source (run as a subprocess with this interpreter, with the pinned
``gguf-py`` it puts on its own path), nothing re-implemented. Types it cannot
write directly are produced afterwards by llama.cpp's quantizer
(``llama_cpp.llama_model_quantize`` through :func:`otter_gguf.io.llama_quantize.quantize`),
exactly as ``llama-quantize`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from otter_gguf.format.constants import HF_ARCHITECTURES
from otter_gguf.io.llama_quantize import LLAMA_FTYPES, quantize
from otter_gguf.io.llama_source import LlamaCppSourceError, pinned_llama_cpp_source
from otter_gguf_converter.errors import ConvertError

#: HF ``architectures[0]`` -> the llama.cpp architecture it converts to
SUPPORTED_HF_ARCHITECTURES = {hf: arch for arch, (hf, _) in HF_ARCHITECTURES.items()}

#: types convert_hf_to_gguf.py writes itself
DIRECT_BASE_TYPES = ("f32", "f16", "bf16", "q8_0")

#: types made by llama_model_quantize afterwards (otter_gguf.io.llama_quantize.LLAMA_FTYPES: like llama-quantize,
#: q3_k / q4_k / q5_k are aliases of the _m mixes)
QUANTIZED_BASE_TYPES = tuple(t for t in LLAMA_FTYPES if t not in DIRECT_BASE_TYPES)

BASE_OUTTYPES = DIRECT_BASE_TYPES + QUANTIZED_BASE_TYPES


def parse_base_outtype(name: str) -> str:
    n = name.strip().lower()
    if n not in BASE_OUTTYPES:
        raise ConvertError(f"unknown base output type {name!r}; expected one of: {', '.join(BASE_OUTTYPES)}")
    return n


def llama_cpp_source() -> Path:
    """The pinned llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)."""
    src = pinned_llama_cpp_source()
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppSourceError(f"{src} has no convert_hf_to_gguf.py; the pinned llama.cpp source is incomplete")
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
            default = 256 if arch == "gemma3" else out["hidden_size"] // out["num_attention_heads"]  # HF's default
            out["head_dim"] = cfg.get("head_dim") or default
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
            quantize(mid, tmp, outtype)
            mid.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
