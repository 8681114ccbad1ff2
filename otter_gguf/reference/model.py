"""PyTorch reference implementation of the base model and of Otter (docs/OTTER.md §3).

This is the accuracy oracle the converter and the patched llama.cpp runtime
are tested against. It is written in plain torch (no transformers) and reads
HF checkpoints (``config.json`` + ``*.safetensors``, sharded or not) of the
LLaMA family: ``llama``, ``qwen2``, ``qwen3`` (per-head Q/K norms) and
``gemma3`` (HF ``Gemma3ForCausalLM``: embedding scale, ``1 + w`` norms, per-head
Q/K norms, sandwich norms, sliding-window layers with their own RoPE base,
tanh-GELU, ``query_pre_attn_scalar``), with the side stream of docs/OTTER.md §7.

The main stream of :class:`OtterModel` runs through exactly the same code
(:meth:`BaseModel._run`) as the base-only forward, so its logits are
bit-identical to :meth:`BaseModel.forward`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from otter_gguf.format.adapter import _validate_header, check_against_base, load_adapter
from otter_gguf.format.config import OtterConfig
from otter_gguf.format.constants import (
    ARCH_TENSORS, BIAS, HF_ARCHITECTURES, NORM_TENSORS, NORM_WEIGHT_OFFSET, WEIGHT, HeadKind, hf_name, parse_hf_name,
)
from otter_gguf.format.constants import OtterTensor
from otter_gguf.format.constants import OtterTensor as T

__all__ = [
    "BaseConfig",
    "BaseModel",
    "KVCache",
    "OtterModel",
    "OtterOutput",
    "ReferenceError",
    "insert_otter",
    "load_base",
    "load_otter",
]


class ReferenceError(ValueError):
    """A base checkpoint is malformed or uses an unsupported feature."""


_ARCH_BY_HF = {hf: arch for arch, (hf, _) in HF_ARCHITECTURES.items()}
_ARCH_BY_MODEL_TYPE = {model_type: arch for arch, (_, model_type) in HF_ARCHITECTURES.items()}

SLIDING, FULL = "sliding_attention", "full_attention"


def _rope_type(sc: Mapping[str, Any] | None) -> str | None:
    if not sc:
        return None
    rt = sc.get("rope_type", sc.get("type"))
    return None if rt in (None, "default") else rt


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------
@dataclass
class BaseConfig:
    """The hyper-parameters of a LLaMA-family base model."""

    architecture: str  # "llama" | "qwen2" | "qwen3" | "gemma3"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    # gemma3 (docs/OTTER.md §7); the defaults are the llama family's
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5 (else hd ** -0.5)
    sliding_window: int | None = None           # the window of the sliding layers (distance < window)
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" | "full_attention"
    rope_local_theta: float | None = None       # RoPE base of the sliding layers (no scaling)
    final_logit_softcapping: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> "BaseConfig":
        archs = d.get("architectures") or []
        arch = None
        for a in archs:
            if a in _ARCH_BY_HF:
                arch = _ARCH_BY_HF[a]
                break
        if arch is None:
            arch = _ARCH_BY_MODEL_TYPE.get(d.get("model_type", ""))
        if arch is None:
            raise ReferenceError(
                f"{source}: unsupported architecture {archs or d.get('model_type')!r} "
                f"(supported: {', '.join(_ARCH_BY_HF)})"
            )
        try:
            hidden = int(d["hidden_size"])
            n_head = int(d["num_attention_heads"])
            n_layer = int(d["num_hidden_layers"])
            f = int(d["intermediate_size"])
            vocab = int(d["vocab_size"])
        except KeyError as e:
            raise ReferenceError(f"{source}: missing key {e.args[0]!r}") from None
        n_kv = int(d.get("num_key_value_heads") or n_head)
        head_dim = d.get("head_dim")
        head_dim = int(head_dim) if head_dim else (256 if arch == "gemma3" else hidden // n_head)
        if arch in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise ReferenceError(f"{source}: {arch} use_sliding_window=true is not supported")
        # transformers >= 5 writes rope settings as "rope_parameters" (gemma3: one dict per layer type)
        rope_params = dict(d.get("rope_parameters") or {})
        extra: dict[str, Any] = {}
        if arch == "gemma3":
            extra = cls._gemma3_fields(d, n_layer, source)
            if FULL in rope_params or SLIDING in rope_params:
                local = rope_params.get(SLIDING) or {}
                if _rope_type(local) is not None:
                    raise ReferenceError(f"{source}: RoPE scaling of the sliding layers is not supported")
                if local.get("rope_theta") is not None:
                    extra["rope_local_theta"] = float(local["rope_theta"])
                rope_params = dict(rope_params.get(FULL) or {})
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope_params:
            scaling = None if _rope_type(rope_params) is None else dict(rope_params)
        theta = d.get("rope_theta")
        if theta is None:
            theta = rope_params.get("rope_theta", 1_000_000.0 if arch == "gemma3" else 10000.0)
        if scaling is not None:
            rt = _rope_type(scaling)
            if rt is None:
                scaling = None
            elif rt not in ("llama3", "linear"):
                raise ReferenceError(
                    f"{source}: rope_scaling type {rt!r} is not supported (supported: llama3, linear)"
                )
        attention_bias = bool(d.get("attention_bias", arch == "qwen2"))
        if attention_bias and arch in ("qwen3", "gemma3"):
            raise ReferenceError(f"{source}: {arch} attention_bias=true is not supported")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=f,
            vocab_size=vocab,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", arch == "gemma3")),
            attention_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            raw=dict(d),
            **extra,
        )

    @staticmethod
    def _gemma3_fields(d: Mapping[str, Any], n_layer: int, source: str) -> dict[str, Any]:
        """gemma3's own settings, as HF ``Gemma3TextConfig`` reads them (its defaults included)."""
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ReferenceError(f"{source}: gemma3 hidden_activation {act!r} is not supported "
                                 f"(supported: gelu_pytorch_tanh)")
        if d.get("attn_logit_softcapping") is not None:
            raise ReferenceError(f"{source}: gemma3 attn_logit_softcapping is not supported")
        if d.get("use_bidirectional_attention"):
            raise ReferenceError(f"{source}: gemma3 use_bidirectional_attention=true is not supported")
        types = d.get("layer_types")
        if types is None:
            period = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
            types = [SLIDING if (i + 1) % period else FULL for i in range(n_layer)]
        types = tuple(types)
        if len(types) != n_layer or not set(types) <= {SLIDING, FULL}:
            raise ReferenceError(f"{source}: layer_types must list {n_layer} of {SLIDING!r}/{FULL!r}, found {types!r}")
        window = d.get("sliding_window", 4096)
        if SLIDING in types and (not isinstance(window, int) or window <= 0):
            raise ReferenceError(f"{source}: sliding_window must be a positive integer, found {window!r}")
        cap = d.get("final_logit_softcapping")
        return dict(
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            sliding_window=int(window) if SLIDING in types else None,
            layer_types=types,
            rope_local_theta=float(d.get("rope_local_base_freq", 10000.0)),
            final_logit_softcapping=float(cap) if cap else None,
        )

    # -- the features of docs/OTTER.md §7 -----------------------------------
    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of Q and K before RoPE (qwen3, gemma3)."""
        return self.architecture in ("qwen3", "gemma3")

    @property
    def sandwich_norms(self) -> bool:
        """A norm on each block's output before the residual add (gemma3)."""
        return self.architecture == "gemma3"

    @property
    def norm_offset(self) -> float:
        """Added to every stored RMSNorm weight before use (gemma3: x * (1 + w))."""
        return NORM_WEIGHT_OFFSET.get(self.architecture, 0.0)

    @property
    def embed_scale(self) -> float | None:
        """The embedding scale (gemma3: sqrt(d)), or None."""
        return math.sqrt(self.hidden_size) if self.architecture == "gemma3" else None

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return self.head_dim ** -0.5

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN gate activation: tanh-GELU (gemma3) or SiLU."""
        return F.gelu(x, approximate="tanh") if self.architecture == "gemma3" else F.silu(x)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    def window(self, layer: int) -> int | None:
        """The attention window of a layer (keys at distance < window), or None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None

    def norm_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The applied RMSNorm weight of a stored one (``1 + w`` for gemma3)."""
        off = self.norm_offset
        return w + off if off else w

    def otter_hparams(self) -> dict[str, Any]:
        """The fingerprint fields in OtterConfig naming (for `check_against_base`)."""
        return {
            "base_architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
        }

    def rope_inv_freq(self, dtype: torch.dtype, *, local: bool = False) -> torch.Tensor:
        """Inverse RoPE frequencies [hd/2], HF semantics (default/llama3/linear); ``local``: those of the
        sliding layers (gemma3: ``rope_local_base_freq``, no scaling)."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        hd = self.head_dim
        theta = self.rope_local_theta if local else self.rope_theta
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).to(cdt) / hd))
        sc = None if local else self.rope_scaling
        if not sc:
            return inv
        rt = sc.get("rope_type", sc.get("type"))
        factor = float(sc["factor"])
        if rt == "linear":
            return inv / factor
        if rt == "llama3":
            low = float(sc.get("low_freq_factor", 1.0))
            high = float(sc.get("high_freq_factor", 4.0))
            old = float(sc.get("original_max_position_embeddings", 8192))
            low_wl = old / low
            high_wl = old / high
            wavelen = 2 * math.pi / inv
            inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
            medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
            return torch.where(medium, smoothed, inv_l)
        raise ReferenceError(f"rope_scaling type {rt!r} is not supported")  # pragma: no cover


# --------------------------------------------------------------------------
# primitive ops (shared by the base and the Otter forward)
# --------------------------------------------------------------------------
def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _norm(x: torch.Tensor, inv_r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g * (x * inv_r)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, hd]; cos/sin [T, hd]
    return x * cos + _rotate_half(x) * sin


def _heads(x: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n, hd).transpose(1, 2)


def _head_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over hd (qwen3/gemma3 q_norm, k_norm): x [B, H, T, hd], each head by its own statistic."""
    return _norm(x, _inv_rms(x, eps), g)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, scale: float,
            window: int | None = None) -> torch.Tensor:
    """Causal GQA attention (keys at distance < ``window`` only, if given).
    q [B,H,T,hd], k/v [B,Hkv,S,hd] -> [B,T,H*hd]."""
    b, nh, t, hd = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    rep = nh // n_kv
    if rep > 1:
        k = k[:, :, None].expand(b, n_kv, rep, s, hd).reshape(b, nh, s, hd)
        v = v[:, :, None].expand(b, n_kv, rep, s, hd).reshape(b, nh, s, hd)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    qpos = torch.arange(pos0, pos0 + t)
    kpos = torch.arange(s)
    mask = kpos[None, :] > qpos[:, None]
    if window is not None:
        mask = mask | (qpos[:, None] - kpos[None, :] >= window)
    scores = scores.masked_fill(mask, float("-inf"))
    sdt = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=sdt).to(q.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(b, t, nh * hd)


class KVCache:
    """Per-layer keys/values (post-RoPE) of the main and the side heads."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.k2: list[torch.Tensor | None] = [None] * num_layers
        self.v2: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self.batch: int | None = None
        self.has_side: bool | None = None

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _append(store: list, layer: int, t: torch.Tensor) -> torch.Tensor:
        old = store[layer]
        new = t if old is None else torch.cat([old, t], dim=2)
        store[layer] = new
        return new


# --------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------
def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


class BaseModel:
    """A LLaMA-family causal LM held as a dict of HF-named tensors."""

    def __init__(self, config: BaseConfig, weights: Mapping[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32):
        self.config = config
        self.dtype = dtype
        self.weights = {k: v.detach().to(dtype).requires_grad_(False) for k, v in weights.items()}
        self._check_weights()
        self._inv_freq = config.rope_inv_freq(dtype)
        self._inv_freq_local = config.rope_inv_freq(dtype, local=True) if config.sliding_window else None

    # -- checks ------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        d, hd, f, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
        h, hkv = c.num_attention_heads, c.num_key_value_heads
        out = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
        if not c.tie_word_embeddings or "lm_head.weight" in self.weights:
            out["lm_head.weight"] = (V, d)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (d,)
            out[p + "self_attn.q_proj.weight"] = (h * hd, d)
            out[p + "self_attn.k_proj.weight"] = (hkv * hd, d)
            out[p + "self_attn.v_proj.weight"] = (hkv * hd, d)
            out[p + "self_attn.o_proj.weight"] = (d, h * hd)
            out[p + "post_attention_layernorm.weight"] = (d,)
            out[p + "mlp.gate_proj.weight"] = (f, d)
            out[p + "mlp.up_proj.weight"] = (f, d)
            out[p + "mlp.down_proj.weight"] = (d, f)
            if c.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (hd,)
                out[p + "self_attn.k_norm.weight"] = (hd,)
            if c.sandwich_norms:
                out[p + "pre_feedforward_layernorm.weight"] = (d,)
                out[p + "post_feedforward_layernorm.weight"] = (d,)
            if c.attention_bias:
                out[p + "self_attn.q_proj.bias"] = (h * hd,)
                out[p + "self_attn.k_proj.bias"] = (hkv * hd,)
                out[p + "self_attn.v_proj.bias"] = (hkv * hd,)
                if c.architecture == "llama":
                    out[p + "self_attn.o_proj.bias"] = (d,)
            if c.mlp_bias:
                out[p + "mlp.gate_proj.bias"] = (f,)
                out[p + "mlp.up_proj.bias"] = (f,)
                out[p + "mlp.down_proj.bias"] = (d,)
        return out

    def _check_weights(self) -> None:
        exp = self.expected_shapes()
        missing = [n for n in exp if n not in self.weights]
        if missing:
            raise ReferenceError(f"base checkpoint is missing tensor(s): {', '.join(missing[:8])}")
        for n, shp in exp.items():
            if tuple(self.weights[n].shape) != shp:
                raise ReferenceError(
                    f"base tensor {n!r} has shape {list(self.weights[n].shape)}, expected {list(shp)}"
                )
        if "lm_head.weight" not in self.weights:  # tied
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]

    # -- api ----------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def rope_cos_sin(self, pos0: int, t: int, *, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq_local if local else self._inv_freq
        pos = torch.arange(pos0, pos0 + t, dtype=inv.dtype)
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, tokens, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits [T, V] (or [B, T, V]). ``cache`` is updated in place."""
        logits, _, _, _ = self._run(tokens, cache, None)
        return logits

    __call__ = forward

    # -- the one forward both models use ----------------------------------------
    def _run(self, tokens, cache: KVCache | None, side: "_SideParams | None"):
        tok = torch.as_tensor(tokens, dtype=torch.long)
        squeeze = tok.dim() == 1
        if squeeze:
            tok = tok[None]
        if tok.dim() != 2:
            raise ValueError(f"tokens must be [T] or [B, T], found shape {list(tok.shape)}")
        B, T = tok.shape
        c = self.config
        if int(tok.min()) < 0 or int(tok.max()) >= c.vocab_size:
            raise ValueError(f"token id out of range [0, {c.vocab_size})")
        if cache is not None:
            if cache.batch is not None and cache.batch != B:
                raise ValueError(f"cache holds batch {cache.batch}, tokens have batch {B}")
            if cache.has_side is not None and cache.has_side != (side is not None):
                raise ValueError("cache was filled by a different model (base vs Otter)")
        pos0 = cache.length if cache is not None else 0
        W = self.weights
        hd, eps = c.head_dim, c.rms_norm_eps
        h, hkv = c.num_attention_heads, c.num_key_value_heads
        g = c.norm_weight  # the applied norm weight of a stored one (gemma3: 1 + w)
        ropes = {False: self.rope_cos_sin(pos0, T)}
        if self._inv_freq_local is not None:
            ropes[True] = self.rope_cos_sin(pos0, T, local=True)
        ffn_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"

        x = F.embedding(tok, W["model.embed_tokens.weight"])
        if c.embed_scale is not None:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        s = side.embed(tok) if side is not None else None
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            cos, sin = ropes[c.is_sliding(i)]
            window = c.window(i)
            # ---- attention
            inv_r = _inv_rms(x, eps)
            xn = _norm(x, inv_r, g(W[p + "input_layernorm.weight"]))
            q = _linear(xn, W[p + "self_attn.q_proj.weight"], W.get(p + "self_attn.q_proj.bias"))
            k = _linear(xn, W[p + "self_attn.k_proj.weight"], W.get(p + "self_attn.k_proj.bias"))
            v = _linear(xn, W[p + "self_attn.v_proj.weight"], W.get(p + "self_attn.v_proj.bias"))
            q, k = _heads(q, h, hd), _heads(k, hkv, hd)
            if c.qk_norm:
                q = _head_norm(q, g(W[p + "self_attn.q_norm.weight"]), eps)
                k = _head_norm(k, g(W[p + "self_attn.k_norm.weight"]), eps)
            q = _rope(q, cos, sin)
            k = _rope(k, cos, sin)
            v = _heads(v, hkv, hd)
            if cache is not None:
                k = KVCache._append(cache.k, i, k)
                v = KVCache._append(cache.v, i, v)
            a_main = _attend(q, k, v, pos0, c.attn_scale, window)
            o = _linear(a_main, W[p + "self_attn.o_proj.weight"], W.get(p + "self_attn.o_proj.bias"))
            o2 = side.attn(i, s, xn, inv_r, a_main, cos, sin, cache, pos0, window) if side is not None else None
            if c.sandwich_norms:
                inv_o = _inv_rms(o, eps)  # main part only (docs/OTTER.md §7)
                o = _norm(o, inv_o, g(W[p + "post_attention_layernorm.weight"]))
                if side is not None:
                    o2 = side.post_norm(OtterTensor.ATTN_POST_NORM, i, o2, inv_o)
            x = x + o
            if side is not None:
                s = s + o2
            # ---- feed-forward
            inv_r = _inv_rms(x, eps)
            xn = _norm(x, inv_r, g(W[p + ffn_norm + ".weight"]))
            m_main = c.activation(_linear(xn, W[p + "mlp.gate_proj.weight"], W.get(p + "mlp.gate_proj.bias"))) * \
                _linear(xn, W[p + "mlp.up_proj.weight"], W.get(p + "mlp.up_proj.bias"))
            o = _linear(m_main, W[p + "mlp.down_proj.weight"], W.get(p + "mlp.down_proj.bias"))
            o2 = side.ffn(i, s, xn, inv_r, m_main) if side is not None else None
            if c.sandwich_norms:
                inv_o = _inv_rms(o, eps)
                o = _norm(o, inv_o, g(W[p + "post_feedforward_layernorm.weight"]))
                if side is not None:
                    o2 = side.post_norm(OtterTensor.FFN_POST_NORM, i, o2, inv_o)
            x = x + o
            if side is not None:
                s = s + o2
        inv_r = _inv_rms(x, eps)
        xn = _norm(x, inv_r, g(W["model.norm.weight"]))
        logits = _linear(xn, W["lm_head.weight"])
        if c.final_logit_softcapping:
            cap = c.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        signals = sn = None
        if side is not None:
            signals, sn = side.head(s, xn, inv_r)
        if cache is not None:
            cache.length += T
            cache.batch = B
            cache.has_side = side is not None
        if squeeze:
            logits = logits[0]
            if signals is not None:
                signals, sn = signals[0], sn[0]
            xn = xn[0]
        return logits, signals, xn, sn


# --------------------------------------------------------------------------
# Otter
# --------------------------------------------------------------------------
class _SideParams:
    """The side stream of docs/OTTER.md §3 and §7, called from inside `BaseModel._run`; each block returns the side
    output (``o_side``) that `_run` adds to ``s`` (after the sandwich norm, if the base has one)."""

    def __init__(self, config: OtterConfig, t: Mapping[str, torch.Tensor], base: BaseConfig):
        self.c = config
        self.t = t
        self.b = base
        self.arch = config.base_architecture

    def w(self, kind: T, i: int | None = None, suffix: str = WEIGHT) -> torch.Tensor | None:
        return self.t.get(hf_name(kind, i, suffix, self.arch))

    def g(self, kind: T, i: int | None = None) -> torch.Tensor:
        """An applied side norm weight (stored in the base's convention, docs/OTTER.md §7)."""
        return self.b.norm_weight(self.w(kind, i))

    def embed(self, tok: torch.Tensor) -> torch.Tensor:
        s = F.embedding(tok, self.w(T.TOKEN_EMBD))
        if self.b.embed_scale is not None:  # the base's sqrt(d), not sqrt(d + d2)
            s = s * torch.tensor(self.b.embed_scale, dtype=s.dtype)
        return s

    def attn(self, i, s, xn, inv_r, a_main, cos, sin, cache, pos0, window):
        c, b = self.c, self.b
        hd, eps = c.head_dim, b.rms_norm_eps
        sn = _norm(s, inv_r, self.g(T.ATTN_NORM, i))
        u = torch.cat([xn, sn], dim=-1)
        q, k, v = (_linear(u, self.w(x, i), self.w(x, i, BIAS)) for x in (T.ATTN_Q, T.ATTN_K, T.ATTN_V))
        q = _heads(q, c.otter_num_attention_heads, hd)
        k = _heads(k, c.otter_num_key_value_heads, hd)
        if b.qk_norm:  # the side heads' own weights, each head by its own statistic
            q = _head_norm(q, self.g(T.ATTN_Q_NORM, i), eps)
            k = _head_norm(k, self.g(T.ATTN_K_NORM, i), eps)
        q = _rope(q, cos, sin)
        k = _rope(k, cos, sin)
        v = _heads(v, c.otter_num_key_value_heads, hd)
        if cache is not None:
            k = KVCache._append(cache.k2, i, k)
            v = KVCache._append(cache.v2, i, v)
        a_side = _attend(q, k, v, pos0, b.attn_scale, window)
        return _linear(torch.cat([a_main, a_side], dim=-1), self.w(T.ATTN_OUT, i))

    def post_norm(self, kind: T, i: int, o2: torch.Tensor, inv_o: torch.Tensor) -> torch.Tensor:
        """The sandwich norm of a side block output, with the main block output's statistic."""
        return _norm(o2, inv_o, self.g(kind, i))

    def ffn(self, i, s, xn, inv_r, m_main):
        sn = _norm(s, inv_r, self.g(T.FFN_NORM, i))
        u = torch.cat([xn, sn], dim=-1)
        m_side = self.b.activation(_linear(u, self.w(T.FFN_GATE, i))) * _linear(u, self.w(T.FFN_UP, i))
        return _linear(torch.cat([m_main, m_side], dim=-1), self.w(T.FFN_DOWN, i))

    def head(self, s, xn, inv_r):
        sn = _norm(s, inv_r, self.g(T.OUTPUT_NORM))
        sig = _linear(torch.cat([xn, sn], dim=-1), self.w(T.HEAD), self.w(T.HEAD, suffix=BIAS))
        return sig, sn


@dataclass
class OtterOutput:
    """``logits`` [T, V] / [B, T, V] (bit-identical to the base), ``signals``
    [T, n_out] / [B, T, n_out], the (updated) ``cache``; with
    ``return_hidden=True`` also the final normalised main and side states."""

    logits: torch.Tensor
    signals: torch.Tensor
    cache: KVCache | None = None
    hidden: torch.Tensor | None = None
    side_hidden: torch.Tensor | None = None


class OtterModel:
    """A frozen base model plus Otter side weights (docs/OTTER.md §3)."""

    def __init__(self, base: BaseModel, config: OtterConfig, tensors: Mapping[str, torch.Tensor]):
        config.validate()
        check_against_base(config, base.config.otter_hparams())
        _validate_header(Path("<otter tensors>"), config,
                         {n: tuple(v.shape) for n, v in tensors.items()},
                         {n: "F32" for n in tensors})
        self.base = base
        self.config = config
        self.dtype = base.dtype
        self.tensors: dict[str, torch.Tensor] = {
            n: v.detach().to(base.dtype).clone() for n, v in tensors.items()
        }
        self._side = _SideParams(config, self.tensors, base.config)

    @property
    def signal_names(self) -> list[str]:
        return list(self.config.signal_names)

    @property
    def n_out(self) -> int:
        return self.config.head_output_size

    def parameters(self) -> list[torch.Tensor]:
        """The trainable (side + head) tensors, in layer order."""
        return [self.tensors[n] for n in self.config.tensor_order() if n in self.tensors]

    def new_cache(self) -> KVCache:
        return self.base.new_cache()

    def forward(self, tokens, cache: KVCache | None = None, *, return_hidden: bool = False) -> OtterOutput:
        if cache is None:
            cache = self.new_cache()
        logits, signals, xn, sn = self.base._run(tokens, cache, self._side)
        if return_hidden:
            return OtterOutput(logits, signals, cache, xn, sn)
        return OtterOutput(logits, signals, cache)

    __call__ = forward


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------
def _load_safetensors_dir(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    idx = p / "model.safetensors.index.json"
    if idx.is_file():
        with open(idx, encoding="utf-8") as fh:
            wm = json.load(fh).get("weight_map", {})
        files = sorted(set(wm.values()))
    else:
        files = sorted(x.name for x in p.glob("*.safetensors"))
    if not files:
        raise ReferenceError(f"{p}: no *.safetensors weights found")
    out: dict[str, torch.Tensor] = {}
    for fn in files:
        fp = p / fn
        if not fp.is_file():
            raise ReferenceError(f"{fp}: weight shard listed in the index is missing")
        try:
            part = load_file(str(fp))
        except Exception as e:
            raise ReferenceError(f"{fp}: cannot read safetensors: {e}") from None
        for k, v in part.items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            out[k] = v
    return out


def load_base(hf_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load a LLaMA-family HF checkpoint directory."""
    p = Path(hf_dir)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ReferenceError(f"{cfg_path}: base config.json not found")
    with open(cfg_path, encoding="utf-8") as fh:
        d = json.load(fh)
    if "text_config" in d and "hidden_size" not in d:
        d = {**d, **d["text_config"]}
    cfg = BaseConfig.from_hf_dict(d, source=str(cfg_path))
    weights = _load_safetensors_dir(p)
    return BaseModel(cfg, weights, dtype)


def load_otter(hf_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
               dtype: torch.dtype = torch.float32) -> OtterModel:
    """Load a base checkpoint and an Otter adapter into an :class:`OtterModel`."""
    base = load_base(hf_dir, dtype)
    config, tensors = load_adapter(adapter_dir, dtype)
    return OtterModel(base, config, tensors)


# --------------------------------------------------------------------------
# inserting fresh Otter parameters
# --------------------------------------------------------------------------
def insert_otter(
    base: BaseModel,
    *,
    d2: int,
    h2: int,
    h2_kv: int,
    f2: int,
    n_out: int | None = None,
    head_kind: str = HeadKind.REWARD.value,
    signal_names: Sequence[str] | None = None,
    init: str = "copy",
    seed: int = 0,
    base_model: str = "",
    std: float = 0.02,
    head_bias: bool = True,
) -> tuple[OtterConfig, dict[str, torch.Tensor]]:
    """Create Otter parameters for ``base`` (which is left untouched).

    ``init="random"``: every matrix and the side embedding ~ N(0, std), norm
    weights the identity (1; 0 for gemma3, whose norms apply ``1 + w``),
    biases 0 (seeded).

    ``init="copy"`` (the paper's copy initialisation; needs d2 <= d, h2 <= h,
    h2_kv <= h_kv, f2 <= f). The side stream starts as a copy of the first
    ``d2`` dimensions of the main stream, and the side heads/FFN units start
    as copies of the first base heads/units:

    - ``E2 = E[:, :d2]``; every side norm weight ``g2 = g[:d2]`` (gemma3's four
      per-layer norms each from its own base norm, in the stored convention);
      the side heads' Q/K norms (qwen3, gemma3) are copies of the base's;
    - q/k/v (rows of the first ``h2`` / ``h2_kv`` base heads) and gate/up
      (first ``f2`` rows): with ``R`` those base rows, the main-input columns
      are ``R`` with its first ``d2`` columns zeroed and the side-input
      columns are ``R[:, :d2]``. Since ``sn == xn[:d2]`` at init, the side
      maps compute exactly the base rows ``R @ xn`` (the first ``d2`` inputs
      are read from the side stream instead of the main one), so the side
      heads start as copies of base heads ``0..h2-1`` (exactly so when
      ``h2 / h2_kv == h / h_kv``; otherwise side query heads share the copied
      KV heads in their own grouping). Base q/k/v biases (qwen2) are copied
      for those rows;
    - ``Wo2 = [Wo[:d2, :], 0]`` and ``Wd2 = [Wd[:d2, :], 0]``: the side
      stream receives exactly the update of the main stream's first ``d2``
      dimensions, so ``s == x[:, :d2]`` in every layer at init; the
      side-head columns start at zero (like LoRA's B) and learn;
    - head: ``N(0, std)`` over all ``d + d2`` columns (seeded) — a zero head
      would block every gradient into the side weights at step 0; head bias
      zero.
    """
    c = base.config
    d, hd, f, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    h, hkv = c.num_attention_heads, c.num_key_value_heads
    if head_kind == HeadKind.TOKEN_REWARD:
        n_out = V if n_out is None else n_out
        names: list[str] = []
    else:
        n_out = 1 if n_out is None else n_out
        if signal_names is None:
            names = ["reward"] if n_out == 1 else [f"signal_{i}" for i in range(n_out)]
        else:
            names = list(signal_names)
    config = OtterConfig(
        base_model=base_model,
        base_architecture=c.architecture,
        hidden_size=d,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=h,
        num_key_value_heads=hkv,
        head_dim=hd,
        intermediate_size=f,
        vocab_size=V,
        otter_hidden_size=d2,
        otter_num_attention_heads=h2,
        otter_num_key_value_heads=h2_kv,
        otter_intermediate_size=f2,
        head_output_size=n_out,
        head_kind=head_kind,
        signal_names=names,
    )
    config.validate()
    gen = torch.Generator().manual_seed(seed)
    dt = base.dtype

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    out: dict[str, torch.Tensor] = {}
    shapes = config.required_tensor_shapes()
    if init == "random":
        for n, shp in shapes.items():
            if parse_hf_name(n, c.architecture)[0] in NORM_TENSORS:
                out[n] = torch.full(shp, 1.0 - c.norm_offset, dtype=dt)
            else:
                out[n] = rnd(*shp)
    elif init == "copy":
        if d2 > d or h2 > h or h2_kv > hkv or f2 > f:
            raise ValueError(
                f"copy init needs d2 <= d, h2 <= h, h2_kv <= h_kv, f2 <= f; "
                f"got d2={d2} (d={d}), h2={h2} (h={h}), h2_kv={h2_kv} (h_kv={hkv}), f2={f2} (f={f})"
            )
        W = base.weights

        def side_in(rows: torch.Tensor) -> torch.Tensor:
            main = rows.clone()
            main[:, :d2] = 0
            return torch.cat([main, rows[:, :d2].clone()], dim=1)

        arch = c.architecture

        def name(kind, i=None, suffix=WEIGHT):
            return hf_name(kind, i, suffix, arch)

        def base_w(kind, i=None):
            # the base's own HF name of the tensor the side one mirrors: "otter." -> "model." (docs/OTTER.md §5, §7)
            return W["model." + name(kind, i)[len("otter."):]]

        out[name(T.TOKEN_EMBD)] = base_w(T.TOKEN_EMBD)[:, :d2].clone()
        kinds = ARCH_TENSORS[arch]
        for i in range(c.num_hidden_layers):
            for kind in kinds:
                if kind in NORM_TENSORS and kind != T.OUTPUT_NORM:
                    w = base_w(kind, i)
                    out[name(kind, i)] = (w if kind in (T.ATTN_Q_NORM, T.ATTN_K_NORM) else w[:d2]).clone()
            for kind, rows in ((T.ATTN_Q, h2 * hd), (T.ATTN_K, h2_kv * hd), (T.ATTN_V, h2_kv * hd)):
                out[name(kind, i)] = side_in(base_w(kind, i)[:rows])
                b = W.get("model." + name(kind, i, BIAS)[len("otter."):])
                if b is not None:
                    out[name(kind, i, BIAS)] = b[:rows].clone()
            out[name(T.ATTN_OUT, i)] = torch.cat(
                [base_w(T.ATTN_OUT, i)[:d2].clone(), torch.zeros(d2, h2 * hd, dtype=dt)], dim=1)
            out[name(T.FFN_GATE, i)] = side_in(base_w(T.FFN_GATE, i)[:f2])
            out[name(T.FFN_UP, i)] = side_in(base_w(T.FFN_UP, i)[:f2])
            out[name(T.FFN_DOWN, i)] = torch.cat(
                [base_w(T.FFN_DOWN, i)[:d2].clone(), torch.zeros(d2, f2, dtype=dt)], dim=1)
        out[name(T.OUTPUT_NORM)] = base_w(T.OUTPUT_NORM)[:d2].clone()
        out[hf_name(T.HEAD)] = rnd(n_out, d + d2)
    else:
        raise ValueError(f"init must be 'copy' or 'random', found {init!r}")
    if head_bias:
        out[hf_name(T.HEAD, suffix=BIAS)] = torch.zeros(n_out, dtype=dt)
    for v in out.values():
        v.requires_grad_(False)
    return config, out
