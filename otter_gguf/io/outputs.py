"""Output files written atomically: checked before any work (:func:`check_output`), written to a
temporary file next to the target and renamed onto it when complete (:func:`atomic_outputs`), so no
partial output file is ever left."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from otter_gguf.io.errors import InputError

__all__ = ["atomic_outputs", "check_output"]


def _create_temp(out: Path) -> Path:
    """An empty temp file next to ``out`` (mode 0666 & ~umask, like ``out`` would get)."""
    for _ in range(100):
        p = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise InputError(f"cannot write to output directory {out.parent}: {e.strerror or e}") from None
        os.close(fd)
        return p
    raise RuntimeError(f"could not create a temporary file in {out.parent}")


def check_output(out: Path, force: bool, inputs: Sequence[Path] = ()) -> Path:
    """``out`` as a Path, or a InputError if it cannot be written (a directory, exists without
    ``force``, a missing directory, or one of the ``inputs``)."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"output {out} is a directory; expected a file path like {out / 'model-otter.gguf'}")
    for i in inputs:
        if out.exists() and Path(i).exists() and os.path.samefile(out, i):
            raise InputError(f"output {out} is also an input; write to another file")
    if out.exists() and not force:
        raise InputError(f"output {out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise InputError(f"output directory {out.parent} does not exist")
    return out


@contextmanager
def atomic_outputs(outs: Sequence[Path], force: bool) -> Iterator[list[Path]]:
    """Temp files next to ``outs``; renamed onto them when the block succeeds, removed otherwise
    (KeyboardInterrupt included): an output is either complete or untouched."""
    tmps: list[Path] = []
    try:
        for o in outs:
            tmps.append(_create_temp(o))
        yield tmps
        for o in outs:
            if o.exists() and not force:
                raise InputError(f"output {o} appeared while writing; pass --force to overwrite it")
        for t, o in zip(tmps, outs):
            os.replace(t, o)
        tmps = []
    finally:
        for t in tmps:
            try:
                t.unlink()
            except FileNotFoundError:
                pass
