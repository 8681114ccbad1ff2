"""Reading a GGUF: a clear error for a file that is not one, metadata values and their raw bytes,
the base's fingerprint and vocab hash, tensors as raw bytes (the writer is :mod:`otter_gguf.io.gguf_write`).

The base is read with ``gguf.GGUFReader`` (memory-mapped); metadata is carried
over as the exact bytes of each key/value pair, so every type (arrays, nested
arrays, empty arrays) survives unchanged; tensors are copied as raw bytes.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from otter_gguf.format.constants import ARCH_FINGERPRINT_KEYS, SUPPORTED_ARCHITECTURES, Keys, is_otter_tensor
from otter_gguf.io.errors import InputError

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def _not_utf8(e: UnicodeDecodeError) -> str:
    raw = bytes(e.object)
    shown = raw[:40] + (b"..." if len(raw) > 40 else b"")
    return f"is not valid UTF-8 (expected a UTF-8 string; found {shown!r}, bad byte at offset {e.start})"


def open_gguf(path: str | os.PathLike, what: str = "base") -> GGUFReader:
    """GGUFReader over ``path`` (mmap); a clear InputError if it is not a GGUF file."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"{what} {p}: no such file or directory (expected a GGUF file or an HF model directory)")
    if os.path.isdir(p):
        raise InputError(f"{what} {p} is a directory, expected a GGUF file")
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise InputError(f"{what} {p}: cannot read: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise InputError(f"{what} {p} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = GGUFReader(p, "r")
    except UnicodeDecodeError as e:  # the reader decodes key and tensor names
        raise InputError(f"{what} {p}: a metadata key or tensor name {_not_utf8(e)}") from None
    except Exception as e:  # ValueError, IndexError, reshape errors from a truncated/garbled file
        raise InputError(
            f"{what} {p} is not a readable GGUF file: truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    reader.otter_source = f"{what} {p}"  # names the file in field_value's errors
    for key, f in reader.fields.items():  # GGUF strings are UTF-8; string arrays (token texts) stay bytes
        if f.types == [GGUFValueType.STRING]:
            field_value(reader, key)
    if reader.byte_order != "I":
        raise InputError(f"{what} {p} is a big-endian GGUF; only little-endian GGUF files are supported")
    n_split = reader.fields.get("split.count")
    if n_split is not None and int(n_split.contents()) > 1:
        raise InputError(
            f"{what} {p} is one shard of a split GGUF ({int(n_split.contents())} files); merge it first "
            f"(llama-gguf-split --merge) and pass the merged file"
        )
    end = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > end:
            raise InputError(
                f"{what} {p} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                f"file has {end} bytes"
            )
    return reader


def field_value(reader: GGUFReader, key: str) -> Any:
    """A metadata value (None if the key is absent); InputError if a string in it is not UTF-8."""
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except UnicodeDecodeError as e:
        where = getattr(reader, "otter_source", "GGUF file")
        raise InputError(f"{where}: the value of metadata key {key} {_not_utf8(e)}") from None


def raw_kv_value(reader: GGUFReader, key: str) -> bytes:
    """The exact bytes of a KV pair's value (type tag + payload), as stored in the file."""
    f = reader.fields[key]
    total = sum(int(p.nbytes) for p in f.parts)
    key_bytes = int(f.parts[0].nbytes) + int(f.parts[1].nbytes)
    return bytes(reader.data[f.offset + key_bytes: f.offset + total])


def kv_keys(reader: GGUFReader) -> list[str]:
    """Metadata keys in file order (without the reader's synthetic GGUF.* entries)."""
    return [k for k in reader.fields if not k.startswith("GGUF.")]


def vocab_hash_tokens(tokens: Sequence[bytes]) -> int:
    """FNV-1a 64 over each token's bytes followed by one 0x00 byte (docs/FORMAT.md)."""
    h = FNV_OFFSET
    for tok in tokens:
        for b in tok:
            h = ((h ^ b) * FNV_PRIME) & _MASK
        h = (h * FNV_PRIME) & _MASK  # h ^= 0 is a no-op
    return h


def token_bytes(reader: GGUFReader) -> list[bytes]:
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return []
    return [bytes(f.parts[i]) for i in f.data]


def _scalar(reader: GGUFReader, key: str, *, required: bool = True, path: str = "") -> int | None:
    v = field_value(reader, key)
    if v is None:
        if required:
            raise InputError(f"base {path}: metadata key {key} is missing (needed for the Otter fingerprint)")
        return None
    if isinstance(v, list):  # per-layer arrays (some archs): must be uniform
        if not v or any(x != v[0] for x in v):
            raise InputError(f"base {path}: {key} varies per layer ({v}); Otter needs a uniform value")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"base {path}: metadata key {key} = {v!r}, expected an integer")
    return v


@dataclass
class BaseInfo:
    path: str
    architecture: str
    d: int
    n_layer: int
    h: int
    h_kv: int
    hd: int
    f: int
    vocab_size: int
    vocab_hash: int
    n_tensors: int
    tensor_bytes: int
    quant_mix: dict[str, int] = field(default_factory=dict)
    # the architecture's own fingerprint values (ARCH_FINGERPRINT_KEYS), by otter.base.* key
    arch_fingerprint: dict[str, Any] = field(default_factory=dict)

    def hparams(self) -> dict[str, Any]:
        """The fingerprint as OtterConfig field names (for check_against_base)."""
        return {
            "base_architecture": self.architecture,
            "hidden_size": self.d,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.h,
            "num_key_value_heads": self.h_kv,
            "head_dim": self.hd,
            "intermediate_size": self.f,
            "vocab_size": self.vocab_size,
        }


def base_info(reader: GGUFReader, path: str = "", *, require_supported: bool = True) -> BaseInfo:
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise InputError(f"base {path}: general.architecture is missing; is this a llama.cpp model GGUF?")
    if require_supported and arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"base {path}: architecture {arch!r} is not supported; supported base architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    d = _scalar(reader, f"{arch}.embedding_length", path=path)
    n_layer = _scalar(reader, f"{arch}.block_count", path=path)
    h = _scalar(reader, f"{arch}.attention.head_count", path=path)
    h_kv = _scalar(reader, f"{arch}.attention.head_count_kv", required=False, path=path) or h
    hd = _scalar(reader, f"{arch}.attention.key_length", required=False, path=path) or (d // h if h else 0)
    f = _scalar(reader, f"{arch}.feed_forward_length", path=path)
    toks = token_bytes(reader)
    if not toks:
        raise InputError(f"base {path}: tokenizer.ggml.tokens is missing (needed for the vocab fingerprint)")
    mix: dict[str, int] = {}
    nbytes = 0
    n = 0
    for t in reader.tensors:
        if is_otter_tensor(t.name):
            continue
        n += 1
        nbytes += int(t.n_bytes)
        k = t.tensor_type.name.lower()
        mix[k] = mix.get(k, 0) + 1
    return BaseInfo(path, arch, d, n_layer, h, h_kv, hd, f, len(toks), vocab_hash_tokens(toks), n, nbytes, mix,
                    arch_fingerprint(reader, arch, n_layer, path))


#: the GGUF value type of each architecture-specific fingerprint key (docs/FORMAT.md; arrays: (ARRAY, item type))
ARCH_FINGERPRINT_TYPES: dict[str, Any] = {
    Keys.Base.SLIDING_WINDOW: GGUFValueType.UINT32,
    Keys.Base.SLIDING_WINDOW_PATTERN: (GGUFValueType.ARRAY, GGUFValueType.BOOL),
    Keys.Base.ROPE_FREQ_BASE: GGUFValueType.FLOAT32,
    Keys.Base.ROPE_FREQ_BASE_SWA: GGUFValueType.FLOAT32,
}

#: llama.cpp's default sliding-window period (load_swa_pattern(ml, 6) of src/models/gemma3.cpp)
_SWA_PERIOD = {"gemma3": 6}


def _swa_pattern(reader: GGUFReader, arch: str, n_layer: int, n_swa: int, path: str) -> list[bool]:
    """Which layers slide, as llama.cpp resolves it (llama_model_base::load_swa_pattern, set_swa_pattern)."""
    if n_swa <= 0:
        return [False] * n_layer
    key = f"{arch}.attention.sliding_window_pattern"
    v = field_value(reader, key)
    if isinstance(v, list):
        if len(v) != n_layer or any(not isinstance(x, (bool, int)) for x in v):
            raise InputError(f"base {path}: {key} must have one boolean per layer ({n_layer}), found {v!r}")
        return [bool(x) for x in v]
    n = _SWA_PERIOD[arch] if v is None else _scalar(reader, key, path=path)
    return [n == 0 or i % n < n - 1 for i in range(n_layer)]


def arch_fingerprint(reader: GGUFReader, arch: str, n_layer: int, path: str = "") -> dict[str, Any]:
    """The values of ``ARCH_FINGERPRINT_KEYS[arch]`` for a base GGUF, as its llama.cpp hparams have them."""
    if arch not in ARCH_FINGERPRINT_KEYS:
        return {}
    n_swa = _scalar(reader, f"{arch}.attention.sliding_window", required=False, path=path) or 0
    base = field_value(reader, f"{arch}.rope.freq_base")
    base = 10000.0 if base is None else float(base)  # llama.cpp's default rope_freq_base_train
    base_swa = field_value(reader, f"{arch}.rope.freq_base_swa")
    out = {
        Keys.Base.SLIDING_WINDOW: n_swa,
        Keys.Base.SLIDING_WINDOW_PATTERN: _swa_pattern(reader, arch, n_layer, n_swa, path),
        Keys.Base.ROPE_FREQ_BASE: base,
        # absent: llama.cpp's default rope_freq_base_train_swa (llama-hparams.h: 10000), not freq_base; the
        # Gemma 3 270M GGUF on PyPI has no freq_base_swa key and llama.cpp runs its sliding layers at 10000
        Keys.Base.ROPE_FREQ_BASE_SWA: 10000.0 if base_swa is None else float(base_swa),
    }
    assert list(out) == list(ARCH_FINGERPRINT_KEYS[arch])
    return out


def ggml_shape_to_numpy(ne: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(list(ne)))


def tensor_raw(reader: GGUFReader, t) -> np.ndarray:
    """The tensor's bytes in the base file, as a uint8 view of the mmap (no copy)."""
    return reader.data[t.data_offset: t.data_offset + t.n_bytes]


def release_pages(reader: GGUFReader, start: int, nbytes: int) -> None:
    """Drop the mapped pages of [start, start+nbytes) from this process's RSS.

    The base is mapped read-only, so the pages stay in the page cache and are
    simply faulted in again if touched; this keeps peak RSS near the largest
    tensor instead of the whole base file.
    """
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo = (start // page) * page
    hi = min(start + nbytes, len(mm))
    hi = (hi // page) * page  # only whole pages that the tensor fully owns at the end
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # pragma: no cover - best effort
            pass


def qtype_name(t: GGMLQuantizationType) -> str:
    return t.name.lower()
