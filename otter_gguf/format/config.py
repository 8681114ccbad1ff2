"""The Otter adapter configuration (``otter_config.json``, docs/OTTER.md §5).

`OtterConfig` holds exactly the JSON fields of docs/OTTER.md §5. Loading never trusts
the file: :meth:`OtterConfig.from_dict` rejects missing and unknown keys,
wrong types and inconsistent sizes with an :class:`AdapterError` naming the
field, the expected and the found value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otter_gguf.format.constants import (
    BIAS,
    OTTER_FORMAT_VERSION,
    SUPPORTED_ARCHITECTURES,
    WEIGHT,
    HeadKind,
    OtterTensor,
    hf_name,
    tensor_keys,
)

CONFIG_FILE_NAME = "otter_config.json"


class AdapterError(ValueError):
    """An Otter adapter (config or weights) is malformed or does not match."""


# Field name -> (python type, must be positive). Order is that of docs/OTTER.md §5.
_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "otter_hidden_size",
    "otter_num_attention_heads",
    "otter_num_key_value_heads",
    "otter_intermediate_size",
    "head_output_size",
)

# The base-model fingerprint fields (compared against the base by
# `check_against_base`).
BASE_FIELDS = (
    "base_architecture",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)


@dataclass
class OtterConfig:
    """Exactly the fields of ``otter_config.json`` (docs/OTTER.md §5)."""

    base_model: str
    base_architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    otter_hidden_size: int
    otter_num_attention_heads: int
    otter_num_key_value_heads: int
    otter_intermediate_size: int
    head_output_size: int
    head_kind: str
    signal_names: list[str] = field(default_factory=list)
    otter_version: int = OTTER_FORMAT_VERSION

    # ------------------------------------------------------------------ io
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = CONFIG_FILE_NAME) -> "OtterConfig":
        """Build and validate a config from a parsed JSON object.

        Every key of docs/OTTER.md §5 is required (``otter_version`` included);
        unknown keys are rejected by name.
        """
        if not isinstance(d, dict):
            raise AdapterError(f"{source}: expected a JSON object, found {type(d).__name__}")
        names = cls.field_names()
        missing = [n for n in names if n not in d]
        if missing:
            raise AdapterError(f"{source}: missing required key(s): {', '.join(missing)}")
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise AdapterError(
                f"{source}: unknown key(s): {', '.join(repr(k) for k in unknown)} "
                f"(expected only: {', '.join(names)})"
            )
        kwargs = dict(d)
        if isinstance(kwargs.get("signal_names"), list):
            kwargs["signal_names"] = list(kwargs["signal_names"])
        cfg = cls(**kwargs)
        cfg.validate(source=source)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OtterConfig":
        """Load from an adapter directory or from the JSON file itself."""
        p = Path(path)
        if p.is_dir():
            p = p / CONFIG_FILE_NAME
        if not p.is_file():
            raise AdapterError(f"{p}: adapter config not found")
        try:
            with open(p, encoding="utf-8") as fh:
                d = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{p}: not valid JSON: {e}") from None
        return cls.from_dict(d, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        d = {"otter_version": self.otter_version}
        for n in self.field_names():
            if n == "otter_version":
                continue
            v = getattr(self, n)
            d[n] = list(v) if isinstance(v, (list, tuple)) else v
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        """Validate and write ``otter_config.json`` into ``directory``."""
        self.validate()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        p = out / CONFIG_FILE_NAME
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")
        return p

    # ------------------------------------------------------------ validity
    def validate(self, *, source: str = CONFIG_FILE_NAME) -> None:
        """Raise :class:`AdapterError` naming the first problem found."""

        def err(msg: str) -> AdapterError:
            return AdapterError(f"{source}: {msg}")

        v = self.otter_version
        if isinstance(v, bool) or not isinstance(v, int):
            raise err(f"otter_version must be an integer, found {v!r}")
        if v != OTTER_FORMAT_VERSION:
            raise err(f"otter_version must be {OTTER_FORMAT_VERSION}, found {v!r}")
        if not isinstance(self.base_model, str):
            raise err(f"base_model must be a string, found {self.base_model!r}")
        if not isinstance(self.base_architecture, str):
            raise err(f"base_architecture must be a string, found {self.base_architecture!r}")
        if self.base_architecture not in SUPPORTED_ARCHITECTURES:
            raise err(
                f"base_architecture must be one of {', '.join(SUPPORTED_ARCHITECTURES)}, "
                f"found {self.base_architecture!r}"
            )
        for n in _INT_FIELDS:
            x = getattr(self, n)
            if isinstance(x, bool) or not isinstance(x, int):
                raise err(f"{n} must be an integer, found {x!r}")
            if x <= 0:
                raise err(f"{n} must be positive, found {x}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise err(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.otter_num_attention_heads % self.otter_num_key_value_heads:
            raise err(
                f"otter_num_attention_heads ({self.otter_num_attention_heads}) must be a "
                f"multiple of otter_num_key_value_heads ({self.otter_num_key_value_heads})"
            )
        if not isinstance(self.head_kind, str) or self.head_kind not in list(HeadKind):
            raise err(f"head_kind must be one of {', '.join(HeadKind)}, found {self.head_kind!r}")
        names = self.signal_names
        if not isinstance(names, (list, tuple)):
            raise err(f"signal_names must be a list of strings, found {names!r}")
        for i, s in enumerate(names):
            if not isinstance(s, str) or not s:
                raise err(f"signal_names[{i}] must be a non-empty string, found {s!r}")
        if len(set(names)) != len(names):
            dup = sorted({s for s in names if list(names).count(s) > 1})
            raise err(f"signal_names must be unique, duplicated: {', '.join(dup)}")
        if self.head_kind == HeadKind.REWARD:
            if len(names) != self.head_output_size:
                raise err(
                    f"signal_names has {len(names)} entries but head_output_size is "
                    f"{self.head_output_size} (head_kind '{HeadKind.REWARD}' needs one name per output)"
                )
        else:  # token_reward
            if self.head_output_size != self.vocab_size:
                raise err(
                    f"head_output_size ({self.head_output_size}) must equal vocab_size "
                    f"({self.vocab_size}) for head_kind '{HeadKind.TOKEN_REWARD}'"
                )
            if names:
                raise err(
                    f"signal_names must be empty for head_kind '{HeadKind.TOKEN_REWARD}', found {len(names)} entries"
                )

    # ------------------------------------------------------------- derived
    @property
    def d(self) -> int:
        return self.hidden_size

    @property
    def d2(self) -> int:
        return self.otter_hidden_size

    @property
    def n_out(self) -> int:
        return self.head_output_size

    def tensor_shape(self, kind: OtterTensor, suffix: str = WEIGHT) -> tuple[int, ...]:
        """HF shape (docs/OTTER.md §5) of the ``kind`` tensor (any layer)."""
        d, d2, hd = self.hidden_size, self.otter_hidden_size, self.head_dim
        h, h2, h2kv = self.num_attention_heads, self.otter_num_attention_heads, self.otter_num_key_value_heads
        f, f2 = self.intermediate_size, self.otter_intermediate_size
        T = OtterTensor
        shapes = {
            T.TOKEN_EMBD: (self.vocab_size, d2),
            T.ATTN_NORM: (d2,),
            T.ATTN_Q: (h2 * hd, d + d2),
            T.ATTN_K: (h2kv * hd, d + d2),
            T.ATTN_V: (h2kv * hd, d + d2),
            T.ATTN_OUT: (d2, (h + h2) * hd),
            T.FFN_NORM: (d2,),
            T.FFN_GATE: (f2, d + d2),
            T.FFN_UP: (f2, d + d2),
            T.FFN_DOWN: (d2, f + f2),
            T.OUTPUT_NORM: (d2,),
            T.HEAD: (self.head_output_size, d + d2),
            T.ATTN_Q_NORM: (hd,),
            T.ATTN_K_NORM: (hd,),
            T.ATTN_POST_NORM: (d2,),
            T.FFN_POST_NORM: (d2,),
        }
        return shapes[kind][:1] if suffix == BIAS else shapes[kind]

    def _tensor_shapes(self, biases: bool) -> dict[str, tuple[int, ...]]:
        arch = self.base_architecture
        return {hf_name(k, b, s, arch): self.tensor_shape(k, s)
                for k, b, s in tensor_keys(self.num_hidden_layers, arch=arch) if (s == BIAS) == biases}

    def required_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of every required tensor (docs/OTTER.md §5, §7 for qwen3/gemma3), in layer order."""
        return self._tensor_shapes(False)

    def optional_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of the optional biases (docs/OTTER.md §5)."""
        return self._tensor_shapes(True)

    def tensor_order(self) -> list[str]:
        """All possible tensor names (required and optional) in file order (biases right after their weights)."""
        arch = self.base_architecture
        return [hf_name(k, b, s, arch) for k, b, s in tensor_keys(self.num_hidden_layers, arch=arch)]

    def base_hparams(self) -> dict[str, Any]:
        """The base-model fingerprint fields of this config."""
        return {k: getattr(self, k) for k in BASE_FIELDS}

