"""Shared session fixtures: tiny deterministic checkpoints built locally.

The names below are used across the test suite; keep them stable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from otter_gguf.reference import fixtures as fx

# The test machines are small and shared: torch's intra-op threads spin-wait
# and slow tiny matmuls down by 10x or more when cores are oversubscribed.
# One thread is fastest for these tiny models (override: OTTER_TORCH_THREADS).
torch.set_num_threads(int(os.environ.get("OTTER_TORCH_THREADS", "1")))


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


@pytest.fixture(scope="module")
def rt():
    """(llama_cpp.llama_cpp, Otter lib, captured log lines) of the patched runtime."""
    from test_runtime_helpers import quiet_logs, runtime_or_skip

    ll, lib = runtime_or_skip()
    logs: list[str] = []
    quiet_logs(ll, logs)
    return ll, lib, logs
