"""The GPU tier: every layer offloaded to a GPU backend (`make test-vulkan` on Mesa's software driver llvmpipe;
`make test-gpu BACKEND=cuda` / `BACKEND=metal` on a machine with that GPU: the same tests, one code path).

Runs only with OTTER_TEST_GPU=<backend> (gpu, cuda, metal) and that build's libraries (LLAMA_CPP_LIB_PATH):
the make targets build them (`build-runtime --backend cpu,<backend>`, cached like the CPU build); on llvmpipe
with llama.cpp's CI settings (GGML_VK_VISIBLE_DEVICES=0 GGML_VK_DISABLE_F16=1 GGML_VK_DISABLE_COOPMAT=1).

A backend's error against the reference is a property of its kernels, not assumed: each test measures the base
logits' own GPU-vs-reference error on the same tokens and holds the signals to GPU_SIGNAL_FACTOR times it
(the error itself to GPU_BASE_MAX, so a broken base cannot widen the bound); the base logits of an Otter model
are bit-identical to the base GGUF's under the same offload, and a sidecar head equals the one-file head.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import LLAMA_KW, cached_otter, rel_err

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

#: OTTER_TEST_GPU -> the ggml registry of the backend
REGISTRY = {"vulkan": "Vulkan", "cuda": "CUDA", "metal": "MTL"}
BACKEND = os.environ.get("OTTER_TEST_GPU", "")

#: the base logits' GPU-vs-reference error may not pass this (relative to max |logit|; tiny f32 llama on
#: llvmpipe: measured 8.2e-4)
GPU_BASE_MAX = 1e-2
#: the same for SmolLM2 Q4_1 against the CPU build (llvmpipe: measured 0.071; its rewards 0.132, 1.9 x)
GPU_REAL_BASE_MAX = 0.15
#: signals vs the reference: at most this times the base logits' own error, or SIGNAL_FLOOR
GPU_SIGNAL_FACTOR = 4.0
SIGNAL_FLOOR = 1e-4
TOKS = [1] + [int(t) for t in np.random.RandomState(1).randint(3, 512, size=39)]


@pytest.fixture(scope="module")
def gpu(otter_runtime):
    from otter_gguf.runtime import backends

    assert BACKEND in REGISTRY, f"OTTER_TEST_GPU={BACKEND!r}: expected one of {', '.join(REGISTRY)}"
    devs = [d for d in backends.devices() if d.backend.lower().startswith(REGISTRY[BACKEND].lower())]
    assert devs, (f"the runtime has no {REGISTRY[BACKEND]} device (backends {backends.backend_names()}): "
                  f"run `make test-gpu BACKEND={BACKEND}` (it builds --backend cpu,{BACKEND} and points "
                  "LLAMA_CPP_LIB_PATH at it)")
    print(f"{BACKEND} devices: {devs}")
    return devs


def test_the_device(gpu):
    if BACKEND == "vulkan" and os.environ.get("GGML_VK_VISIBLE_DEVICES") == "0":  # make test-vulkan: llvmpipe
        assert len(gpu) == 1 and "llvmpipe" in gpu[0].description.lower(), gpu
    assert all(d.type in ("gpu", "igpu") for d in gpu), gpu


def _decode(path, toks, **offload):
    """(signals [T, n_out] or None, logits [T, V]) of one decode of toks, every row, f32 KV cache."""
    from otter_gguf.runtime.session import Model

    m = Model(path, **offload)
    try:
        c = m.context(n_ctx=128, n_batch=64, kv_f32=True, n_threads=2)
        try:
            c.decode(toks)
            lg = np.stack([c.logits_ith(i) for i in range(len(toks))])
            sg = np.stack([c.signals_ith(i) for i in range(len(toks))]) if m.has_otter else None
            return sg, lg
        finally:
            c.close()
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["reward3", "token_reward"])
def test_oracle_and_bit_exact_base_every_layer_offloaded(gpu, gguf_models, tiny_llama_dir, request, kind):
    adapter = request.getfixturevalue({"reward3": "adapter_reward3_dir", "token_reward": "adapter_token_reward_dir"}[kind])
    otter, base = gguf_models.otter(kind), gguf_models.base
    sig, logits = _decode(otter, TOKS, n_gpu_layers=-1)
    _, base_logits = _decode(base, TOKS, n_gpu_layers=-1)
    assert np.array_equal(logits, base_logits), f"base logits of the Otter model differ from the base GGUF's on {BACKEND}"
    with torch.no_grad():
        o = cached_otter(tiny_llama_dir, adapter)(torch.tensor(TOKS))
    err_b, err_s = rel_err(logits, o.logits.numpy()), rel_err(sig, o.signals.numpy())
    print(f"{BACKEND} {kind}: base logits vs reference {err_b:.3g}, signals {err_s:.3g}")
    assert err_b <= GPU_BASE_MAX, f"{BACKEND} base logits vs reference: {err_b:.3g}"
    assert err_s <= max(GPU_SIGNAL_FACTOR * err_b, SIGNAL_FLOOR), \
        f"{BACKEND} signals vs reference {err_s:.3g} > {GPU_SIGNAL_FACTOR} x the base logits' {err_b:.3g}"


def test_token_by_token_every_layer_offloaded(gpu, gguf_models, tiny_llama_dir, adapter_reward3_dir):
    """One token per decode: every step reads the side K/V the earlier steps left on the device."""
    from otter_gguf.runtime.session import Model

    m = Model(gguf_models.otter("reward3"), n_gpu_layers=-1)
    try:
        c = m.context(n_ctx=128, n_batch=64, kv_f32=True, n_threads=2)
        try:
            rows, logits = [], []
            for i, t in enumerate(TOKS[:24]):
                c.decode([t], pos0=i)
                rows.append(c.signals_ith(-1))
                logits.append(c.logits_ith(-1))
        finally:
            c.close()
    finally:
        m.close()
    with torch.no_grad():
        o = cached_otter(tiny_llama_dir, adapter_reward3_dir)(torch.tensor(TOKS[:24]))
    err_b, err_s = rel_err(np.stack(logits), o.logits.numpy()), rel_err(np.stack(rows), o.signals.numpy())
    print(f"{BACKEND} token by token: base logits vs reference {err_b:.3g}, signals {err_s:.3g}")
    assert err_b <= GPU_BASE_MAX
    assert err_s <= max(GPU_SIGNAL_FACTOR * err_b, SIGNAL_FLOOR), (err_s, err_b)


@pytest.mark.parametrize("base_outtype", ["f32", "q8_0", "q4_k_m"])
def test_main_logits_bit_identical_every_layer_offloaded(gpu, tmp_path, tiny_llama_dir, adapter_reward3_dir,
                                                        base_outtype):
    """The base logits of the Otter model equal the base GGUF's on the GPU, bit for bit, at each base type,
    decoded in batches of 64 and token by token (the runtime tests' bit-exact case)."""
    from otter_gguf.runtime.session import Model
    from otter_gguf_converter import convert, convert_hf_base

    base = convert_hf_base(tiny_llama_dir, tmp_path / "base.gguf", base_outtype)
    otter = convert(adapter_reward3_dir, base, tmp_path / "otter.gguf", outtype="f32", progress=False)
    toks = [1] + [int(t) for t in np.random.RandomState(12).randint(3, 512, size=69)]
    res = {}
    for name, path in (("base", base), ("otter", otter)):
        m = Model(path, n_gpu_layers=-1)
        try:
            for batch in (64, 1):
                c = m.context(n_ctx=128, n_batch=64, n_threads=2)
                try:
                    res[name, batch] = c.batched_logits(toks, batch)
                finally:
                    c.close()
        finally:
            m.close()
    for batch in (64, 1):
        assert np.array_equal(res["base", batch], res["otter", batch]), f"batch {batch}: base logits differ"


def test_every_side_stream_op_runs_on_the_device(gpu, gguf_models):
    """No node of the graph (side stream or base) is one the GPU device lacks: nothing falls back to the CPU."""
    from llama_cpp import llama_cpp as L

    from otter_gguf.runtime.backends import unsupported_ops
    from otter_gguf.runtime.session import Model
    from otter_gguf.tools.bench.worker import _GGMLTensor

    for kind in ("reward3", "token_reward"):
        nodes: dict = {}

        def cb(t, ask, ud):
            if ask:
                nodes.setdefault(t, _GGMLTensor.from_address(t).name.decode("utf-8", "replace"))
            return False

        cbf = L.ggml_backend_sched_eval_callback(cb)
        m = Model(gguf_models.otter(kind), n_gpu_layers=-1)
        try:
            c = m.context(n_ctx=64, n_batch=64, n_threads=2, cb_eval=cbf)
            try:
                for toks, pos in (([1, 20, 30, 40], 0), ([50], 4)):
                    c.decode(toks, pos0=pos)
                    assert c.signals_ith(-1) is not None
                side = [t for t, name in nodes.items() if "otter" in name]
                assert len(side) > 20, sorted(set(nodes.values()))[:20]
                bad = unsupported_ops(gpu[0].name, list(nodes))
                assert not bad, [nodes[t] for t in bad]
            finally:
                c.close()
        finally:
            m.close()


def test_sidecar_and_two_heads_every_layer_offloaded(gpu, gguf_models):
    from otter_gguf import OtterLlama

    base = gguf_models.base
    tr, h1 = gguf_models.sidecars
    kw = {**LLAMA_KW, "n_gpu_layers": -1, "logits_all": True}

    def run(path, heads=None, n_seq_max=None):
        llm = OtterLlama(str(path), otter_heads=heads, n_seq_max=n_seq_max, **kw)
        try:
            llm.eval(TOKS)
            return np.array(llm.signals[: len(TOKS)]), np.array(llm.scores[: len(TOKS)])
        finally:
            llm.close()

    one_file, one_logits = run(gguf_models.otter("token_reward"))
    side, side_logits = run(base, [tr])
    both, both_logits = run(base, {"tr": tr, "harmless": h1}, n_seq_max=2)
    alone_h1, _ = run(base, [h1])
    assert np.array_equal(side, one_file) and np.array_equal(side_logits, one_logits)
    assert np.array_equal(both_logits, one_logits)
    assert np.array_equal(both[:, :512], side) and np.array_equal(both[:, 512:], alone_h1)


def test_real_smollm2_with_its_head_every_layer_offloaded(gpu, tmp_path):
    """SmolLM2-135M with the demo head: base logits bit-identical to the base GGUF on the GPU; the rewards
    against the CPU run within GPU_SIGNAL_FACTOR times the base logits' own GPU-vs-CPU error."""
    from otter_gguf.demo import smollm2 as demo
    from otter_gguf_converter import convert

    base = demo.model_path(quiet=True)
    otter = convert(demo.ADAPTER_DIR, base, tmp_path / "smol.gguf", outtype="q8_0", progress=False)
    toks = [1] + [int(t) for t in np.random.RandomState(3).randint(100, 40000, size=23)]
    sig_vk, lg_vk = _decode(otter, toks, n_gpu_layers=-1)
    _, base_vk = _decode(base, toks, n_gpu_layers=-1)
    sig_cpu, lg_cpu = _decode(otter, toks)
    assert np.array_equal(lg_vk, base_vk)
    err_b, err_s = rel_err(lg_vk, lg_cpu), rel_err(sig_vk, sig_cpu)
    print(f"{BACKEND} SmolLM2: base logits vs CPU {err_b:.3g}, rewards {err_s:.3g}")
    assert err_b <= GPU_REAL_BASE_MAX
    assert err_s <= max(GPU_SIGNAL_FACTOR * err_b, SIGNAL_FLOOR), (err_s, err_b)


_PLAIN_LOGITS = r"""
import sys, numpy as np
from otter_gguf.runtime.session import Model
out, paths = sys.argv[1], sys.argv[2:]
res = {}
for i, p in enumerate(paths):
    m = Model(p, n_gpu_layers=-1)
    toks = [1] + [int(t) for t in np.random.RandomState(12).randint(3, min(m.n_vocab, 30000), size=69)]
    for batch in (64, 1):
        c = m.context(n_ctx=128, n_batch=64, n_threads=2)
        res[f"{i}-{batch}"] = c.batched_logits(toks, batch)
        c.close()
    m.close()
np.savez(out, **res)
"""


def test_plain_gguf_logits_match_pristine_llama_cpp_on_the_device(gpu, gguf_models, tmp_path, monkeypatch):
    """A plain GGUF (the tiny llama f32, SmolLM2 Q4_1) on the GPU gives the logits of pristine llama.cpp, bit for
    bit, at batch 64 and 1: the series changes ggml-vulkan's graph optimizer (0007), not what a base computes.
    Pristine = the pinned source with only the series marker (which applies to it on its own), built as the
    runtime is (cached)."""
    import subprocess
    import sys
    import zipfile

    from otter_gguf.demo import smollm2 as demo
    from otter_gguf.runtime import build as rb

    patches = sorted(rb.patch_series())
    marker_only = tmp_path / "marker-only"
    marker_only.mkdir()
    (marker_only / patches[-1].name).write_bytes(patches[-1].read_bytes())
    monkeypatch.setenv("OTTER_GGUF_PATCHES", str(marker_only))
    plan = rb.build_runtime("", install=False, backends=("cpu", BACKEND), wheel_out=tmp_path / "wheel")
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))) as z:
        z.extractall(tmp_path / "site")
    monkeypatch.delenv("OTTER_GGUF_PATCHES")
    pristine_lib = tmp_path / "site" / "llama_cpp" / "lib"
    models = [str(gguf_models.base), str(demo.model_path(quiet=True))]
    got = {}
    for name, lib in (("pristine", pristine_lib), ("series", os.environ["LLAMA_CPP_LIB_PATH"])):
        out = tmp_path / f"{name}.npz"
        r = subprocess.run([sys.executable, "-c", _PLAIN_LOGITS, str(out), *models], capture_output=True, text=True,
                           env={**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)}, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        got[name] = np.load(out)
    assert plan.marker != rb.SERIES_PREFIX + rb.series_id()  # the pristine build is not the series
    for key in got["series"].files:
        assert np.array_equal(got["series"][key], got["pristine"][key]), f"model-batch {key}: logits differ from pristine"
