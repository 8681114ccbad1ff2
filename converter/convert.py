"""Adapter + base -> Otter GGUF (docs/FORMAT.md).

Streaming: the base GGUF is memory-mapped and its tensors are copied as raw
bytes; the adapter's tensors are read, transformed, encoded and written one
at a time. Atomic: everything goes to a temporary file in the target
directory that is renamed onto OUT at the very end and removed on any
failure (KeyboardInterrupt included).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from otter_gguf.format.constants import (
    ADAPTER_TYPE_OTTER, GENERAL_TYPE_ADAPTER, KEY_PREFIX, NORM_TENSORS, NORM_WEIGHT_OFFSET, OTTER_FORMAT_VERSION, Keys,
    OtterTensor, SidecarKeys, gguf_name, parse_hf_name,
)
from otter_gguf.io import gguf_read
from otter_gguf.io.ggml_quant import encode
from otter_gguf.io.gguf_write import OutTensor, base_tensors, copy_kvs, write_gguf
from otter_gguf.io.outputs import atomic_outputs, check_output
from otter_gguf_converter import qtypes
from otter_gguf_converter.errors import ConvertError
from otter_gguf_converter.hf_base import convert_hf_base, hf_architecture, hf_hparams, parse_base_outtype


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> GGML interleaved rows, per head (LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`rope_permute`."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


@dataclass
class PlannedTensor:
    hf_name: str
    name: str
    np_shape: tuple[int, ...]  # numpy order (HF [out, in]) == reversed ggml ne
    qtype: QT
    nbytes: int
    permute_heads: int | None  # RoPE permutation per this many heads (llama Q/K)
    add: float = 0.0  # added to every value: the norm-weight shift of the base's converter (gemma3: 1 + w)


def _nbytes(qtype: QT, np_shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(np_shape))
    return n // block * size


def plan_tensors(adapter, cfg, arch: str, outtype: str, head_type: str | None):
    """The Otter tensors to write, in order, and the block-size fallbacks."""
    required = cfg.required_tensor_shapes()
    optional = cfg.optional_tensor_shapes()
    have = list(adapter.tensor_names)
    unknown = [n for n in have if n not in required and n not in optional]
    if unknown:
        raise ConvertError(
            f"adapter has unexpected tensor(s): {', '.join(sorted(unknown))} "
            f"(expected only the tensors of docs/OTTER.md §5, §7)"
        )
    missing = [n for n in required if n not in have]
    if missing:
        raise ConvertError(f"adapter is missing tensor(s): {', '.join(missing)}")
    bad = []
    for n in have:
        want = tuple(required.get(n) or optional[n])
        got = tuple(int(x) for x in adapter.shape(n))
        if got != want:
            bad.append(f"{n}: shape {list(got)}, expected {list(want)}")
    if bad:
        raise ConvertError("adapter tensor(s) with the wrong shape: " + "; ".join(bad))

    h2, h2kv = cfg.otter_num_attention_heads, cfg.otter_num_key_value_heads
    side_gqa = h2 // h2kv
    n_layer = cfg.num_hidden_layers
    plan: list[PlannedTensor] = []
    fallbacks: list[qtypes.Fallback] = []
    present = set(have)
    for hf in cfg.tensor_order():
        if hf not in present:
            continue
        kind, bid, suffix = parse_hf_name(hf, cfg.base_architecture)
        name = gguf_name(kind, bid, suffix)
        shape = tuple(int(x) for x in adapter.shape(hf))
        if len(shape) == 1:
            qt = QT.F32
        elif kind == OtterTensor.HEAD:
            qt = qtypes.head_type(outtype, head_type)
        else:
            qt = qtypes.tensor_type(outtype, name, n_layer, side_gqa)
        if len(shape) > 1:
            qt, fb = qtypes.fit_type(name, qt, shape[-1])
            if fb is not None:
                fallbacks.append(fb)
        perm = None
        if arch == "llama":
            if kind == OtterTensor.ATTN_Q:
                perm = h2
            elif kind == OtterTensor.ATTN_K:
                perm = h2kv
        add = NORM_WEIGHT_OFFSET.get(arch, 0.0) if kind in NORM_TENSORS else 0.0
        plan.append(PlannedTensor(hf, name, shape, qt, _nbytes(qt, shape), perm, add))
    return plan, fallbacks


def _otter_metadata(writer, cfg, info: gguf_read.BaseInfo) -> None:
    u32 = GGUFValueType.UINT32
    kv = writer.add_key_value
    kv(Keys.VERSION, OTTER_FORMAT_VERSION, u32)
    kv(Keys.BASE_MODEL, str(cfg.base_model), GGUFValueType.STRING)
    kv(Keys.EMBEDDING_LENGTH, cfg.otter_hidden_size, u32)
    kv(Keys.Attention.HEAD_COUNT, cfg.otter_num_attention_heads, u32)
    kv(Keys.Attention.HEAD_COUNT_KV, cfg.otter_num_key_value_heads, u32)
    kv(Keys.FEED_FORWARD_LENGTH, cfg.otter_intermediate_size, u32)
    kv(Keys.Head.OUTPUT_SIZE, cfg.head_output_size, u32)
    kv(Keys.Head.KIND, str(cfg.head_kind), GGUFValueType.STRING)
    kv(Keys.Head.SIGNAL_NAMES, list(cfg.signal_names), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    kv(Keys.Base.ARCHITECTURE, info.architecture, GGUFValueType.STRING)
    kv(Keys.Base.EMBEDDING_LENGTH, info.d, u32)
    kv(Keys.Base.BLOCK_COUNT, info.n_layer, u32)
    kv(Keys.Base.ATTENTION_HEAD_COUNT, info.h, u32)
    kv(Keys.Base.ATTENTION_HEAD_COUNT_KV, info.h_kv, u32)
    kv(Keys.Base.ATTENTION_KEY_LENGTH, info.hd, u32)
    kv(Keys.Base.FEED_FORWARD_LENGTH, info.f, u32)
    kv(Keys.Base.VOCAB_SIZE, info.vocab_size, u32)
    kv(Keys.Base.VOCAB_HASH, info.vocab_hash, GGUFValueType.UINT64)
    for key, value in info.arch_fingerprint.items():
        vt = gguf_read.ARCH_FINGERPRINT_TYPES[key]
        if isinstance(vt, tuple):
            kv(key, value, vt[0], sub_type=vt[1])
        else:
            kv(key, value, vt)


def _warn(msg: str) -> None:
    print(f"otter-gguf: warning: {msg}", file=sys.stderr, flush=True)


def _open_adapter(adapter_dir):
    from otter_gguf.format.adapter import open_adapter

    p = Path(adapter_dir)
    if not p.exists():
        raise ConvertError(f"adapter directory {p} does not exist")
    if not p.is_dir():
        raise ConvertError(f"adapter {p} is not a directory (expected a directory with otter_config.json "
                           f"and otter_model.safetensors)")
    return open_adapter(p)


def _check_base(cfg, info: gguf_read.BaseInfo) -> None:
    from otter_gguf.format.adapter import check_against_base

    check_against_base(cfg, info.hparams())


def _check_fields(cfg, hparams: dict, what: str) -> None:
    bad = [f"{k}: adapter {getattr(cfg, k)!r}, base {v!r}" for k, v in hparams.items() if getattr(cfg, k) != v]
    if bad:
        raise ConvertError(f"adapter does not match the {what}: " + "; ".join(bad))


def convert(
    adapter_dir,
    base,
    out,
    *,
    outtype: str = "f32",
    base_outtype: str = "f16",
    head_type: str | None = None,
    force: bool = False,
    progress: bool = True,
    sidecar: bool = False,
    name: str | None = None,
) -> Path:
    """Convert an Otter adapter plus its base model into one Otter GGUF.

    ``base`` is a GGUF file (copied unchanged) or an HF model directory
    (converted with llama.cpp's convert_hf_to_gguf.py to ``base_outtype``
    first; ``base_outtype`` is ignored for a GGUF base). ``outtype`` is the
    type of the Otter matrices (see docs/FORMAT.md), ``head_type`` overrides
    the head's. ``sidecar``: write only the Otter tensors and metadata as an
    Otter adapter GGUF for that base (docs/FORMAT.md "Adapter GGUF"), named
    ``name`` (default: the adapter directory's name). Raises
    :class:`ConvertError` / ``AdapterError`` (both ``ValueError``) for bad
    input; OUT is then left untouched.
    """
    try:
        outtype = qtypes.parse_outtype(outtype)
    except ValueError as e:
        raise ConvertError(f"--outtype: {e}") from None
    if head_type is not None:
        ht = head_type.strip().lower()
        if ht not in qtypes.HEAD_TYPES:
            raise ConvertError(f"--head-type: unknown type {head_type!r}; expected one of: {', '.join(qtypes.HEAD_TYPES)}")
        head_type = ht
    base_path = Path(base)
    out = check_output(Path(out), force, [base_path])
    out_dir = out.parent
    if sidecar and name is None:
        name = Path(adapter_dir).resolve().name
    hf_base = base_path.is_dir()
    if hf_base:
        base_outtype = parse_base_outtype(base_outtype)
        hf_architecture(base_path)  # fail fast on an unsupported architecture

    adapter = _open_adapter(adapter_dir)
    cfg = adapter.config
    if hf_base:  # fail before a possibly long HF conversion; the GGUF is checked again below
        _check_fields(cfg, hf_hparams(base_path), f"HF base {base_path} (config.json)")

    work_dir: Path | None = None
    try:
        if hf_base:
            work_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.base.", suffix=".tmp", dir=out_dir))
            if progress:
                print(f"otter-gguf: converting HF base {base_path} to GGUF ({base_outtype}) with "
                      f"llama.cpp's convert_hf_to_gguf.py", file=sys.stderr, flush=True)
            base_gguf = convert_hf_base(base_path, work_dir / "base.gguf", base_outtype)
        else:
            base_gguf = base_path
        reader = gguf_read.open_gguf(base_gguf, "base")
        info = gguf_read.base_info(reader, str(base_path))
        already = [k for k in gguf_read.kv_keys(reader) if k.startswith(KEY_PREFIX)]
        already_t = [t.name for t in reader.tensors if gguf_read.is_otter_tensor(t.name)]
        if already or already_t:
            raise ConvertError(
                f"base {base_path} already contains an Otter head ({(already + already_t)[0]} ...); "
                f"convert from the plain base model GGUF"
            )
        if gguf_read.field_value(reader, SidecarKeys.GENERAL_TYPE) == GENERAL_TYPE_ADAPTER:
            raise ConvertError(f"base {base_path} is an adapter GGUF, not a base model")
        _check_base(cfg, info)
        plan, fallbacks = plan_tensors(adapter, cfg, info.architecture, outtype, head_type)
        if fallbacks:
            _warn(f"{len(fallbacks)} tensor(s) do not fit their type's block size and fall back: " + "; ".join(
                f"{fb.name} (ne0 {fb.ne0}) {qtypes.type_name(fb.wanted)} -> {qtypes.type_name(fb.used)}"
                for fb in fallbacks))
        if any(t.qtype not in (QT.F32, QT.F16, QT.BF16) for t in plan):
            from otter_gguf.io.ggml_quant import load_ggml_base

            load_ggml_base()  # fail before writing if the quantizer is missing

        with atomic_outputs([out], force) as (tmp_path,):
            _write(reader, info, cfg, plan, tmp_path, adapter, progress, sidecar, name)
    finally:
        reader = None
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return out


def sidecar_kvs(arch: str, alignment: int, name: str | None) -> Callable:
    """The ``general.*`` / ``adapter.type`` keys of an Otter adapter GGUF (docs/FORMAT.md)."""
    def add(writer) -> None:
        s = GGUFValueType.STRING
        writer.add_key_value(SidecarKeys.ARCHITECTURE, arch, s)
        writer.add_key_value(SidecarKeys.GENERAL_TYPE, GENERAL_TYPE_ADAPTER, s)
        writer.add_key_value(SidecarKeys.ADAPTER_TYPE, ADAPTER_TYPE_OTTER, s)
        if name:
            writer.add_key_value(SidecarKeys.NAME, name, s)
        if alignment != GGUF_DEFAULT_ALIGNMENT:
            writer.add_key_value(SidecarKeys.ALIGNMENT, alignment, GGUFValueType.UINT32)

    return add


def _encoded(adapter, p: PlannedTensor) -> Callable[[], np.ndarray]:
    def data() -> np.ndarray:
        arr = adapter.get_numpy(p.hf_name)
        if arr.shape != p.np_shape:
            raise ConvertError(f"adapter tensor {p.hf_name}: shape {list(arr.shape)}, expected {list(p.np_shape)}")
        if p.permute_heads:
            arr = rope_permute(arr, p.permute_heads)
        if p.add:
            arr = arr + np.float32(p.add)
        return encode(arr, p.qtype)

    return data


def _write(reader, info, cfg, plan, tmp_path: Path, adapter, progress: bool, sidecar: bool = False,
           name: str | None = None) -> None:
    otter = [OutTensor(p.name, p.np_shape, p.qtype, p.nbytes, _encoded(adapter, p),
                       f"{p.name} {qtypes.type_name(p.qtype)}") for p in plan]
    alignment = int(reader.alignment)
    meta = lambda w: _otter_metadata(w, cfg, info)  # noqa: E731
    if sidecar:
        write_gguf(tmp_path, info.architecture, alignment, [sidecar_kvs(info.architecture, alignment, name), meta],
                   otter, progress)
    else:
        write_gguf(tmp_path, info.architecture, alignment, [copy_kvs(reader, lambda k: True), meta],
                   base_tensors(reader) + otter, progress)


