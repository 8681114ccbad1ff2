"""Otter adapter GGUFs ("sidecars", docs/FORMAT.md "Adapter GGUF"): read and validate, split, merge.

A sidecar holds only the Otter tensors and the ``otter.*`` metadata (base
fingerprint included) of one head, marked ``general.type = adapter``,
``adapter.type = otter``, with the base's ``general.architecture``. ``split``
turns a one-file Otter GGUF into its base (the base's bytes) and a sidecar;
``merge`` turns a base and a sidecar into the one-file Otter GGUF that
``convert`` writes. Every output is written atomically; inputs are only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

from otter_gguf.format.config import AdapterError, OtterConfig
from otter_gguf.format.constants import (
    ADAPTER_TYPE_OTTER, ALL_KEYS, ARCH_FINGERPRINT_KEYS, FINGERPRINT_KEYS, GENERAL_TYPE_ADAPTER, KEY_PREFIX,
    SUPPORTED_ARCHITECTURES, Keys, SidecarKeys, arch_keys, gguf_tensor_name, is_otter_tensor,
)
from otter_gguf_converter import gguf_io
from otter_gguf_converter.convert import (
    atomic_outputs, base_tensors, check_output, copy_kvs, otter_tensors_raw, sidecar_kvs, write_gguf,
)
from otter_gguf_converter.errors import ConvertError

# the GGUF type of every otter.* key (docs/FORMAT.md "Metadata"): (type,) or (ARRAY, item type); the
# architecture-specific fingerprint keys with the types the converter writes (gguf_io.ARCH_FINGERPRINT_TYPES)
_U32, _U64, _STR, _ARR = GGUFValueType.UINT32, GGUFValueType.UINT64, GGUFValueType.STRING, GGUFValueType.ARRAY
KEY_TYPES: dict[str, tuple[GGUFValueType, ...]] = {k: (_U32,) for k in ALL_KEYS}
KEY_TYPES.update({Keys.BASE_MODEL: (_STR,), Keys.Head.KIND: (_STR,), Keys.Head.SIGNAL_NAMES: (_ARR, _STR),
                  Keys.Base.ARCHITECTURE: (_STR,), Keys.Base.VOCAB_HASH: (_U64,)})
KEY_TYPES.update({k: (t if isinstance(t, tuple) else (t,)) for k, t in gguf_io.ARCH_FINGERPRINT_TYPES.items()})
assert set(KEY_TYPES) == set(ALL_KEYS).union(*ARCH_FINGERPRINT_KEYS.values())

# the loader's bounds (docs/RUNTIME.md "Loading and validation")
_BOUNDS = {Keys.EMBEDDING_LENGTH: 1 << 20, Keys.Attention.HEAD_COUNT: 4096, Keys.FEED_FORWARD_LENGTH: 1 << 22,
           Keys.Head.OUTPUT_SIZE: 1 << 24}

_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def _is_matrix_type(qt) -> bool:
    return qt in _FLOAT_TYPES or qt.name.startswith(("Q", "IQ", "TQ", "MXFP"))


def _type_name(types) -> str:
    return "array of " + types[1].name.lower() if types[0] == _ARR else types[0].name.lower()


def otter_metadata(reader: GGUFReader, where: str, arch: str) -> dict[str, Any]:
    """The ``otter.*`` values of a GGUF on a base of architecture ``arch`` (its keys: ``arch_keys(arch)``),
    each checked for presence and GGUF type."""
    meta: dict[str, Any] = {}
    for key in arch_keys(arch):
        f = reader.fields.get(key)
        if f is None:
            raise ConvertError(f"{where}: metadata key {key} is missing"
                               + (f" (a key of every Otter GGUF on a {arch} base)" if key not in ALL_KEYS else ""))
        want = KEY_TYPES[key]
        # an empty array may carry no item type
        if f.types[:1] != [want[0]] or (want[0] == _ARR and len(f.types) > 1 and f.types[1] != want[1]):
            got = "/".join(t.name.lower() for t in f.types) or "?"
            raise ConvertError(f"{where}: metadata key {key} has GGUF type {got}, expected {_type_name(want)}")
        meta[key] = gguf_io.field_value(reader, key)
    extra = [k for k in gguf_io.kv_keys(reader) if k.startswith(KEY_PREFIX) and k not in meta]
    if extra:
        other = [k for k in extra if k in KEY_TYPES]
        raise ConvertError(f"{where}: unknown Otter metadata key(s): {', '.join(extra)}"
                           + (f" ({', '.join(other)}: not a key of an Otter GGUF on a {arch} base)" if other else ""))
    pattern = meta.get(Keys.Base.SLIDING_WINDOW_PATTERN)
    if pattern is not None and len(pattern) != meta[Keys.Base.BLOCK_COUNT]:
        raise ConvertError(f"{where}: {Keys.Base.SLIDING_WINDOW_PATTERN} has {len(pattern)} entries, "
                           f"{Keys.Base.BLOCK_COUNT} is {meta[Keys.Base.BLOCK_COUNT]} (one per layer)")
    for key, hi in _BOUNDS.items():
        if not 1 <= meta[key] <= hi:
            raise ConvertError(f"{where}: {key} = {meta[key]} is out of range [1, {hi}]")
    return meta


def otter_config(meta: dict[str, Any], where: str) -> OtterConfig:
    """The OtterConfig that a head's metadata describes (validated like an adapter's config)."""
    fp = {FINGERPRINT_KEYS[k]: meta[k] for k in FINGERPRINT_KEYS}
    cfg = OtterConfig(
        base_model=meta[Keys.BASE_MODEL], base_architecture=fp["architecture"], hidden_size=fp["embedding_length"],
        num_hidden_layers=fp["block_count"], num_attention_heads=fp["head_count"],
        num_key_value_heads=fp["head_count_kv"], head_dim=fp["key_length"],
        intermediate_size=fp["feed_forward_length"], vocab_size=fp["vocab_size"],
        otter_hidden_size=meta[Keys.EMBEDDING_LENGTH], otter_num_attention_heads=meta[Keys.Attention.HEAD_COUNT],
        otter_num_key_value_heads=meta[Keys.Attention.HEAD_COUNT_KV],
        otter_intermediate_size=meta[Keys.FEED_FORWARD_LENGTH], head_output_size=meta[Keys.Head.OUTPUT_SIZE],
        head_kind=meta[Keys.Head.KIND], signal_names=list(meta[Keys.Head.SIGNAL_NAMES]),
        otter_version=meta[Keys.VERSION])
    try:
        cfg.validate(source=f"{where}: otter.* metadata")
    except AdapterError as e:
        raise ConvertError(str(e)) from None
    return cfg


def check_otter_tensors(reader: GGUFReader, cfg: OtterConfig, where: str) -> None:
    """The Otter tensors of a GGUF are exactly the ones ``cfg`` needs (optional biases allowed),
    each with its shape (ggml order) and an allowed type (1-D: f32)."""
    arch = cfg.base_architecture  # its adapter names (gemma3: post_attention_layernorm is the sandwich norm)
    want = {gguf_tensor_name(n, arch): tuple(reversed(s)) for n, s in cfg.required_tensor_shapes().items()}
    optional = {gguf_tensor_name(n, arch): tuple(reversed(s)) for n, s in cfg.optional_tensor_shapes().items()}
    have = {t.name: t for t in reader.tensors if is_otter_tensor(t.name)}
    missing = [n for n in want if n not in have]
    if missing:
        raise ConvertError(f"{where}: Otter tensor(s) missing: {', '.join(missing[:5])}"
                           + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    for name, t in have.items():
        shape = want.get(name) or optional.get(name)
        if shape is None:
            raise ConvertError(f"{where}: unexpected Otter tensor {name}")
        got = tuple(int(x) for x in t.shape)
        if _trim(got) != _trim(shape):  # llama.cpp writes [n, 1] as a 1-D tensor (ggml_n_dims)
            raise ConvertError(f"{where}: tensor {name} has shape {list(got)} (ggml order), expected {list(shape)}")
        if len(shape) == 1 and t.tensor_type != QT.F32:
            raise ConvertError(f"{where}: tensor {name} has type {t.tensor_type.name.lower()}, expected f32")
        if not _is_matrix_type(t.tensor_type):
            raise ConvertError(f"{where}: tensor {name} has type {t.tensor_type.name.lower()}, "
                               f"expected a float or quantized type")


def _trim(ne: tuple[int, ...]) -> tuple[int, ...]:
    """ggml dims without the trailing 1s (a [d, 1] matrix and a [d] vector are the same tensor)."""
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne


@dataclass
class Sidecar:
    """A validated Otter adapter GGUF."""

    path: str
    reader: GGUFReader
    name: str | None
    architecture: str
    metadata: dict[str, Any]
    config: OtterConfig

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint every Otter GGUF has (FINGERPRINT_KEYS)."""
        return {k: self.metadata[k] for k in FINGERPRINT_KEYS}

    @property
    def arch_fingerprint(self) -> dict[str, Any]:
        """The base architecture's own fingerprint values (ARCH_FINGERPRINT_KEYS, e.g. gemma3's window)."""
        return {k: self.metadata[k] for k in ARCH_FINGERPRINT_KEYS.get(self.architecture, {})}

    def check_base(self, info: gguf_io.BaseInfo) -> None:
        """ConvertError naming every fingerprint value that differs from the base's (the architecture's own
        keys included, as the base's llama.cpp hparams have them)."""
        base = {"architecture": info.architecture, "embedding_length": info.d, "block_count": info.n_layer,
                "head_count": info.h, "head_count_kv": info.h_kv, "key_length": info.hd,
                "feed_forward_length": info.f, "vocab_size": info.vocab_size, "vocab_hash": info.vocab_hash}
        bad = [f"{k} = {self.metadata[k]!r}, base has {base[b]!r}" for k, b in FINGERPRINT_KEYS.items()
               if self.metadata[k] != base[b]]
        if not bad:  # same architecture: the same architecture-specific keys
            bad = [f"{k} = {v!r}, base has {info.arch_fingerprint.get(k)!r}" for k, v in self.arch_fingerprint.items()
                   if v != info.arch_fingerprint.get(k)]
        if bad:
            raise ConvertError(f"head {self.path} was made for another base than {info.path} "
                               f"(fingerprint mismatch: {'; '.join(bad)})")


def is_sidecar(reader: GGUFReader) -> bool:
    return (gguf_io.field_value(reader, SidecarKeys.GENERAL_TYPE) == GENERAL_TYPE_ADAPTER
            and gguf_io.field_value(reader, SidecarKeys.ADAPTER_TYPE) == ADAPTER_TYPE_OTTER)


def read_sidecar(path, what: str = "head") -> Sidecar:
    """Open and validate an Otter adapter GGUF; ConvertError naming the first problem."""
    p = str(path)
    reader = gguf_io.open_gguf(p, what)
    where = f"{what} {p}"
    gt = gguf_io.field_value(reader, SidecarKeys.GENERAL_TYPE)
    at = gguf_io.field_value(reader, SidecarKeys.ADAPTER_TYPE)
    if gt != GENERAL_TYPE_ADAPTER or at != ADAPTER_TYPE_OTTER:
        if gt == GENERAL_TYPE_ADAPTER:
            hint = f"an adapter GGUF with {SidecarKeys.ADAPTER_TYPE} = {at!r}"
        elif Keys.VERSION in reader.fields:
            hint = "a one-file Otter GGUF: use `otter-gguf split` to get its head"
        else:
            hint = f"{SidecarKeys.GENERAL_TYPE} = {gt!r}"
        raise ConvertError(f"{where} is not an Otter adapter GGUF (expected {SidecarKeys.GENERAL_TYPE} = "
                           f"'{GENERAL_TYPE_ADAPTER}', {SidecarKeys.ADAPTER_TYPE} = '{ADAPTER_TYPE_OTTER}'; "
                           f"it is {hint})")
    arch = gguf_io.field_value(reader, SidecarKeys.ARCHITECTURE)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{where}: {SidecarKeys.ARCHITECTURE} = {arch!r}, expected one of "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    base_t = [t.name for t in reader.tensors if not is_otter_tensor(t.name)]
    if base_t:
        raise ConvertError(f"{where}: an adapter GGUF holds only Otter tensors, found {base_t[0]}")
    meta = otter_metadata(reader, where, arch)
    if meta[Keys.Base.ARCHITECTURE] != arch:
        raise ConvertError(f"{where}: {Keys.Base.ARCHITECTURE} = {meta[Keys.Base.ARCHITECTURE]!r} but "
                           f"{SidecarKeys.ARCHITECTURE} = {arch!r}")
    cfg = otter_config(meta, where)
    check_otter_tensors(reader, cfg, where)
    name = gguf_io.field_value(reader, SidecarKeys.NAME)
    return Sidecar(p, reader, name if isinstance(name, str) else None, arch, meta, cfg)


def split(model, base_out, head_out, *, name: str | None = None, force: bool = False,
          progress: bool = True) -> tuple[Path, Path]:
    """One-file Otter GGUF -> (its base GGUF, an Otter adapter GGUF named ``name``, default the
    stem of ``head_out``). The base gets every non-Otter key and tensor, byte for byte, in order."""
    model = Path(model)
    base_out = check_output(Path(base_out), force, [model])
    head_out = check_output(Path(head_out), force, [model])
    if base_out.resolve() == head_out.resolve():
        raise ConvertError("--base-out and --head-out are the same file")
    reader = gguf_io.open_gguf(model, "model")
    where = f"model {model}"
    if is_sidecar(reader):
        raise ConvertError(f"{where} is already an Otter adapter GGUF (nothing to split)")
    if Keys.VERSION not in reader.fields:
        raise ConvertError(f"{where} has no Otter head (no {Keys.VERSION}): nothing to split")
    info = gguf_io.base_info(reader, str(model))
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
    reader = gguf_io.open_gguf(base, "base")
    if is_sidecar(reader):
        raise ConvertError(f"base {base} is an Otter adapter GGUF; pass the base model first")
    if Keys.VERSION in reader.fields or any(is_otter_tensor(t.name) for t in reader.tensors):
        raise ConvertError(f"base {base} already contains an Otter head; merge into the plain base model GGUF")
    info = gguf_io.base_info(reader, str(base))
    head = read_sidecar(heads[0])
    head.check_base(info)
    with atomic_outputs([out], force) as (tmp,):
        write_gguf(tmp, info.architecture, int(reader.alignment),
                   [copy_kvs(reader, lambda k: True),
                    copy_kvs(head.reader, lambda k: k.startswith(KEY_PREFIX))],
                   base_tensors(reader) + otter_tensors_raw(head.reader), progress)
    return out


__all__ = ["Sidecar", "check_otter_tensors", "is_sidecar", "merge", "otter_config", "otter_metadata",
           "read_sidecar", "split"]
