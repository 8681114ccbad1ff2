"""The eval's inputs: prompts, the types, MODEL.gguf and its base part."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from otter_gguf.format.constants import KEY_PREFIX, Keys


DEFAULT_TYPES: tuple[str, ...] = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "eval_prompts.txt"


class EvalError(ValueError):
    """Bad input to the eval (unreadable prompts, wrong MODEL.gguf, unknown type, ...)."""


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """One text per line; blank lines and ``#`` comment lines are skipped."""
    p = Path(path) if path is not None else DEFAULT_PROMPTS
    if not p.is_file():
        raise EvalError(f"prompt file {p} does not exist" if not p.exists() else f"prompt file {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"prompt file {p} is not UTF-8 text: {e}") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if len(prompts) < 2:
        raise EvalError(f"prompt file {p} has {len(prompts)} prompt(s); the eval needs at least 2 "
                        f"(one text per line, '#' starts a comment line)")
    return prompts


def parse_types(types: str | Sequence[str]) -> list[str]:
    """``"f16,q8_0"`` or a list -> validated, de-duplicated type names."""
    from otter_gguf.io.llama_quantize import LLAMA_FTYPES
    from otter_gguf_converter.qtypes import OUTTYPES

    items = types.split(",") if isinstance(types, str) else list(types)
    known = [t for t in OUTTYPES if t in LLAMA_FTYPES]
    out: list[str] = []
    for raw in items:
        t = str(raw).strip().lower()
        if not t:
            continue
        if t not in known:
            raise EvalError(f"unknown type {raw!r} in --types; expected a comma-separated list of: {', '.join(known)}")
        if t not in out:
            out.append(t)
    if not out:
        raise EvalError("--types is empty; give at least one type, e.g. --types q8_0,q4_k_m")
    return out


def _write_base_part(src: Path, dst: Path) -> None:
    """The base part of an Otter GGUF (drop the otter* tensors and otter.* keys;
    docs/FORMAT.md: that is the base file's content)."""
    from otter_gguf.io import gguf_read
    from otter_gguf.io.gguf_write import base_tensors, copy_kvs, write_gguf

    reader = gguf_read.open_gguf(src, "MODEL.gguf")
    info = gguf_read.base_info(reader, str(src))
    write_gguf(dst, info.architecture, int(reader.alignment),
               [copy_kvs(reader, lambda k: not k.startswith(KEY_PREFIX))], base_tensors(reader))


@dataclass
class _ModelInfo:
    path: Path
    is_otter: bool
    base_type: str
    signal_names: list[str]
    head_kind: str | None
    n_ctx_train: int | None
    hparams: dict


_UNQUANTIZED = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def _inspect_model(path: Path) -> _ModelInfo:
    from otter_gguf.io import gguf_read

    reader = gguf_read.open_gguf(path, "MODEL.gguf")
    info = gguf_read.base_info(reader, str(path))
    mats = [t for t in reader.tensors if not gguf_read.is_otter_tensor(t.name) and len(t.shape) >= 2]
    kinds = sorted({t.tensor_type.name for t in mats})
    bad = [k for k in kinds if k not in _UNQUANTIZED]
    if bad or not kinds:
        raise EvalError(
            f"MODEL.gguf {path}: its base matrices are {'/'.join(kinds) or 'missing'}; the eval needs an "
            f"unquantized (f32, f16 or bf16) GGUF as the logits reference and the source of the quantized bases "
            f"(e.g. `otter-gguf convert ADAPTER --base HF_DIR --base-outtype f32 -o MODEL.gguf`)")
    base_type = _UNQUANTIZED[kinds[0]] if len(kinds) == 1 else "/".join(_UNQUANTIZED[k] for k in kinds)
    is_otter = any(gguf_read.is_otter_tensor(t.name) for t in reader.tensors)
    names = gguf_read.field_value(reader, Keys.Head.SIGNAL_NAMES) if is_otter else None
    kind = gguf_read.field_value(reader, Keys.Head.KIND) if is_otter else None
    ctx = gguf_read.field_value(reader, f"{info.architecture}.context_length")
    return _ModelInfo(path, is_otter, base_type, list(names or []), kind, int(ctx) if ctx else None,
                      info.hparams())
