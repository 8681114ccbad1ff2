"""Reading and validating Otter GGUFs: the ``otter.*`` metadata of a one-file Otter GGUF or an adapter
GGUF ("sidecar", docs/FORMAT.md "Adapter GGUF") with its GGUF types, its Otter tensors against the config,
and a sidecar's base fingerprint (:meth:`Sidecar.check_base`). The runtime, ``inspect`` and the
converter's split / merge all read through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

from otter_gguf.format.config import AdapterError, OtterConfig
from otter_gguf.format.constants import (
    ADAPTER_TYPE_OTTER, ALL_KEYS, ARCH_FINGERPRINT_KEYS, FINGERPRINT_KEYS, GENERAL_TYPE_ADAPTER, KEY_PREFIX,
    SUPPORTED_ARCHITECTURES, Keys, SidecarKeys, arch_keys, gguf_tensor_name, is_otter_tensor,
)
from otter_gguf.io import gguf_read
from otter_gguf.io.errors import InputError

__all__ = ["KEY_TYPES", "Sidecar", "check_otter_tensors", "is_sidecar", "otter_config", "otter_metadata",
           "read_sidecar"]

# the GGUF type of every otter.* key (docs/FORMAT.md "Metadata"): (type,) or (ARRAY, item type); the
# architecture-specific fingerprint keys with the types the converter writes (gguf_read.ARCH_FINGERPRINT_TYPES)
_U32, _U64, _STR, _ARR = GGUFValueType.UINT32, GGUFValueType.UINT64, GGUFValueType.STRING, GGUFValueType.ARRAY
KEY_TYPES: dict[str, tuple[GGUFValueType, ...]] = {k: (_U32,) for k in ALL_KEYS}
KEY_TYPES.update({Keys.BASE_MODEL: (_STR,), Keys.Head.KIND: (_STR,), Keys.Head.SIGNAL_NAMES: (_ARR, _STR),
                  Keys.Base.ARCHITECTURE: (_STR,), Keys.Base.VOCAB_HASH: (_U64,)})
KEY_TYPES.update({k: (t if isinstance(t, tuple) else (t,)) for k, t in gguf_read.ARCH_FINGERPRINT_TYPES.items()})
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
            raise InputError(f"{where}: metadata key {key} is missing"
                               + (f" (a key of every Otter GGUF on a {arch} base)" if key not in ALL_KEYS else ""))
        want = KEY_TYPES[key]
        # an empty array may carry no item type
        if f.types[:1] != [want[0]] or (want[0] == _ARR and len(f.types) > 1 and f.types[1] != want[1]):
            got = "/".join(t.name.lower() for t in f.types) or "?"
            raise InputError(f"{where}: metadata key {key} has GGUF type {got}, expected {_type_name(want)}")
        meta[key] = gguf_read.field_value(reader, key)
    extra = [k for k in gguf_read.kv_keys(reader) if k.startswith(KEY_PREFIX) and k not in meta]
    if extra:
        other = [k for k in extra if k in KEY_TYPES]
        raise InputError(f"{where}: unknown Otter metadata key(s): {', '.join(extra)}"
                           + (f" ({', '.join(other)}: not a key of an Otter GGUF on a {arch} base)" if other else ""))
    pattern = meta.get(Keys.Base.SLIDING_WINDOW_PATTERN)
    if pattern is not None and len(pattern) != meta[Keys.Base.BLOCK_COUNT]:
        raise InputError(f"{where}: {Keys.Base.SLIDING_WINDOW_PATTERN} has {len(pattern)} entries, "
                           f"{Keys.Base.BLOCK_COUNT} is {meta[Keys.Base.BLOCK_COUNT]} (one per layer)")
    for key, hi in _BOUNDS.items():
        if not 1 <= meta[key] <= hi:
            raise InputError(f"{where}: {key} = {meta[key]} is out of range [1, {hi}]")
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
        raise InputError(str(e)) from None
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
        raise InputError(f"{where}: Otter tensor(s) missing: {', '.join(missing[:5])}"
                           + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    for name, t in have.items():
        shape = want.get(name) or optional.get(name)
        if shape is None:
            raise InputError(f"{where}: unexpected Otter tensor {name}")
        got = tuple(int(x) for x in t.shape)
        if _trim(got) != _trim(shape):  # llama.cpp writes [n, 1] as a 1-D tensor (ggml_n_dims)
            raise InputError(f"{where}: tensor {name} has shape {list(got)} (ggml order), expected {list(shape)}")
        if len(shape) == 1 and t.tensor_type != QT.F32:
            raise InputError(f"{where}: tensor {name} has type {t.tensor_type.name.lower()}, expected f32")
        if not _is_matrix_type(t.tensor_type):
            raise InputError(f"{where}: tensor {name} has type {t.tensor_type.name.lower()}, "
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

    def check_base(self, info: gguf_read.BaseInfo) -> None:
        """InputError naming every fingerprint value that differs from the base's (the architecture's own
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
            raise InputError(f"head {self.path} was made for another base than {info.path} "
                               f"(fingerprint mismatch: {'; '.join(bad)})")


def is_sidecar(reader: GGUFReader) -> bool:
    return (gguf_read.field_value(reader, SidecarKeys.GENERAL_TYPE) == GENERAL_TYPE_ADAPTER
            and gguf_read.field_value(reader, SidecarKeys.ADAPTER_TYPE) == ADAPTER_TYPE_OTTER)


def read_sidecar(path, what: str = "head") -> Sidecar:
    """Open and validate an Otter adapter GGUF; InputError naming the first problem."""
    p = str(path)
    reader = gguf_read.open_gguf(p, what)
    where = f"{what} {p}"
    gt = gguf_read.field_value(reader, SidecarKeys.GENERAL_TYPE)
    at = gguf_read.field_value(reader, SidecarKeys.ADAPTER_TYPE)
    if gt != GENERAL_TYPE_ADAPTER or at != ADAPTER_TYPE_OTTER:
        if gt == GENERAL_TYPE_ADAPTER:
            hint = f"an adapter GGUF with {SidecarKeys.ADAPTER_TYPE} = {at!r}"
        elif Keys.VERSION in reader.fields:
            hint = "a one-file Otter GGUF: use `otter-gguf split` to get its head"
        else:
            hint = f"{SidecarKeys.GENERAL_TYPE} = {gt!r}"
        raise InputError(f"{where} is not an Otter adapter GGUF (expected {SidecarKeys.GENERAL_TYPE} = "
                           f"'{GENERAL_TYPE_ADAPTER}', {SidecarKeys.ADAPTER_TYPE} = '{ADAPTER_TYPE_OTTER}'; "
                           f"it is {hint})")
    arch = gguf_read.field_value(reader, SidecarKeys.ARCHITECTURE)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"{where}: {SidecarKeys.ARCHITECTURE} = {arch!r}, expected one of "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    base_t = [t.name for t in reader.tensors if not is_otter_tensor(t.name)]
    if base_t:
        raise InputError(f"{where}: an adapter GGUF holds only Otter tensors, found {base_t[0]}")
    meta = otter_metadata(reader, where, arch)
    if meta[Keys.Base.ARCHITECTURE] != arch:
        raise InputError(f"{where}: {Keys.Base.ARCHITECTURE} = {meta[Keys.Base.ARCHITECTURE]!r} but "
                           f"{SidecarKeys.ARCHITECTURE} = {arch!r}")
    cfg = otter_config(meta, where)
    check_otter_tensors(reader, cfg, where)
    name = gguf_read.field_value(reader, SidecarKeys.NAME)
    return Sidecar(p, reader, name if isinstance(name, str) else None, arch, meta, cfg)
