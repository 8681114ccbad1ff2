"""The Otter adapter configuration (``otter_config.json``, OTTER_SPEC.md §4).

`OtterConfig` holds exactly the JSON fields of the spec. Loading never trusts
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

CONFIG_FILE_NAME = "otter_config.json"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
HEAD_KINDS = ("reward", "token_reward")
OTTER_VERSION = 1


class AdapterError(ValueError):
    """An Otter adapter (config or weights) is malformed or does not match."""


# Field name -> (python type, must be positive). Order is the spec's order.
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
    """Exactly the fields of ``otter_config.json`` (spec §4)."""

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
    otter_version: int = OTTER_VERSION

    # ------------------------------------------------------------------ io
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = CONFIG_FILE_NAME) -> "OtterConfig":
        """Build and validate a config from a parsed JSON object.

        Every key of the spec is required (``otter_version`` included);
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
        if v != OTTER_VERSION:
            raise err(f"otter_version must be {OTTER_VERSION}, found {v!r}")
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
        if not isinstance(self.head_kind, str) or self.head_kind not in HEAD_KINDS:
            raise err(f"head_kind must be one of {', '.join(HEAD_KINDS)}, found {self.head_kind!r}")
        names = self.signal_names
        if not isinstance(names, (list, tuple)):
            raise err(f"signal_names must be a list of strings, found {names!r}")
        for i, s in enumerate(names):
            if not isinstance(s, str) or not s:
                raise err(f"signal_names[{i}] must be a non-empty string, found {s!r}")
        if len(set(names)) != len(names):
            dup = sorted({s for s in names if list(names).count(s) > 1})
            raise err(f"signal_names must be unique, duplicated: {', '.join(dup)}")
        if self.head_kind == "reward":
            if len(names) != self.head_output_size:
                raise err(
                    f"signal_names has {len(names)} entries but head_output_size is "
                    f"{self.head_output_size} (head_kind 'reward' needs one name per output)"
                )
        else:  # token_reward
            if self.head_output_size != self.vocab_size:
                raise err(
                    f"head_output_size ({self.head_output_size}) must equal vocab_size "
                    f"({self.vocab_size}) for head_kind 'token_reward'"
                )
            if names:
                raise err(
                    f"signal_names must be empty for head_kind 'token_reward', found {len(names)} entries"
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

    def layer_tensor_names(self, layer: int, *, optional: bool = False) -> list[str]:
        """Names of one layer's tensors in a stable, natural order."""
        p = f"otter.layers.{layer}."
        if optional:
            return [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        return [
            p + "input_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]

    def required_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of every required tensor (spec §4), in layer order."""
        d, d2, hd = self.hidden_size, self.otter_hidden_size, self.head_dim
        h, h2, h2kv = self.num_attention_heads, self.otter_num_attention_heads, self.otter_num_key_value_heads
        f, f2 = self.intermediate_size, self.otter_intermediate_size
        V, n = self.vocab_size, self.head_output_size
        out: dict[str, tuple[int, ...]] = {"otter.embed_tokens.weight": (V, d2)}
        for layer in range(self.num_hidden_layers):
            p = f"otter.layers.{layer}."
            out[p + "input_layernorm.weight"] = (d2,)
            out[p + "self_attn.q_proj.weight"] = (h2 * hd, d + d2)
            out[p + "self_attn.k_proj.weight"] = (h2kv * hd, d + d2)
            out[p + "self_attn.v_proj.weight"] = (h2kv * hd, d + d2)
            out[p + "self_attn.o_proj.weight"] = (d2, (h + h2) * hd)
            out[p + "post_attention_layernorm.weight"] = (d2,)
            out[p + "mlp.gate_proj.weight"] = (f2, d + d2)
            out[p + "mlp.up_proj.weight"] = (f2, d + d2)
            out[p + "mlp.down_proj.weight"] = (d2, f + f2)
        out["otter.norm.weight"] = (d2,)
        out["otter.head.weight"] = (n, d + d2)
        return out

    def optional_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of the optional biases (spec §4)."""
        hd = self.head_dim
        h2, h2kv = self.otter_num_attention_heads, self.otter_num_key_value_heads
        out: dict[str, tuple[int, ...]] = {}
        for layer in range(self.num_hidden_layers):
            p = f"otter.layers.{layer}.self_attn."
            out[p + "q_proj.bias"] = (h2 * hd,)
            out[p + "k_proj.bias"] = (h2kv * hd,)
            out[p + "v_proj.bias"] = (h2kv * hd,)
        out["otter.head.bias"] = (self.head_output_size,)
        return out

    def tensor_order(self) -> list[str]:
        """All possible tensor names (required and optional) in layer order."""
        req = self.required_tensor_shapes()
        opt = self.optional_tensor_shapes()
        order = ["otter.embed_tokens.weight"]
        for layer in range(self.num_hidden_layers):
            names = self.layer_tensor_names(layer)
            biases = self.layer_tensor_names(layer, optional=True)
            # biases right after their weights
            order += names[:4] + biases + names[4:]
        order += ["otter.norm.weight", "otter.head.weight", "otter.head.bias"]
        assert set(order) == set(req) | set(opt)
        return order

    def base_hparams(self) -> dict[str, Any]:
        """The base-model fingerprint fields of this config."""
        return {k: getattr(self, k) for k in BASE_FIELDS}

