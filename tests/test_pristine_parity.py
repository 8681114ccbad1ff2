"""Non-Otter GGUFs run exactly as before: the patched runtime gives logits
bit-identical to a pristine build of the same pinned llama.cpp source."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import pristine_lib_dir
from otter_gguf.io.llama_quantize import quantize

pytestmark = pytest.mark.slow

_LOGITS = r"""
import sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_batch=64, n_threads=1, n_threads_batch=1,
                      logits_all=True, verbose=False)
toks = [1] + list(range(20, 60))
llm.eval(toks)
np.save(sys.argv[2], np.asarray(llm.scores[: len(toks)], dtype=np.float32))
llm.reset()
print(hasattr(llama_cpp.llama_cpp._lib, "llama_otter_series"))
for t in toks[:8]:                      # token by token too
    llm.eval([t])
np.save(sys.argv[3], np.asarray(llm.scores[:8], dtype=np.float32))
"""


@pytest.mark.parametrize("outtype", ["f32", "q4_k_m"])
def test_plain_gguf_logits_match_pristine_llama_cpp(hf_base_gguf, tiny_llama_dir, tmp_path,
                                                   outtype):
    base = hf_base_gguf(tiny_llama_dir, "f32")
    if outtype != "f32":
        base = quantize(base, tmp_path / f"base-{outtype}.gguf", outtype)
    pristine = pristine_lib_dir()
    out = {}
    for name, env_lib in (("patched", None), ("pristine", str(pristine))):
        env = dict(os.environ)  # patched: the runtime under test (LLAMA_CPP_LIB_PATH in `make test-portable`)
        if env_lib:
            env["LLAMA_CPP_LIB_PATH"] = env_lib
        a, b = tmp_path / f"{name}-batch.npy", tmp_path / f"{name}-step.npy"
        res = subprocess.run([sys.executable, "-c", _LOGITS, str(base), str(a), str(b)],
                             env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.split()[-1] == ("False" if env_lib else "True"), res.stdout
        out[name] = (np.load(a), np.load(b))
    for got, want in zip(out["patched"], out["pristine"]):
        assert got.shape == want.shape and np.isfinite(got).all()
        assert np.array_equal(got, want), f"max |diff| {np.max(np.abs(got - want))}"
