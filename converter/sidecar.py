"""Otter adapter GGUFs ("sidecars", docs/FORMAT.md "Adapter GGUF"): split and merge (read and
validated by :mod:`otter_gguf.io.otter_read`).

A sidecar holds only the Otter tensors and the ``otter.*`` metadata (base
fingerprint included) of one head, marked ``general.type = adapter``,
``adapter.type = otter``, with the base's ``general.architecture``. ``split``
turns a one-file Otter GGUF into its base (the base's bytes) and a sidecar;
``merge`` turns a base and a sidecar into the one-file Otter GGUF that
``convert`` writes. Every output is written atomically; inputs are only read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from otter_gguf.format.constants import KEY_PREFIX, Keys, is_otter_tensor
from otter_gguf.io import gguf_read
from otter_gguf.io.gguf_write import base_tensors, copy_kvs, otter_tensors_raw, write_gguf
from otter_gguf.io.otter_read import (
    Sidecar, check_otter_tensors, is_sidecar, otter_config, otter_metadata, read_sidecar,
)
from otter_gguf.io.outputs import atomic_outputs, check_output
from otter_gguf_converter.convert import sidecar_kvs
from otter_gguf_converter.errors import ConvertError


def split(model, base_out, head_out, *, name: str | None = None, force: bool = False,
          progress: bool = True) -> tuple[Path, Path]:
    """One-file Otter GGUF -> (its base GGUF, an Otter adapter GGUF named ``name``, default the
    stem of ``head_out``). The base gets every non-Otter key and tensor, byte for byte, in order."""
    model = Path(model)
    base_out = check_output(Path(base_out), force, [model])
    head_out = check_output(Path(head_out), force, [model])
    if base_out.resolve() == head_out.resolve():
        raise ConvertError("--base-out and --head-out are the same file")
    reader = gguf_read.open_gguf(model, "model")
    where = f"model {model}"
    if is_sidecar(reader):
        raise ConvertError(f"{where} is already an Otter adapter GGUF (nothing to split)")
    if Keys.VERSION not in reader.fields:
        raise ConvertError(f"{where} has no Otter head (no {Keys.VERSION}): nothing to split")
    info = gguf_read.base_info(reader, str(model))
    meta = otter_metadata(reader, where, info.architecture)
    cfg = otter_config(meta, where)
    check_otter_tensors(reader, cfg, where)
    Sidecar(str(model), reader, None, info.architecture, meta, cfg).check_base(info)
    alignment = int(reader.alignment)
    with atomic_outputs([base_out, head_out], force) as (tmp_base, tmp_head):
        write_gguf(tmp_base, info.architecture, alignment, [copy_kvs(reader, lambda k: not k.startswith(KEY_PREFIX))],
                   base_tensors(reader), progress)
        write_gguf(tmp_head, info.architecture, alignment,
                   [sidecar_kvs(info.architecture, alignment, name or head_out.stem),
                    copy_kvs(reader, lambda k: k.startswith(KEY_PREFIX))],
                   otter_tensors_raw(reader), progress)
    return base_out, head_out


def merge(base, heads: Sequence, out, *, force: bool = False, progress: bool = True) -> Path:
    """Base GGUF + one Otter adapter GGUF -> the one-file Otter GGUF (as ``convert`` writes it)."""
    heads = [Path(h) for h in heads]
    if len(heads) != 1:
        raise ConvertError(f"merge takes one head, got {len(heads)}: a one-file Otter GGUF holds one head "
                           f"(attach several heads at run time: OtterLlama(base, otter_heads=[...]), --head)")
    base = Path(base)
    out = check_output(Path(out), force, [base, *heads])
    reader = gguf_read.open_gguf(base, "base")
    if is_sidecar(reader):
        raise ConvertError(f"base {base} is an Otter adapter GGUF; pass the base model first")
    if Keys.VERSION in reader.fields or any(is_otter_tensor(t.name) for t in reader.tensors):
        raise ConvertError(f"base {base} already contains an Otter head; merge into the plain base model GGUF")
    info = gguf_read.base_info(reader, str(base))
    head = read_sidecar(heads[0])
    head.check_base(info)
    with atomic_outputs([out], force) as (tmp,):
        write_gguf(tmp, info.architecture, int(reader.alignment),
                   [copy_kvs(reader, lambda k: True),
                    copy_kvs(head.reader, lambda k: k.startswith(KEY_PREFIX))],
                   base_tensors(reader) + otter_tensors_raw(head.reader), progress)
    return out


__all__ = ["merge", "split"]
