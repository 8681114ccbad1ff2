"""PyTorch reference implementation of the base model and of Otter (spec §3).

This is the accuracy oracle the converter and the patched llama.cpp runtime
are tested against. It is written in plain torch (no transformers) and reads
HF checkpoints (``config.json`` + ``*.safetensors``, sharded or not) of the
LLaMA family: ``llama`` and ``qwen2``.

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
from otter_gguf.format.constants import BIAS, NORM_TENSORS, HeadKind, hf_name, parse_hf_name
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


_ARCH_BY_HF = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_BY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------
@dataclass
class BaseConfig:
    """The hyper-parameters of a LLaMA-family base model."""

    architecture: str  # "llama" | "qwen2"
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
        head_dim = int(head_dim) if head_dim else hidden // n_head
        if arch == "qwen2" and d.get("use_sliding_window"):
            raise ReferenceError(f"{source}: qwen2 use_sliding_window=true is not supported")
        # transformers >= 5 writes rope settings as "rope_parameters"
        rope_params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope_params:
            rt = rope_params.get("rope_type", rope_params.get("type", "default"))
            scaling = None if rt in (None, "default") else dict(rope_params)
        theta = d.get("rope_theta")
        if theta is None:
            theta = rope_params.get("rope_theta", 10000.0)
        if scaling is not None:
            rt = scaling.get("rope_type", scaling.get("type"))
            if rt in (None, "default"):
                scaling = None
            elif rt not in ("llama3", "linear"):
                raise ReferenceError(
                    f"{source}: rope_scaling type {rt!r} is not supported (supported: llama3, linear)"
                )
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
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            raw=dict(d),
        )

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

    def rope_inv_freq(self, dtype: torch.dtype) -> torch.Tensor:
        """Inverse RoPE frequencies [hd/2], HF semantics (default/llama3/linear)."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        hd = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).to(cdt) / hd))
        sc = self.rope_scaling
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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int) -> torch.Tensor:
    """Causal GQA attention. q [B,H,T,hd], k/v [B,Hkv,S,hd] -> [B,T,H*hd]."""
    b, nh, t, hd = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    rep = nh // n_kv
    if rep > 1:
        k = k[:, :, None].expand(b, n_kv, rep, s, hd).reshape(b, nh, s, hd)
        v = v[:, :, None].expand(b, n_kv, rep, s, hd).reshape(b, nh, s, hd)
    scores = torch.matmul(q, k.transpose(2, 3)) * (hd ** -0.5)
    qpos = torch.arange(pos0, pos0 + t)
    kpos = torch.arange(s)
    mask = kpos[None, :] > qpos[:, None]
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

    def rope_cos_sin(self, pos0: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq
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
        cos, sin = self.rope_cos_sin(pos0, T)

        x = F.embedding(tok, W["model.embed_tokens.weight"])
        s = side.embed(tok) if side is not None else None
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            # ---- attention
            inv_r = _inv_rms(x, eps)
            xn = _norm(x, inv_r, W[p + "input_layernorm.weight"])
            q = _linear(xn, W[p + "self_attn.q_proj.weight"], W.get(p + "self_attn.q_proj.bias"))
            k = _linear(xn, W[p + "self_attn.k_proj.weight"], W.get(p + "self_attn.k_proj.bias"))
            v = _linear(xn, W[p + "self_attn.v_proj.weight"], W.get(p + "self_attn.v_proj.bias"))
            q = _rope(_heads(q, h, hd), cos, sin)
            k = _rope(_heads(k, hkv, hd), cos, sin)
            v = _heads(v, hkv, hd)
            if cache is not None:
                k = KVCache._append(cache.k, i, k)
                v = KVCache._append(cache.v, i, v)
            a_main = _attend(q, k, v, pos0)
            if side is not None:
                s = side.attn(i, s, xn, inv_r, a_main, cos, sin, cache, pos0)
            x = x + _linear(a_main, W[p + "self_attn.o_proj.weight"], W.get(p + "self_attn.o_proj.bias"))
            # ---- feed-forward
            inv_r = _inv_rms(x, eps)
            xn = _norm(x, inv_r, W[p + "post_attention_layernorm.weight"])
            m_main = F.silu(_linear(xn, W[p + "mlp.gate_proj.weight"], W.get(p + "mlp.gate_proj.bias"))) * \
                _linear(xn, W[p + "mlp.up_proj.weight"], W.get(p + "mlp.up_proj.bias"))
            if side is not None:
                s = side.ffn(i, s, xn, inv_r, m_main)
            x = x + _linear(m_main, W[p + "mlp.down_proj.weight"], W.get(p + "mlp.down_proj.bias"))
        inv_r = _inv_rms(x, eps)
        xn = _norm(x, inv_r, W["model.norm.weight"])
        logits = _linear(xn, W["lm_head.weight"])
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
    """The side stream of spec §3, called from inside `BaseModel._run`."""

    def __init__(self, config: OtterConfig, t: Mapping[str, torch.Tensor]):
        self.c = config
        self.t = t

    def embed(self, tok: torch.Tensor) -> torch.Tensor:
        return F.embedding(tok, self.t[hf_name(T.TOKEN_EMBD)])

    def attn(self, i, s, xn, inv_r, a_main, cos, sin, cache, pos0):
        c, t = self.c, self.t
        hd = c.head_dim
        sn = _norm(s, inv_r, t[hf_name(T.ATTN_NORM, i)])
        u = torch.cat([xn, sn], dim=-1)
        q, k, v = (_linear(u, t[hf_name(x, i)], t.get(hf_name(x, i, BIAS))) for x in (T.ATTN_Q, T.ATTN_K, T.ATTN_V))
        q = _rope(_heads(q, c.otter_num_attention_heads, hd), cos, sin)
        k = _rope(_heads(k, c.otter_num_key_value_heads, hd), cos, sin)
        v = _heads(v, c.otter_num_key_value_heads, hd)
        if cache is not None:
            k = KVCache._append(cache.k2, i, k)
            v = KVCache._append(cache.v2, i, v)
        a_side = _attend(q, k, v, pos0)
        return s + _linear(torch.cat([a_main, a_side], dim=-1), t[hf_name(T.ATTN_OUT, i)])

    def ffn(self, i, s, xn, inv_r, m_main):
        t = self.t
        sn = _norm(s, inv_r, t[hf_name(T.FFN_NORM, i)])
        u = torch.cat([xn, sn], dim=-1)
        m_side = F.silu(_linear(u, t[hf_name(T.FFN_GATE, i)])) * _linear(u, t[hf_name(T.FFN_UP, i)])
        return s + _linear(torch.cat([m_main, m_side], dim=-1), t[hf_name(T.FFN_DOWN, i)])

    def head(self, s, xn, inv_r):
        t = self.t
        sn = _norm(s, inv_r, t[hf_name(T.OUTPUT_NORM)])
        sig = _linear(torch.cat([xn, sn], dim=-1), t[hf_name(T.HEAD)], t.get(hf_name(T.HEAD, suffix=BIAS)))
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
    """A frozen base model plus Otter side weights (spec §3)."""

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
        self._side = _SideParams(config, self.tensors)

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
    weights 1, biases 0 (seeded).

    ``init="copy"`` (the paper's copy initialisation; needs d2 <= d, h2 <= h,
    h2_kv <= h_kv, f2 <= f). The side stream starts as a copy of the first
    ``d2`` dimensions of the main stream, and the side heads/FFN units start
    as copies of the first base heads/units:

    - ``E2 = E[:, :d2]``; every side norm weight ``g2 = g[:d2]``;
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
            if parse_hf_name(n)[0] in NORM_TENSORS:
                out[n] = torch.ones(shp, dtype=dt)
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

        out[hf_name(T.TOKEN_EMBD)] = W["model.embed_tokens.weight"][:, :d2].clone()
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            out[hf_name(T.ATTN_NORM, i)] = W[p + "input_layernorm.weight"][:d2].clone()
            for kind, x, rows in ((T.ATTN_Q, "q", h2 * hd), (T.ATTN_K, "k", h2_kv * hd), (T.ATTN_V, "v", h2_kv * hd)):
                out[hf_name(kind, i)] = side_in(W[p + f"self_attn.{x}_proj.weight"][:rows])
                b = W.get(p + f"self_attn.{x}_proj.bias")
                if b is not None:
                    out[hf_name(kind, i, BIAS)] = b[:rows].clone()
            out[hf_name(T.ATTN_OUT, i)] = torch.cat(
                [W[p + "self_attn.o_proj.weight"][:d2].clone(), torch.zeros(d2, h2 * hd, dtype=dt)], dim=1)
            out[hf_name(T.FFN_NORM, i)] = W[p + "post_attention_layernorm.weight"][:d2].clone()
            out[hf_name(T.FFN_GATE, i)] = side_in(W[p + "mlp.gate_proj.weight"][:f2])
            out[hf_name(T.FFN_UP, i)] = side_in(W[p + "mlp.up_proj.weight"][:f2])
            out[hf_name(T.FFN_DOWN, i)] = torch.cat(
                [W[p + "mlp.down_proj.weight"][:d2].clone(), torch.zeros(d2, f2, dtype=dt)], dim=1)
        out[hf_name(T.OUTPUT_NORM)] = W["model.norm.weight"][:d2].clone()
        out[hf_name(T.HEAD)] = rnd(n_out, d + d2)
    else:
        raise ValueError(f"init must be 'copy' or 'random', found {init!r}")
    if head_bias:
        out[hf_name(T.HEAD, suffix=BIAS)] = torch.zeros(n_out, dtype=dt)
    for v in out.values():
        v.requires_grad_(False)
    return config, out
