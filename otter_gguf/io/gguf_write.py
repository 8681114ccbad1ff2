"""The one GGUF writer: :func:`write_gguf` writes the metadata of a list of KV writers and a list of
:class:`OutTensor` (raw bytes copied from another GGUF, or computed one at a time), streamed in file
order and fsync'd. Every file the project writes (the converter's outputs, the adapter split and merge,
the base part, the dequantized reference, the reward-model stand-in, the random base) goes through it.

Metadata is carried over as the exact bytes of each key/value pair (:func:`copy_kvs`), so every type
(arrays, nested arrays, empty arrays) survives unchanged.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from otter_gguf.format.constants import is_otter_tensor
from otter_gguf.io import gguf_read

__all__ = ["OtterGGUFWriter", "OutTensor", "base_tensors", "copy_kvs", "otter_tensors_raw", "raw_tensors",
           "write_gguf"]


class _RawValue(bytes):
    """A metadata value already encoded as GGUF bytes (type tag + payload)."""


class OtterGGUFWriter(GGUFWriter):
    """GGUFWriter that can also write raw (copied) metadata values and empty arrays."""

    def add_raw_value(self, key: str, raw: bytes) -> None:
        self.kv_data[0][key] = _GV(_RawValue(raw))

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, _RawValue):
            assert add_vtype
            return bytes(val)
        if vtype == GGUFValueType.ARRAY and isinstance(val, (list, tuple)) and len(val) == 0:
            if sub_type is None:
                raise ValueError("an empty GGUF array needs an explicit element type")
            out = bytearray()
            if add_vtype:
                out += self._pack("I", vtype)
            out += self._pack("I", sub_type)
            out += self._pack("Q", 0)
            return bytes(out)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _GV(raw: _RawValue):
    from gguf.gguf_writer import GGUFValue

    # the type is ignored by OtterGGUFWriter._pack_val for raw values
    return GGUFValue(value=raw, type=GGUFValueType.ARRAY)


@dataclass
class OutTensor:
    """One tensor to write: its info and a callable giving its bytes (called once, in file order)."""

    name: str
    np_shape: tuple[int, ...]
    qtype: QT
    nbytes: int
    data: Callable[[], np.ndarray]
    label: str = ""
    after: Callable[[], None] | None = None  # e.g. release the source's pages


def raw_tensors(reader: GGUFReader, keep: Callable[[str], bool] = lambda name: True) -> list[OutTensor]:
    """The tensors of ``reader`` whose name ``keep`` accepts, copied raw, in file order; each one's mapped
    pages are released once written (peak RSS near the largest tensor, not the whole file)."""
    return [OutTensor(t.name, gguf_read.ggml_shape_to_numpy(t.shape), t.tensor_type, int(t.n_bytes),
                      (lambda t=t: gguf_read.tensor_raw(reader, t)), f"{t.name} {gguf_read.qtype_name(t.tensor_type)}",
                      (lambda t=t: gguf_read.release_pages(reader, t.data_offset, int(t.n_bytes))))
            for t in reader.tensors if keep(t.name)]


def base_tensors(reader: GGUFReader) -> list[OutTensor]:
    """The non-Otter tensors of a GGUF, copied raw."""
    return raw_tensors(reader, lambda name: not is_otter_tensor(name))


def otter_tensors_raw(reader: GGUFReader) -> list[OutTensor]:
    """The Otter tensors of a GGUF (one-file or sidecar), copied raw."""
    return raw_tensors(reader, is_otter_tensor)


def copy_kvs(reader: GGUFReader, keep: Callable[[str], bool] = lambda key: True, *,
             rename: Callable[[str], str] = lambda key: key,
             replace: Mapping[str, tuple[Any, GGUFValueType]] | None = None) -> Callable[[GGUFWriter], None]:
    """A KV writer that copies ``reader``'s keys for which ``keep(key)`` holds, as raw bytes, in file order,
    under ``rename(key)``; a key of ``replace`` is written in its place with the given (value, type)."""
    keys = [k for k in gguf_read.kv_keys(reader) if keep(k)]
    replace = dict(replace or {})

    def add(writer: OtterGGUFWriter) -> None:
        for key in keys:
            if key in replace:
                writer.add_key_value(rename(key), *replace[key])
            else:
                writer.add_raw_value(rename(key), gguf_read.raw_kv_value(reader, key))

    return add


def write_gguf(path: Path, arch: str, alignment: int, kv_writers: Sequence[Callable[[GGUFWriter], None]],
               tensors: Sequence[OutTensor], progress: bool = False) -> None:
    """Write one GGUF: the KVs of ``kv_writers`` in order, then ``tensors`` in order; fsync'd."""
    writer = OtterGGUFWriter(path, arch)
    try:
        writer.kv_data = [{}]  # no implicit general.architecture: the KV writers add every key
        writer.data_alignment = int(alignment)
        for add in kv_writers:
            add(writer)
        for t in tensors:
            # element shape (not a uint8 byte shape), the type given explicitly
            writer.add_tensor_info(t.name, t.np_shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        bar = _progress_bar(sum(t.nbytes for t in tensors), len(tensors), progress)
        try:
            for t in tensors:
                bar(t.label or t.name, t.nbytes, pre=True)
                data = t.data()
                if data.nbytes != t.nbytes:
                    raise RuntimeError(f"{t.name}: {data.nbytes} bytes, planned {t.nbytes}")
                writer.write_tensor_data(data)
                del data
                if t.after is not None:
                    t.after()
                bar(None, t.nbytes)
        finally:
            bar(None, 0, close=True)
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        writer.close()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _progress_bar(total_bytes: int, n_tensors: int, enabled: bool) -> Callable:
    """A tqdm bar over bytes written (stderr); returns an update callback."""
    if not enabled:
        return lambda *a, **k: None
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               desc=f"writing {n_tensors} tensors", dynamic_ncols=True, leave=True)

    def update(label, nbytes, pre=False, close=False):
        if close:
            bar.close()
            return
        if label is not None:
            bar.set_postfix_str(f"{label} ({_human(nbytes)})", refresh=False)
        if not pre:
            bar.update(nbytes)

    return update
