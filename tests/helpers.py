"""Helpers shared by the tests: plain functions and classes, no fixtures.

Import them as ``from helpers import ...`` (tests/ is on sys.path); the
shared fixtures live in tests/conftest.py.

``Models`` converts the conftest checkpoints to GGUF once per process (the
``gguf_models`` fixture): ``base`` is the tiny llama as a plain f32 GGUF with
a chat template added (so ``create_chat_completion`` uses the model's own
template), ``otter(kind)`` is that base plus the ``reward1`` / ``reward3`` /
``token_reward`` adapter.

``require_otter_runtime()`` is the one runtime check (the ``otter_runtime``
fixture): a runtime test FAILS, never skips, when llama_cpp is missing or the
library it loaded is not the patched runtime of patches/ (run ``make runtime``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pytest

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_built: Dict[str, Path] = {}

# small, fast, deterministic settings shared by the tests
LLAMA_KW = dict(n_ctx=256, n_batch=64, n_threads=1, n_threads_batch=1, verbose=False)


class Models:
    def __init__(self, request, root: Path):
        self._request = request
        self._root = root

    @property
    def base(self) -> Path:
        if "base" not in _built:
            from otter_gguf_converter import convert_hf_base

            src = Path(self._request.getfixturevalue("tiny_llama_dir"))
            hf = self._root / "tiny-llama-chat"
            if hf.exists():
                shutil.rmtree(hf)
            shutil.copytree(src, hf)
            cfg_path = hf / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg["chat_template"] = CHAT_TEMPLATE
            cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            out = self._root / "base.gguf"
            if out.exists():
                out.unlink()
            _built["base"] = convert_hf_base(hf, out, "f32")
        return _built["base"]

    @property
    def lora(self) -> Path:
        """A tiny PEFT LoRA (v_proj, down_proj) for the base, converted with
        llama.cpp's convert_lora_to_gguf.py."""
        if "lora" not in _built:
            import subprocess
            import sys

            import torch
            from safetensors.torch import save_file

            from otter_gguf_converter.llamacpp import pinned_llama_cpp_source

            hf = Path(self._request.getfixturevalue("tiny_llama_dir"))
            d = self._root / "lora"
            d.mkdir(exist_ok=True)
            g = torch.Generator().manual_seed(0)
            t = {}
            for layer in range(4):
                for mod, (o, i) in {"self_attn.v_proj": (128, 256), "mlp.down_proj": (256, 768)}.items():
                    p = f"base_model.model.model.layers.{layer}.{mod}"
                    t[p + ".lora_A.weight"] = torch.randn(4, i, generator=g) * 0.2
                    t[p + ".lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.2
            save_file(t, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(json.dumps(
                {"lora_alpha": 8, "r": 4, "peft_type": "LORA", "base_model_name_or_path": "tiny-llama",
                 "target_modules": ["v_proj", "down_proj"]}), encoding="utf-8")
            out = self._root / "lora.gguf"
            script = pinned_llama_cpp_source() / "convert_lora_to_gguf.py"
            res = subprocess.run([sys.executable, str(script), "--base", str(hf), "--outfile", str(out), str(d)],
                                 capture_output=True, text=True)
            assert res.returncode == 0 and out.is_file(), res.stderr[-2000:]
            _built["lora"] = out
        return _built["lora"]

    def otter(self, kind: str) -> Path:
        fixture = {"reward1": "adapter_reward1_dir", "reward3": "adapter_reward3_dir",
                   "token_reward": "adapter_token_reward_dir"}[kind]
        if kind not in _built:
            from otter_gguf_converter import convert

            adapter = self._request.getfixturevalue(fixture)
            out = self._root / f"otter-{kind}.gguf"
            _built[kind] = convert(adapter, self.base, out, outtype="f32", force=True, progress=False)
        return _built[kind]


def otter_runtime_problem(lib, want: str, dev_ok: bool = False) -> Optional[str]:
    """Why ``lib`` (the loaded libllama, or any object with its attributes) is
    not the patched runtime of the series ``want`` ("otter-gguf/<hash>"), or None.

    ``dev_ok``: also accept a dev build's marker ("otter-gguf/dev", a build made
    by hand from ``make llama-src``; used through LLAMA_CPP_LIB_PATH).
    """
    from otter_gguf.runtime import capi
    from otter_gguf.runtime.build import SERIES_PREFIX

    name = getattr(lib, "_name", None) or repr(lib)
    missing = [n for n in capi.NAMES if not hasattr(lib, n)]
    if missing:
        return f"the loaded llama.cpp library {name} lacks the Otter API (missing {', '.join(missing)})"
    fn = lib.llama_otter_series
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    got = (fn() or b"").decode(errors="replace")
    if got == want or (dev_ok and got == SERIES_PREFIX + "dev"):
        return None
    return f"the loaded llama.cpp library {name} carries the patch series {got!r}, patches/ is {want!r}"


def require_otter_runtime():
    """The runtime check of every runtime test: ``llama_cpp.llama_cpp`` of the
    patched runtime, or ``pytest.fail`` saying to run ``make runtime``."""
    from otter_gguf.runtime.build import SERIES_PREFIX, series_id

    fix = "run `make runtime` (or point LLAMA_CPP_LIB_PATH at a patched build)"
    try:
        from llama_cpp import llama_cpp as ll
    except ImportError as e:
        pytest.fail(f"llama-cpp-python is not importable ({e}): {fix}", pytrace=False)
    problem = otter_runtime_problem(ll._lib, SERIES_PREFIX + series_id(),
                                    dev_ok=bool(os.environ.get("LLAMA_CPP_LIB_PATH")))
    if problem:
        pytest.fail(f"{problem}: {fix}", pytrace=False)
    return ll


# ---------------------------------------------------------------------------
# a cheap deterministic signal source (no runtime support needed)
# ---------------------------------------------------------------------------
def fake_signals(history: Sequence[int]) -> np.ndarray:
    """Two signals that depend on the whole history (order included)."""
    h = np.asarray(history, dtype=np.float64)
    w = np.arange(1, len(h) + 1, dtype=np.float64)
    a = np.sin(0.013 * float(np.dot(h, w)))
    b = np.cos(0.37 * float(h[-1]) + 0.11 * len(h))
    return np.array([a, b], dtype=np.float32)


def fake_source_factory(fn: Callable[[Sequence[int]], np.ndarray] = fake_signals,
                        names=("alpha", "beta")):
    from otter_gguf.runtime.llama import SignalSource

    class FakeSignalSource(SignalSource):
        has_otter = True
        head_kind = "reward"

        def __init__(self):
            self.n_out = len(names)
            self.signal_names = list(names)
            self.rows_read = 0

        def read_row(self, i, history):
            self.rows_read += 1
            return fn(list(history()))

    return lambda llm: FakeSignalSource()
