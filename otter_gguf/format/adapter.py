"""Reading, validating and writing Otter adapter checkpoints (docs/OTTER.md §5).

An adapter is a directory with ``otter_config.json`` and
``otter_model.safetensors``. :func:`open_adapter` checks the config and the
safetensors *header* (names, shapes, dtypes) without reading tensor data, so
the converter can stream 7B-size adapters one tensor at a time through
:meth:`OtterAdapter.iter_numpy`. Values are checked for finiteness whenever a
tensor is read.

Only safetensors is ever read or written: no pickle, no ``torch.load``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from otter_gguf.format.config import BASE_FIELDS, CONFIG_FILE_NAME, AdapterError, OtterConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ALLOWED_DTYPES",
    "AdapterError",
    "OtterAdapter",
    "OtterConfig",
    "check_against_base",
    "load_adapter",
    "open_adapter",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = CONFIG_FILE_NAME
ADAPTER_WEIGHTS_NAME = "otter_model.safetensors"

# safetensors dtype strings accepted in an adapter.
ALLOWED_DTYPES = ("F32", "F16", "BF16")

_SAVE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without torch
        return None
    return torch


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(x)) for x in shape) + "]"


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header by hand: (header dict, data start offset)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise AdapterError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(fh.fileno()).st_size
        if n > size - 8:
            raise AdapterError(f"{path}: not a safetensors file (header length {n} exceeds file)")
        header = json.loads(fh.read(n).decode("utf-8"))
    return header, 8 + n


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN kept NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class OtterAdapter:
    """A validated adapter whose tensors are read lazily from safetensors."""

    def __init__(self, path: Path, config: OtterConfig, weights_path: Path,
                 shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]):
        self.path = path
        self.config = config
        self.weights_path = weights_path
        self._shapes = shapes
        self._dtypes = dtypes
        order = config.tensor_order()
        self.tensor_names: list[str] = [n for n in order if n in shapes]

    def __repr__(self) -> str:
        c = self.config
        return (f"OtterAdapter({str(self.path)!r}, d2={c.otter_hidden_size}, "
                f"h2={c.otter_num_attention_heads}, n_out={c.head_output_size}, "
                f"tensors={len(self.tensor_names)})")

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def _check(self, name: str) -> None:
        if name not in self._shapes:
            raise AdapterError(f"{self.weights_path}: no tensor named {name!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype: ``"F32"``, ``"F16"`` or ``"BF16"``."""
        self._check(name)
        return self._dtypes[name]

    def _check_finite(self, name: str, arr: np.ndarray) -> None:
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            n_nan = int(np.isnan(arr).sum())
            raise AdapterError(
                f"{self.weights_path}: tensor {name!r} has {bad} non-finite value(s) "
                f"({n_nan} NaN, {bad - n_nan} Inf); all values must be finite"
            )

    def _read_raw_bf16(self, name: str) -> np.ndarray:
        header, start = _read_header(self.weights_path)
        info = header[name]
        b, e = info["data_offsets"]
        with open(self.weights_path, "rb") as fh:
            fh.seek(start + b)
            buf = fh.read(e - b)
        if len(buf) != e - b:
            raise AdapterError(f"{self.weights_path}: truncated data for tensor {name!r}")
        bits = np.frombuffer(buf, dtype="<u2").reshape(self._shapes[name])
        return _bf16_bits_to_f32(bits)

    def get_numpy(self, name: str, *, _use_torch: bool | None = None) -> np.ndarray:
        """Read one tensor as a float32 numpy array (values checked finite)."""
        self._check(name)
        dt = self._dtypes[name]
        torch = _torch() if _use_torch is None or _use_torch else None
        try:
            if dt == "BF16":
                if torch is not None:
                    from safetensors import safe_open

                    with safe_open(str(self.weights_path), framework="pt") as f:
                        arr = f.get_tensor(name).to(torch.float32).numpy()
                else:
                    arr = self._read_raw_bf16(name)
            else:
                from safetensors import safe_open

                with safe_open(str(self.weights_path), framework="numpy") as f:
                    arr = f.get_tensor(name)
                arr = np.asarray(arr, dtype=np.float32)
        except AdapterError:
            raise
        except Exception as e:  # corrupt data region
            raise AdapterError(f"{self.weights_path}: cannot read tensor {name!r}: {e}") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if tuple(arr.shape) != self._shapes[name]:  # pragma: no cover - defensive
            raise AdapterError(f"{self.weights_path}: tensor {name!r} read with shape {arr.shape}")
        self._check_finite(name, arr)
        return arr

    def get_torch(self, name: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        torch = _torch()
        if torch is None:  # pragma: no cover
            raise AdapterError("get_torch needs torch installed")
        dtype = torch.float32 if dtype is None else dtype
        return torch.from_numpy(self.get_numpy(name)).to(dtype)

    def iter_numpy(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, float32 array)`` one tensor at a time, in layer order."""
        for name in self.tensor_names:
            yield name, self.get_numpy(name)

    def load_all_torch(self, dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
        return {n: self.get_torch(n, dtype) for n in self.tensor_names}


def _validate_header(weights_path: Path, config: OtterConfig,
                     shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> None:
    req = config.required_tensor_shapes()
    opt = config.optional_tensor_shapes()
    missing = [n for n in req if n not in shapes]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise AdapterError(
            f"{weights_path}: missing required tensor(s): {', '.join(missing[:8])}{more}"
        )
    unexpected = sorted(n for n in shapes if n not in req and n not in opt)
    if unexpected:
        more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise AdapterError(
            f"{weights_path}: unexpected tensor(s): {', '.join(unexpected[:8])}{more} "
            f"(not part of an Otter adapter with this config)"
        )
    for n in config.tensor_order():
        if n not in shapes:
            continue
        want = req.get(n, opt.get(n))
        if tuple(shapes[n]) != tuple(want):
            raise AdapterError(
                f"{weights_path}: tensor {n!r} has shape {_fmt_shape(shapes[n])}, "
                f"expected {_fmt_shape(want)}"
            )
        if dtypes[n] not in ALLOWED_DTYPES:
            raise AdapterError(
                f"{weights_path}: tensor {n!r} has dtype {dtypes[n]}, "
                f"expected one of {', '.join(ALLOWED_DTYPES)}"
            )


def open_adapter(path: str | os.PathLike) -> OtterAdapter:
    """Validate an adapter directory (config + safetensors header) and open it.

    Tensor data is not read here; use :meth:`OtterAdapter.get_numpy` /
    :meth:`OtterAdapter.iter_numpy` (which check values are finite).
    """
    p = Path(path)
    if not p.exists():
        raise AdapterError(f"{p}: adapter directory does not exist")
    if not p.is_dir():
        raise AdapterError(f"{p}: adapter path is not a directory")
    cfg_path = p / ADAPTER_CONFIG_NAME
    w_path = p / ADAPTER_WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing adapter config file {ADAPTER_CONFIG_NAME}")
    config = OtterConfig.load(cfg_path)
    if not w_path.is_file():
        raise AdapterError(f"{w_path}: missing adapter weights file {ADAPTER_WEIGHTS_NAME}")
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(str(w_path), framework="numpy") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = tuple(int(x) for x in sl.get_shape())
                dtypes[name] = str(sl.get_dtype())
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"{w_path}: corrupt or truncated safetensors file: {e}") from None
    _validate_header(w_path, config, shapes, dtypes)
    return OtterAdapter(p, config, w_path, shapes, dtypes)


def load_adapter(path: str | os.PathLike, dtype: "torch.dtype | None" = None
                 ) -> tuple[OtterConfig, dict[str, "torch.Tensor"]]:
    """Fully validate (values included) and load an adapter into torch tensors."""
    ad = open_adapter(path)
    return ad.config, ad.load_all_torch(dtype)


def _to_numpy_f32(name: str, t: Any) -> np.ndarray:
    torch = _torch()
    if torch is not None and isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise AdapterError(f"tensor {name!r} has dtype {t.dtype}, expected a floating dtype")
        return t.detach().to("cpu", torch.float32).contiguous().numpy()
    arr = np.asarray(t)
    if arr.dtype.kind != "f":
        raise AdapterError(f"tensor {name!r} has dtype {arr.dtype}, expected a floating dtype")
    return np.ascontiguousarray(arr, dtype=np.float32)


def save_adapter(path: str | os.PathLike, config: OtterConfig,
                 tensors: Mapping[str, Any], dtype: str = "float32") -> Path:
    """Validate ``config`` and ``tensors`` then write an adapter directory.

    ``tensors`` maps docs/OTTER.md §5 names to torch tensors or numpy arrays;
    ``dtype`` is ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    """
    if dtype not in _SAVE_DTYPES:
        raise AdapterError(f"save dtype must be one of {', '.join(_SAVE_DTYPES)}, found {dtype!r}")
    config.validate()
    out = Path(path)
    w_path = out / ADAPTER_WEIGHTS_NAME
    arrays = {n: _to_numpy_f32(n, t) for n, t in tensors.items()}
    _validate_header(w_path, config, {n: a.shape for n, a in arrays.items()},
                     {n: "F32" for n in arrays})
    for n, a in arrays.items():
        if not np.isfinite(a).all():
            raise AdapterError(f"tensor {n!r} has non-finite values; refusing to save")
    order = [n for n in config.tensor_order() if n in arrays]
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "otter_version": str(config.otter_version)}
    if dtype == "bfloat16":
        torch = _torch()
        if torch is not None:
            from safetensors.torch import save_file as save_pt

            save_pt({n: torch.from_numpy(arrays[n]).to(torch.bfloat16) for n in order},
                    str(w_path), metadata=meta)
        else:  # write the file by hand
            _write_bf16_safetensors(w_path, {n: arrays[n] for n in order}, meta)
    else:
        from safetensors.numpy import save_file as save_np

        np_dt = np.float32 if dtype == "float32" else np.float16
        save_np({n: arrays[n].astype(np_dt) for n in order}, str(w_path), metadata=meta)
    config.save(out)
    return out


def _write_bf16_safetensors(w_path: Path, arrays: Mapping[str, np.ndarray],
                            meta: dict[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": meta}
    blobs = []
    off = 0
    for n, a in arrays.items():
        b = _f32_to_bf16_bits(a).astype("<u2").tobytes()
        header[n] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(w_path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for b in blobs:
            fh.write(b)


def check_against_base(config: OtterConfig, base_hparams: Mapping[str, Any]) -> None:
    """Check the adapter's base fingerprint against the base model's values.

    ``base_hparams`` uses the OtterConfig base field names (``base_architecture``,
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``intermediate_size``,
    ``vocab_size``). Raises :class:`AdapterError` listing every mismatch.
    """
    problems = []
    for k in BASE_FIELDS:
        want = getattr(config, k)
        if k not in base_hparams:
            problems.append(f"{k}: adapter {want!r}, base <missing>")
            continue
        have = base_hparams[k]
        if have != want:
            problems.append(f"{k}: adapter {want!r}, base {have!r}")
    if problems:
        raise AdapterError(
            "adapter does not match the base model: " + "; ".join(problems)
        )
